"""Training-step throughput: our PixArt against diffusers' PixArtTransformer2DModel, same config and weights,
one process, timed alternately after warm-up.

A step is: caption dropout (p=0.1; ours does it inside the model, diffusers' before the call as its trainers
do), forward on noised latents, MSE loss on the eps channels, backward, gradient-norm clip (0.01), fused
AdamW step and zero_grad. Examples (bench/README.md has more):

    python bench/bench_train.py --preset cpu                       # mid-size model on the CPU, a few minutes
    python bench/bench_train.py --preset xl --size 512 --batch 32  # the XL/2 on a GPU, bf16
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import torch

from common import (BASELINE_NAME, DTYPES, PRESETS, alternate, build_baseline, build_ours, build_theirs,
                    caption_batch, common_parser, diffusers_call, environment, fmt, forward_flops, gib, matmul_peak,
                    max_rel_error, median, micro_conditions, mse_eps_loss, paired_ratio, peak_memory, print_table,
                    resident_bytes, resolve, write_json)
from diffusion.model.gaussian_diffusion import get_named_beta_schedule
from diffusion.release import VAE_DOWNSAMPLE

GRAD_CLIP = 0.01  # the released configs' clip value


def make_batch(args, batch):
    """Noised latents x_t at random timesteps (linear schedule, 1000 steps), their noise, captions, mask."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    latent = args.size // VAE_DOWNSAMPLE
    x0 = torch.randn(batch, 4, latent, latent, generator=gen, device=args.device)
    noise = torch.randn(x0.shape, generator=gen, device=args.device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=args.device)
    alpha_bar = torch.cumprod(1 - get_named_beta_schedule("linear", 1000), 0).to(args.device, torch.float32)[t]
    x_t = alpha_bar.sqrt()[:, None, None, None] * x0 + (1 - alpha_bar).sqrt()[:, None, None, None] * noise
    y, mask = caption_batch(batch, args.caption_len, args.device, DTYPES[args.dtype], gen)
    dtype = DTYPES[args.dtype]
    return dict(x=x_t.to(dtype), t=t, y=y, mask=mask, noise=noise.to(dtype), data_info=micro_conditions(args, batch))


def train_step(model, call, batch):
    """A closure doing one full optimiser step of `model`; also returns its optimiser."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Fused on the CPU too: the default per-tensor CPU AdamW alone took over a second per step.
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.03, eps=1e-10, fused=True)

    def step():
        out = call(batch["x"], batch["t"], batch["y"], batch["mask"], batch["data_info"])
        mse_eps_loss(out, batch["noise"]).backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def run(args):
    batch_size = args.batch or PRESETS[args.preset]["batch"]
    ours = build_ours(args)
    theirs = build_theirs(ours, args)
    batch = make_batch(args, batch_size)

    models = {"ours": (ours, lambda x, t, y, m, info: ours(x, t, y, m, data_info=info))}
    base = build_baseline(ours, args)
    if base is not None:
        models[BASELINE_NAME] = (base, lambda x, t, y, m, info: base(x, t, y, m, data_info=info))
    if theirs is not None:
        null = ours.y_embedder.y_embedding.to(batch["y"].dtype)
        drop_prob = ours.y_embedder.uncond_prob

        def call_theirs(x, t, y, m, info):
            if theirs.training:  # the caption dropout our model does inside, done as diffusers' trainers do
                y = torch.where((torch.rand(len(y), device=y.device) < drop_prob)[:, None, None], null, y)
            return diffusers_call(theirs, x, t, y, m, info)
        models["diffusers"] = (theirs, call_theirs)
        # Same function before timing: eval-mode outputs on the benchmark batch (no caption dropout).
        ours.eval(), theirs.eval()
        # Eager: a compiled model would otherwise compile an extra inference graph just for this check.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            a = models["ours"][1](batch["x"], batch["t"], batch["y"], batch["mask"], batch["data_info"])
            b = models["diffusers"][1](batch["x"], batch["t"], batch["y"], batch["mask"], batch["data_info"])
        agreement = max_rel_error(a, b)
        print(f"ours vs diffusers, eval forward on the benchmark batch: relative error {agreement:.2e}")
    else:
        agreement = None

    flops = 3 * forward_flops(ours, args) * batch_size  # forward + backward (2x forward) per step
    peak = matmul_peak(args.device, DTYPES[args.dtype]) if args.device == "cuda" else None

    steps, optimizers = {}, {}
    for name, (model, call) in models.items():
        model.train()
        steps[name], optimizers[name] = train_step(model, call, batch)
    samples = alternate(steps, args.warmup, args.rounds, calls=args.calls, device=args.device)
    memory = {}
    for name, (model, _) in models.items():
        others = [obj for other, (m, _) in models.items() if other != name for obj in (m, optimizers[other])]
        memory[name] = peak_memory(steps[name], args.device, resident_bytes(*others))

    results = []
    for name in models:
        s = median(samples[name])
        results.append(dict(
            model=name, seconds_per_step=s, images_per_s=batch_size / s, seconds_per_round=samples[name],
            ratio_vs_diffusers=paired_ratio(samples["diffusers"], samples[name]) if "diffusers" in samples else None,
            speedup_vs_options_off=(paired_ratio(samples[BASELINE_NAME], samples[name])
                                    if BASELINE_NAME in samples else None),
            tflops=flops / s / 1e12, peak_fraction=(flops / s / peak) if peak else None,
            peak_memory_bytes=memory[name]))
    config = dict(preset=args.preset, size=args.size, batch=batch_size, dtype=args.dtype, grad_ckpt=args.grad_ckpt,
                  compile=args.compile, compile_diffusers=args.compile_diffusers, baseline=args.baseline,
                  with_baseline=args.with_baseline,
                  caption_len=args.caption_len, multi_scale=args.size >= 1024,
                  model_shape=args.shape, forward_gflops_per_image=flops / 3 / batch_size / 1e9)
    payload = dict(bench="train", config=config, environment=environment(args), matmul_peak_tflops=peak and peak / 1e12,
                   agreement_rel_error=agreement, results=results)

    title = (f"train step, {args.preset} preset, {args.size} px, batch {batch_size}, {args.dtype}"
             f"{', grad ckpt' if args.grad_ckpt else ''}{', compiled' if args.compile else ''}"
             f"{', baseline' if args.baseline else ''}")
    rows = [[r["model"], fmt(r["images_per_s"]), fmt(r["ratio_vs_diffusers"]), fmt(r["speedup_vs_options_off"]),
             fmt(r["tflops"]), None if r["peak_fraction"] is None else f"{100 * r['peak_fraction']:.0f}%",
             gib(r["peak_memory_bytes"])] for r in results]
    print_table(title, ["model", "img/s", "vs diffusers", "vs options off", "TFLOP/s", "% matmul peak", "peak GiB"],
                rows)
    print(f"\nforward {config['forward_gflops_per_image']:.1f} GFLOP/image; "
          + (f"matmul peak {peak / 1e12:.0f} TFLOP/s" if peak else "no GPU matmul peak on the CPU"))
    write_json(args.json, payload)
    return payload


def build_parser():
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=1, help="steps per timed round")
    return p


def main():
    run(resolve(build_parser().parse_args()))


if __name__ == "__main__":
    main()
