"""Shared pieces of the benchmarks: presets, building our model and diffusers' PixArtTransformer2DModel with
the same weights, the inputs, timing, FLOP counting, the matmul peak and the result table.

Nothing here imports diffusion.utils.config (mmengine is not installed on the GPU machine), and diffusers
is optional: without it the benchmarks time our model alone and say so.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffusion.model.nets import PixArt, PixArtMS
from diffusion.release import DTYPES, T5_CHANNELS, T5_TOKENS, VAE_DOWNSAMPLE, XL_2_SHAPE, released_lewei_scale
from diffusion.utils.diffusers_interop import architecture_of, build_diffusers_model, pixart_to_diffusers

PRESETS = {
    # Mid-size model that runs the whole CPU benchmark in a few minutes on 2 cores: 256 px -> latent 32 ->
    # 256 tokens with patch 2; the real caption width (4096) and length (120).
    "cpu": dict(model=dict(depth=8, hidden_size=384, num_heads=6, patch_size=2), size=256, batch=8,
                sample_batch=1, device="cpu", dtype="fp32"),
    # The released XL/2 (0.6B); 1024 px builds the multi-scale model like the released 1024-MS checkpoint.
    "xl": dict(model=XL_2_SHAPE, size=1024, batch=8, sample_batch=1, device="cuda", dtype="bf16"),
}
CAPTION_CHANNELS = T5_CHANNELS
MAX_CAPTION_TOKENS = T5_TOKENS


# ------------------------------------------------------------------------------------------- arguments

def common_parser(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                   help="model shape and defaults: 'cpu' mid-size (depth 8, hidden 384), 'xl' the released XL/2")
    p.add_argument("--device", help="cpu or cuda (default: the preset's)")
    p.add_argument("--size", type=int, help="image side in pixels (latent = size/8); >= 1024 builds PixArtMS")
    p.add_argument("--batch", type=int, help="images per batch (default: the preset's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="parameter and activation dtype (default: the preset's)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in both models")
    p.add_argument("--compile", action="store_true", help="our model with compile=True (torch.compile per block)")
    p.add_argument("--compile-diffusers", action="store_true", help="torch.compile diffusers' blocks too")
    p.add_argument("--caption-len", type=int, default=MAX_CAPTION_TOKENS,
                   help="kept tokens of the longest caption (of 120; the rest is padding)")
    p.add_argument("--baseline", action="store_true",
                   help="our model with every optional speed-up off (before/after comparisons)")
    p.add_argument("--with-baseline", action="store_true",
                   help="also time our model with every speed option off, same weights, in the same rounds")
    p.add_argument("--no-diffusers", action="store_true", help="time our model only")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per model before timing")
    p.add_argument("--rounds", type=int, default=7, help="alternating timed rounds per model")
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch (default: torch's choice); 1 times steadily on a busy machine")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    return p


def resolve(args):
    """Fill preset defaults into args; returns args."""
    preset = PRESETS[args.preset]
    args.device = args.device or preset["device"]
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --preset cpu or --device cpu)")
    args.size = args.size or preset["size"]
    args.dtype = args.dtype or preset["dtype"]
    args.shape = dict(preset["model"])
    if args.size % VAE_DOWNSAMPLE or (args.size // VAE_DOWNSAMPLE) % args.shape["patch_size"]:
        raise SystemExit(f"--size {args.size} must be a multiple of {VAE_DOWNSAMPLE * args.shape['patch_size']}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 1 <= args.caption_len <= MAX_CAPTION_TOKENS:
        raise SystemExit(f"--caption-len must be in 1..{MAX_CAPTION_TOKENS}, got {args.caption_len}")
    args.caption_channels = t5_width(args.t5) if getattr(args, "t5", None) else CAPTION_CHANNELS
    return args


def t5_width(t5_dir):
    """Feature width (d_model) of a local T5 folder: 4096 for t5-v1_1-xxl, 128 for the toy T5."""
    config = Path(t5_dir) / "config.json"
    try:
        return int(json.loads(config.read_text())["d_model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--t5 {t5_dir}: cannot read d_model from {config} ({err}); expected a local T5 "
                         f"encoder folder such as t5-v1_1-xxl") from err


# ------------------------------------------------------------------------------------------- models

def randomize_(model, seed, std=0.02):
    """Every parameter N(0, std) (also the zero-initialised ones: zeros make matmuls artificially fast)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32) * std)
    return model


