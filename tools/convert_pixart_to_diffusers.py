"""Convert a PixArt-alpha checkpoint to a diffusers `PixArtTransformer2DModel` folder, or back (--reverse).

Examples:
  # released 1024-MS checkpoint -> diffusers transformer folder
  python tools/convert_pixart_to_diffusers.py --orig_ckpt_path output/pretrained_models/PixArt-XL-2-1024-MS.pth \\
      --image_size 1024 --multi_scale_train --dump_path output/diffusers/PixArt-XL-2-1024-MS
  # a checkpoint of a 512 px model trained with this codebase (EMA weights), described by its config
  python tools/convert_pixart_to_diffusers.py --orig_ckpt_path my_run.pth --use-ema \
      --config configs/pixart_config/PixArt_xl2_img512_internal.py --dump_path output/diffusers/my_run
  # and back to a released-layout .pth (the null caption is read from the folder)
  python tools/convert_pixart_to_diffusers.py --reverse --orig_ckpt_path output/diffusers/my_run \
      --dump_path output/my_run_roundtrip.pth
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import shutil
import tempfile

import torch

from diffusion.model.builder import build_model, build_model_from_config
from diffusion.release import DTYPES, RELEASED_IMAGE_SIZES, T5_TOKENS, VAE_DOWNSAMPLE, released_lewei_scale
from diffusion.utils.checkpoint import CheckpointError, match_state_dict, read_state_dict, save_weights
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.diffusers_interop import (
    architecture_from_diffusers_config,
    architecture_of,
    build_pixart,
    find_transformer_folder,
    load_diffusers_transformer,
    read_diffusers_config,
    save_diffusers_transformer,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orig_ckpt_path", "--input", dest="input", required=True, metavar="PATH",
                        help="source: a PixArt checkpoint (.pth/.pt/.safetensors; released {'state_dict': ...} "
                             "files included) or, with --reverse, a diffusers transformer or pipeline folder")
    parser.add_argument("--dump_path", "--output", dest="output", required=True, metavar="PATH",
                        help="destination: a diffusers folder, or with --reverse a .pth (released layout "
                             "{'state_dict': ...}) or .safetensors file")
    parser.add_argument("--reverse", action="store_true",
                        help="convert a diffusers PixArtTransformer2DModel folder back to a PixArt checkpoint")
    parser.add_argument("--config", metavar="CONFIG",
                        help="PixArt config describing the model (preset, image_size, lewei_scale, model_kwargs); "
                             "alternative to --image_size for the forward direction")
    add_cfg_options_argument(parser)
    parser.add_argument("--image_size", type=int, choices=RELEASED_IMAGE_SIZES,
                        help="released XL/2 model at this resolution (lewei_scale 2.0 at 1024, else 1.0), "
                             "when no --config is given")
    parser.add_argument("--multi_scale_train", action="store_true",
                        help="with --image_size: the model is PixArtMS (size/aspect-ratio micro-conditions)")
    parser.add_argument("--lewei_scale", type=float,
                        help="with --image_size: override the position interpolation scale")
    parser.add_argument("--use-ema", action="store_true",
                        help="convert the EMA weights ('state_dict_ema') of one of our training checkpoints")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="dtype of the written weights (default fp32, as released)")
    parser.add_argument("--null-caption-from", metavar="PATH",
                        help="with --reverse: take the null caption (y_embedding) from this PixArt checkpoint or "
                             "null-caption file instead of the folder's pixart_null_caption.safetensors")
    parser.add_argument("--random-null-caption", type=int, metavar="SEED",
                        help="with --reverse, for folders without a null caption (e.g. converted by diffusers): "
                             "draw a fresh one, randn/sqrt(C) with this seed, as PixArt initialises it. The "
                             "transformer has never seen it, so guidance needs fine-tuning before it is useful")
    parser.add_argument("--model_max_length", type=int, default=T5_TOKENS,
                        help=f"with --random-null-caption: caption tokens of the null caption (default {T5_TOKENS})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    return parser.parse_args(argv)


def describe_model(args):
    """A meta-device model (no memory) for the forward direction, from --config or --image_size."""
    with torch.device("meta"):
        if args.config:
            return build_model_from_config(load_config(args.config, args.cfg_options))
        if args.image_size is None:
            raise SystemExit("error: give --config or --image_size: the checkpoint alone does not record the "
                             "number of heads, the input size or lewei_scale")
        lewei = args.lewei_scale if args.lewei_scale is not None else released_lewei_scale(args.image_size)
        name = "PixArtMS_XL_2" if args.multi_scale_train else "PixArt_XL_2"
        return build_model(name, input_size=args.image_size // VAE_DOWNSAMPLE, lewei_scale=lewei)


def check_destination(path, overwrite):
    if path.exists() and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")


def forward(args):
    out = Path(args.output)
    check_destination(out, args.overwrite)
    model = describe_model(args)
    state_dict = read_state_dict(args.input, use_ema=args.use_ema)
    state_dict, report = match_state_dict(model, state_dict, strict=True, source=args.input)
    print(report.summary())
    # Write next to the destination, then move into place, so a failure leaves no half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
    try:
        save_diffusers_transformer(state_dict, architecture_of(model), tmp, dtype=DTYPES[args.dtype])
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote diffusers PixArtTransformer2DModel folder {out} "
          f"(load with PixArtTransformer2DModel.from_pretrained({str(out)!r}))")


def reverse(args):
    out = Path(args.output)
    if out.suffix not in (".pth", ".pt", ".safetensors"):
        raise SystemExit(f"error: --dump_path {out} must end in .pth, .pt or .safetensors with --reverse")
    check_destination(out, args.overwrite)
    if args.null_caption_from and args.random_null_caption is not None:
        raise SystemExit("error: give at most one of --null-caption-from and --random-null-caption")
    null_caption = args.null_caption_from
    if args.random_null_caption is not None:
        config = read_diffusers_config(find_transformer_folder(args.input))
        channels = architecture_from_diffusers_config(config)["caption_channels"]
        generator = torch.Generator().manual_seed(args.random_null_caption)
        null_caption = torch.randn(args.model_max_length, channels, generator=generator) / channels ** 0.5
        print(f"warning: drew a new random null caption (seed {args.random_null_caption}); classifier-free "
              "guidance with it is meaningless until the model is fine-tuned with caption dropout")
    arch, state_dict = load_diffusers_transformer(args.input, null_caption=null_caption)
    with torch.device("meta"):
        model = build_pixart(arch)
    match_state_dict(model, state_dict, strict=True, source=args.input)
    save_weights({k: v.to(DTYPES[args.dtype]) for k, v in state_dict.items()}, out)
    kind = "PixArtMS" if arch["multi_scale"] else "PixArt"
    shape = {k: arch[k] for k in ("input_size", "hidden_size", "depth", "num_heads", "lewei_scale")}
    print(f"wrote {out}: {kind} {shape}")


def main(argv=None):
    args = parse_args(argv)
    try:
        reverse(args) if args.reverse else forward(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
