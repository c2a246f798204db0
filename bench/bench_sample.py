"""Sampling latency: 20-step DPM-Solver++ with classifier-free guidance (one batch of [cond; uncond]) driving our
PixArt or diffusers' PixArtTransformer2DModel with the same weights, in one process, timed alternately. With
--lcm-steps N also an LCM student's N-step sampling without guidance (the lcm sampler, PIXART-delta), in the same
rounds: a distilled student has the teacher's architecture, so the same weights stand in for it.

The solver, guidance, null caption (our `y_embedding`, given to both) and inputs are shared: diffusers' model
is driven through a small adapter with our `forward_with_dpmsolver` signature, so only the transformer
differs. End to end (T5 encode + sampling + VAE decode) is timed only when --t5 and --vae name local folders;
this project ships no such weights, so by default the table has the transformer alone. Examples:

    python bench/bench_sample.py --preset cpu                  # mid-size model on the CPU
    python bench/bench_sample.py --preset xl --size 1024       # the XL/2 1024-MS on a GPU, bf16
    python bench/bench_sample.py --preset cpu --lcm-steps 4 --no-diffusers   # LCM student 4 vs teacher 20 steps
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import torch

from common import (BASELINE_NAME, DTYPES, MAX_CAPTION_TOKENS, PRESETS, alternate, build_baseline, build_ours,
                    build_theirs, caption_batch, common_parser, diffusers_call, environment, fmt, gib, max_rel_error,
                    median, micro_conditions, paired_ratio, peak_memory, print_table, resident_bytes, resolve,
                    write_json)
from diffusion import DPMS
from diffusion.model.guidance import cfg_inputs, guided_model
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.sampling import sample_dpm_solver, sample_lcm

CFG_SCALE = 4.5
LCM_NAME = "LCM student"
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, 4k"


def diffusers_adapter(theirs, in_channels, dtype):
    """diffusers' model with our `forward_with_dpmsolver(x, timestep, y, mask=None, data_info=None)` shape:
    the eps channels of its output; inputs cast to the model dtype as our model does itself."""
    def forward(x, timestep, y, mask=None, data_info=None):
        return diffusers_call(theirs, x.to(dtype), timestep, y.to(dtype), mask, data_info)[:, :in_channels]
    return forward


def sampler(forward, null_caption, data_info, steps):
    """`sample(z, y, mask)`: the DPM-Solver++ (2nd-order multistep, time-uniform grid) from noise z through the
    official `DPMS` facade, which hands the raw caption features to the model at every step."""
    def sample(z, y, mask):
        solver = DPMS(forward, condition=y, uncondition=null_caption.expand(len(y), -1, -1), cfg_scale=CFG_SCALE,
                      model_kwargs=dict(mask=mask, data_info=data_info))
        return solver.sample(z, steps=steps, order=2, skip_type="time_uniform", method="multistep",
                             progress=False)
    return sample


def pipeline_sampler(model, data_info, steps):
    """`sample(z, y, mask)` as `Pipeline.sample` runs it: the [cond; uncond] captions encoded once
    (`encode_captions`: projection and every block's keys and values), then the registered DPM-Solver++."""
    def sample(z, y, mask):
        null = model.y_embedder.y_embedding[None].expand(len(y), -1, -1).to(y.dtype)
        cond = dict(y=y, mask=mask, data_info=data_info)
        inputs = cfg_inputs(cond, dict(cond, y=null), len(y))
        inputs["y"] = model.encode_captions(inputs["y"], inputs.pop("mask"))
        return sample_dpm_solver(guided_model(model, inputs, CFG_SCALE), z, steps)
    return sample


def lcm_sampler(model, data_info, steps):
    """`sample(z, y, mask)` as `Pipeline.sample` runs a distilled model: the captions (no null caption: no guidance)
    encoded once, then the registered lcm sampler for `steps` steps."""
    def sample(z, y, mask):
        inputs = dict(y=model.encode_captions(y, mask), data_info=data_info)
        return sample_lcm(guided_model(model, inputs), z, steps)
    return sample


def encoders(args):
    """(encode(texts) -> (y, mask), decode(latents) -> images) from --t5/--vae, or None when not given."""
    if not (args.t5 and args.vae):
        return None
    from diffusers import AutoencoderKL

    from diffusion.model.t5 import T5Embedder
    t5 = T5Embedder(args.t5, device=args.device, torch_dtype=args.dtype, model_max_length=MAX_CAPTION_TOKENS)
    vae = AutoencoderKL.from_pretrained(args.vae, torch_dtype=DTYPES[args.dtype]).to(args.device).eval()
    scale = vae.config.scaling_factor  # 0.18215 for sd-vae-ft-ema

    def decode(latents):
        with torch.no_grad():
            return vae.decode((latents / scale).to(vae.dtype)).sample
    return t5.get_text_embeddings, decode


def run(args):
    batch = args.batch or PRESETS[args.preset]["sample_batch"]
    dtype = DTYPES[args.dtype]
    ours = build_ours(args).eval()
    theirs = build_theirs(ours, args)
    if theirs is not None:
        theirs.eval()
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    latent = args.size // VAE_DOWNSAMPLE
    z = torch.randn(batch, 4, latent, latent, generator=gen, device=args.device)
    y, mask = caption_batch(batch, args.caption_len, args.device, dtype, gen, args.caption_channels)
    mask[:] = mask[0]  # every prompt of the batch as long as --caption-len
    info = micro_conditions(args, batch)
    null = ours.y_embedder.y_embedding[None].to(dtype)
    forwards = {"ours": ours.forward_with_dpmsolver}
    base = build_baseline(ours, args)
    if base is not None:
        forwards[BASELINE_NAME] = base.eval().forward_with_dpmsolver
    if theirs is not None:
        forwards["diffusers"] = diffusers_adapter(theirs, ours.in_channels, dtype)
    # Encoding the captions once is one of our speed-ups: the options-off model samples without it.
    samplers = {name: sampler(fn, null, info, args.steps) for name, fn in forwards.items()}
    if not args.baseline:
        samplers["ours"] = pipeline_sampler(ours, info, args.steps)
    steps_of = {name: args.steps for name in samplers}
    if args.lcm_steps:
        samplers[LCM_NAME] = lcm_sampler(ours, info, args.lcm_steps)
        steps_of[LCM_NAME] = args.lcm_steps

    agreement = None
    if theirs is not None:
        agreement = max_rel_error(samplers["ours"](z, y, mask), samplers["diffusers"](z, y, mask))
        print(f"ours vs diffusers, {args.steps}-step samples: relative error {agreement:.2e}")

    fns = {name: (lambda s=s: s(z, y, mask)) for name, s in samplers.items()}
    codecs = encoders(args)
    if codecs is not None:
        encode, decode = codecs
        for name, s in samplers.items():
            fns[f"{name} end to end"] = lambda s=s: decode(s(z, *encode([PROMPT] * batch)))
    with torch.no_grad():
        samples = alternate(fns, args.warmup, args.rounds, calls=1, device=args.device)
        memory = {}
        models = {"ours": ours, BASELINE_NAME: base, "diffusers": theirs}
        for name in samplers:
            owner = "ours" if name == LCM_NAME else name  # the student runs on our model's weights
            others = [m for other, m in models.items() if other != owner]
            memory[name] = peak_memory(fns[name], args.device, resident_bytes(*others))

    results = []
    for name, secs in samples.items():
        reference = "diffusers end to end" if name.endswith("end to end") else "diffusers"
        teacher = "ours end to end" if name.endswith("end to end") else "ours"
        s = median(secs)
        steps = steps_of[name.removesuffix(" end to end")]
        results.append(dict(model=name, steps=steps, guided=not name.startswith(LCM_NAME), seconds=s,
                            ms_per_step=1000 * s / steps, seconds_per_round=secs,
                            ratio_vs_diffusers=paired_ratio(samples[reference], secs) if reference in samples else None,
                            speedup_vs_options_off=(paired_ratio(samples[BASELINE_NAME], secs)
                                                    if BASELINE_NAME in samples else None),
                            speedup_vs_ours=(paired_ratio(samples[teacher], secs)
                                             if args.lcm_steps and teacher in samples else None),
                            peak_memory_bytes=memory.get(name)))
    config = dict(preset=args.preset, size=args.size, batch=batch, cfg_batch=2 * batch, dtype=args.dtype,
                  steps=args.steps, lcm_steps=args.lcm_steps, cfg_scale=CFG_SCALE, compile=args.compile,
                  baseline=args.baseline,
                  with_baseline=args.with_baseline,
                  compile_diffusers=args.compile_diffusers, caption_len=args.caption_len,
                  multi_scale=args.size >= 1024, model_shape=args.shape)
    payload = dict(bench="sample", config=config, environment=environment(args), agreement_rel_error=agreement,
                   results=results)
    title = (f"{args.steps}-step DPM-Solver++ with CFG{f' and {args.lcm_steps}-step LCM' if args.lcm_steps else ''}, "
             f"{args.preset} preset, {args.size} px, {batch} image(s), "
             f"{args.dtype}, prompt of {args.caption_len} tokens{', compiled' if args.compile else ''}"
             f"{', baseline' if args.baseline else ''}")
    header = ["model", "steps", "s / image", "ms / step", "vs diffusers", "vs options off", "peak GiB"]
    rows = [[r["model"], f"{r['steps']}{'' if r['guided'] else ', no CFG'}", fmt(r["seconds"]), fmt(r["ms_per_step"]),
             fmt(r["ratio_vs_diffusers"]), fmt(r["speedup_vs_options_off"]), gib(r["peak_memory_bytes"])]
            for r in results]
    if args.lcm_steps:
        header.insert(5, f"vs ours {args.steps} steps")
        for row, r in zip(rows, results):
            row.insert(5, fmt(r["speedup_vs_ours"]))
    print_table(title, header, rows)
    write_json(args.json, payload)
    return payload


def build_parser():
    p = common_parser(__doc__.split("\n\n")[0])
    p.set_defaults(rounds=3, warmup=1)
    p.add_argument("--steps", type=int, default=20, help="solver steps (model calls, each on the CFG batch)")
    p.add_argument("--lcm-steps", type=int, default=0,
                   help="also time an LCM student's sampling in this many steps, without guidance (0: not)")
    p.add_argument("--t5", help="local T5 folder (t5-v1_1-xxl layout): with --vae, also time end to end")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (sd-vae-ft-ema): with --t5, end to end")
    return p


def main():
    run(resolve(build_parser().parse_args()))


if __name__ == "__main__":
    main()