def _construct(args, options):
    """Our PixArt (PixArtMS at >= 1024 px, like the released checkpoints) on the device, freshly initialised."""
    cls = PixArtMS if args.size >= 1024 else PixArt
    with torch.device(args.device):
        return cls(input_size=args.size // VAE_DOWNSAMPLE, lewei_scale=released_lewei_scale(args.size),
                   caption_channels=args.caption_channels, model_max_length=MAX_CAPTION_TOKENS,
                   grad_checkpointing=args.grad_ckpt, **args.shape, **options)


def build_ours(args):
    """The model under test: our defaults (every option off with --baseline; compiled blocks with --compile),
    every parameter randomised, in the benchmark dtype."""
    options = dict(BASELINE_OPTIONS) if args.baseline else {}
    if args.compile and not args.baseline:
        options["compile"] = True
    return randomize_(_construct(args, options), args.seed).to(DTYPES[args.dtype])


# Our constructor options that switch every optional speed-up off (for --baseline and --with-baseline).
BASELINE_OPTIONS = dict(trim_captions=False, pack_captions=False, fused_modulation=False, compile=False)
BASELINE_NAME = "ours, options off"


def build_baseline(ours, args):
    """With --with-baseline: our model with every speed option off, holding a copy of `ours`' weights."""
    if not args.with_baseline:
        return None
    model = _construct(args, BASELINE_OPTIONS)
    model.load_state_dict(ours.state_dict())
    return model.to(DTYPES[args.dtype])


def build_theirs(ours, args):
    """diffusers' PixArtTransformer2DModel holding a copy of our weights, or None without diffusers."""
    if args.no_diffusers:
        return None
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        print(f"diffusers is not importable ({err}); timing our model only")
        return None
    state, _ = pixart_to_diffusers(ours.state_dict())
    # Own copies: the conversion shares storage with our parameters, and each model trains its own.
    state = {k: v.detach().clone() for k, v in state.items()}
    theirs = build_diffusers_model(architecture_of(ours), state).to(args.device)
    if args.grad_ckpt:
        theirs.enable_gradient_checkpointing()
    if args.compile_diffusers:
        for block in theirs.transformer_blocks:
            block.compile()
    return theirs


def diffusers_version():
    try:
        import diffusers
        return diffusers.__version__
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------- inputs

def caption_batch(batch, caption_len, device, dtype, gen, channels=CAPTION_CHANNELS):
    """T5-shaped caption features (B, 120, channels) and a padded mask: sample 0 keeps `caption_len` tokens,
    the others between a quarter of that and all of it, like real captions of varying length."""
    y = torch.randn(batch, MAX_CAPTION_TOKENS, channels, generator=gen, device=device) * 0.5
    lengths = torch.randint(max(1, caption_len // 4), caption_len + 1, (batch,), generator=gen, device=device)
    lengths[0] = caption_len
    mask = (torch.arange(MAX_CAPTION_TOKENS, device=device)[None] < lengths[:, None]).long()
    return y.to(dtype), mask


def micro_conditions(args, batch):
    """data_info for PixArtMS (image size and aspect ratio), None for PixArt."""
    if args.size < 1024:
        return None
    hw = torch.tensor([[float(args.size), float(args.size)]], device=args.device).repeat(batch, 1)
    return {"img_hw": hw, "aspect_ratio": torch.ones(batch, 1, device=args.device)}


def diffusers_call(theirs, x, t, y, mask, data_info):
    """diffusers' forward with our argument conventions; returns the (B, 8, H, W) output."""
    added = None
    if data_info is not None:
        added = {"resolution": data_info["img_hw"], "aspect_ratio": data_info["aspect_ratio"]}
    return theirs(x, y, t, added_cond_kwargs=added, encoder_attention_mask=mask).sample


# ------------------------------------------------------------------------------------------- measuring

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_per_call(fn, calls, device):
    """Seconds per call of fn, averaged over `calls` back-to-back calls (device work included)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def alternate(fns, warmup, rounds, calls, device):
    """Seconds per call of each fn in every round: {name: [s_round0, s_round1, ...]}. The fns are timed in
    alternating rounds (order flipped every round), so that drift and load from other processes hit every
    fn alike; compare them with `median` and `paired_ratio`."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            samples[name].append(time_per_call(fns[name], calls, device))
    return samples


def paired_ratio(slow, fast):
    """Median over rounds of slow/fast seconds, each pair timed back to back (robust to a shared machine)."""
    return statistics.median(s / f for s, f in zip(slow, fast))


median = statistics.median


def forward_flops(model, args, batch=1):
    """FLOPs of one forward of `model` on a batch of full-length captions (the nominal model FLOPs: the
    same number for both implementations). Attention runs through SDPA's math path while counting, since
    the fused CPU kernel has no FLOP formula."""
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    latent = args.size // VAE_DOWNSAMPLE
    x = torch.randn(batch, 4, latent, latent, generator=gen, device=args.device).to(DTYPES[args.dtype])
    y, _ = caption_batch(batch, MAX_CAPTION_TOKENS, args.device, DTYPES[args.dtype], gen, args.caption_channels)
    t = torch.full((batch,), 500.0, device=args.device)
    # Eager even for a compiled model: no compile for this one-off shape, none under the counting mode.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), torch.compiler.set_stance("force_eager"), \
            FlopCounterMode(display=False) as counter:
        model(x, t, y, None, data_info=micro_conditions(args, batch))
    return counter.get_total_flops()


def matmul_peak(device, dtype, n=None, calls=10):
    """Measured FLOP/s of a large square matmul on random data (rotating between 3 input pairs)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    gen = torch.Generator(device=device).manual_seed(0)
    pairs = [(torch.randn(n, n, generator=gen, device=device).to(dtype),
              torch.randn(n, n, generator=gen, device=device).to(dtype)) for _ in range(3)]
    state = {"i": 0}

    def one():
        a, b = pairs[state["i"] % 3]
        state["i"] += 1
        torch.mm(a, b)

    seconds = min(alternate({"mm": one}, warmup=3, rounds=3, calls=calls, device=device)["mm"])
    return 2 * n ** 3 / seconds


def resident_bytes(*objects):
    """Bytes of the distinct device storages held by modules' parameters/buffers and optimisers' state."""
    seen, total = set(), 0
    for obj in objects:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
        else:
            tensors = [v for state in obj.state.values() for v in state.values() if torch.is_tensor(v)]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def peak_memory(fn, device, others_bytes):
    """Peak allocated bytes during fn() minus the bytes of the other model's resident tensors (both models
    share one device; each is charged only with what it would need alone). None on the CPU."""
    if torch.device(device).type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats()
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated() - others_bytes


# ------------------------------------------------------------------------------------------- reporting

def environment(args):
    env = dict(torch=torch.__version__, diffusers=diffusers_version(), python=platform.python_version(),
               device=args.device)
    if torch.device(args.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def print_table(title, header, rows):
    """A markdown table (so the results file can take it verbatim)."""
    print(f"\n### {title}\n")
    cells = [header] + [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    print(line(cells[0]))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print(line(r))


def write_json(path, payload):
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"results written to {path}")


def fmt(value, digits=3):
    if value is None:
        return None
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def gib(nbytes):
    return None if nbytes is None else f"{nbytes / 2 ** 30:.2f}"


def max_rel_error(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def mse_eps_loss(out, noise):
    """The training loss used in the benchmark: MSE of the eps channels (variance channels unused)."""
    return F.mse_loss(out[:, :noise.shape[1]].float(), noise.float())
