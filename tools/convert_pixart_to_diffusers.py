"""Convert a PixArt-alpha checkpoint to a diffusers `PixArtTransformer2DModel` folder or, with --pipeline, a whole
`PixArtAlphaPipeline` folder; or back (--reverse).

Examples:
  # released 1024-MS checkpoint -> diffusers transformer folder
  python tools/convert_pixart_to_diffusers.py --orig_ckpt_path output/pretrained_models/PixArt-XL-2-1024-MS.pth \\
      --image_size 1024 --multi_scale_train --dump_path output/diffusers/PixArt-XL-2-1024-MS
  # a named model (downloaded when missing) -> PixArtAlphaPipeline: transformer, T5 encoder and tokenizer, VAE and
  # a DPM-Solver++ scheduler; PixArtAlphaPipeline.from_pretrained(folder) loads it, and so does --model_path here
  python tools/convert_pixart_to_diffusers.py --orig_ckpt_path PixArt-XL-2-512x512 --pipeline \\
      --dump_path output/diffusers/PixArt-XL-2-512x512-pipeline
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
from diffusion.model_zoo import named_model_at, resolve_model_argument
from diffusion.pipeline import t5_folder, vae_folder
from diffusion.release import (
    DTYPES,
    RELEASED_IMAGE_SIZES,
    SD_VAE_SCALE_FACTOR,
    T5_TOKENS,
    VAE_DOWNSAMPLE,
    released_lewei_scale,
    released_model_name,
)
from diffusion.utils.checkpoint import CheckpointError, atomic_save, match_state_dict, read_state_dict, save_weights
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.diffusers_interop import (
    NULL_CAPTION_FILE,
    architecture_from_diffusers_config,
    architecture_of,
    build_diffusers_model,
    build_pixart,
    find_transformer_folder,
    load_diffusers_transformer,
    pixart_to_diffusers,
    read_diffusers_config,
    save_diffusers_transformer,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orig_ckpt_path", "--input", dest="input", required=True, metavar="PATH",
                        help="source: a PixArt checkpoint (.pth/.pt/.safetensors; released {'state_dict': ...} "
                             "files included), a named model (tools/download.py --list; downloaded when missing) "
                             "or, with --reverse, a diffusers transformer or pipeline folder")
    parser.add_argument("--dump_path", "--output", dest="output", required=True, metavar="PATH",
                        help="destination: a diffusers folder, or with --reverse a .pth (released layout "
                             "{'state_dict': ...}) or .safetensors file")
    parser.add_argument("--reverse", action="store_true",
                        help="convert a diffusers PixArtTransformer2DModel folder back to a PixArt checkpoint")
    parser.add_argument("--pipeline", action="store_true",
                        help="write a whole diffusers PixArtAlphaPipeline folder: transformer/ (with the null "
                             "caption), text_encoder/ and tokenizer/ (T5), vae/ (its scaling_factor set to the "
                             "latent scale factor) and scheduler/ (DPM-Solver++ of order 2 on PixArt's linear "
                             "betas), as the reference's converter does without --only_transformer")
    parser.add_argument("--t5_path", help="with --pipeline: the T5 folder (default: the config's t5_pretrained, "
                                          "else the released t5-v1_1-xxl, downloaded when missing)")
    parser.add_argument("--vae_path", help="with --pipeline: the VAE folder (default: the config's vae_pretrained, "
                                           "else the released sd-vae-ft-ema, downloaded when missing)")
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
                        help="dtype of the written transformer weights (default fp32, as released; with --pipeline "
                             "T5 and the VAE keep their own)")
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


def describe_model(args, cfg):
    """A meta-device model (no memory) for the forward direction, from --config or --image_size."""
    with torch.device("meta"):
        if cfg is not None:
            return build_model_from_config(cfg)
        if args.image_size is None:
            raise SystemExit("error: give --config or --image_size: the checkpoint alone does not record the "
                             "number of heads, the input size or lewei_scale")
        lewei = args.lewei_scale if args.lewei_scale is not None else released_lewei_scale(args.image_size)
        name = "PixArtMS_XL_2" if args.multi_scale_train else "PixArt_XL_2"
        return build_model(name, input_size=args.image_size // VAE_DOWNSAMPLE, lewei_scale=lewei)


def check_destination(path, overwrite):
    if path.exists() and not overwrite:
        raise SystemExit(f"error: {path} exists; pass --overwrite to replace it")


def write_folder(out, overwrite, write):
    """Call `write(folder)` on a temp folder beside `out`, then move it to `out`: a failure leaves no half-written
    folder, and an existing `out` is replaced only with --overwrite."""
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        shutil.move(str(tmp), str(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pixart_scheduler():
    """DPM-Solver++ (order 2, data prediction) on PixArt's diffusion: 1000 steps of linear betas 1e-4 to 0.02
    (SPEC section 5); diffusers' defaults otherwise, as the reference's converter writes it."""
    from diffusers import DPMSolverMultistepScheduler
    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                       beta_schedule="linear", solver_order=2, algorithm_type="dpmsolver++",
                                       prediction_type="epsilon")


def save_pipeline(state_dict, arch, folder, t5_dir, vae_dir, scale_factor, dtype):
    """Write a PixArt state dict with its T5 and VAE as a diffusers PixArtAlphaPipeline folder."""
    from diffusers import PixArtAlphaPipeline
    from transformers import AutoTokenizer, T5EncoderModel

    from diffusion.model.t5 import t5_parts
    from diffusion.pipeline import load_vae

    encoder_dir, tokenizer_dir = t5_parts(t5_dir)
    text_encoder = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True)
    if text_encoder.config.d_model != arch["caption_channels"]:
        raise SystemExit(f"error: the T5 folder {t5_dir} gives {text_encoder.config.d_model}-wide features; the model "
                         f"reads caption_channels={arch['caption_channels']}")
    vae = load_vae(vae_dir)
    if vae.config.scaling_factor != scale_factor:  # diffusers decodes with the VAE's own scaling_factor
        print(f"note: {vae_dir} has scaling_factor {vae.config.scaling_factor}; the pipeline's VAE gets the model's "
              f"latent scale factor {scale_factor}")
        vae.register_to_config(scaling_factor=scale_factor)
    d_sd, extras = pixart_to_diffusers(state_dict)
    transformer = build_diffusers_model(arch, {k: v.to(dtype) for k, v in d_sd.items()})
    pipe = PixArtAlphaPipeline(tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True),
                               text_encoder=text_encoder, vae=vae, transformer=transformer,
                               scheduler=pixart_scheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    if "y_embedding" in extras:  # diffusers has no null caption: kept beside the weights, as for --reverse
        atomic_save({"y_embedding": extras["y_embedding"].to(dtype)}, Path(folder) / "transformer" / NULL_CAPTION_FILE)


def forward(args):
    out = Path(args.output)
    check_destination(out, args.overwrite)
    cfg = load_config(args.config, args.cfg_options) if args.config else None
    model = describe_model(args, cfg)
    state_dict = read_state_dict(args.input, use_ema=args.use_ema)
    state_dict, report = match_state_dict(model, state_dict, strict=True, source=args.input)
    print(report.summary())
    arch, dtype = architecture_of(model), DTYPES[args.dtype]
    if args.pipeline:
        t5_dir = t5_folder(args.t5_path, cfg)
        vae_dir = vae_folder(args.vae_path, cfg)
        scale_factor = cfg.scale_factor if cfg is not None else SD_VAE_SCALE_FACTOR
        write_folder(out, args.overwrite,
                     lambda tmp: save_pipeline(state_dict, arch, tmp, t5_dir, vae_dir, scale_factor, dtype))
        print(f"wrote diffusers PixArtAlphaPipeline folder {out} with T5 {t5_dir} and VAE {vae_dir} (load with "
              f"PixArtAlphaPipeline.from_pretrained({str(out)!r}), or give it as --model_path)")
        return
    write_folder(out, args.overwrite, lambda tmp: save_diffusers_transformer(state_dict, arch, tmp, dtype=dtype))
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
    if args.pipeline and args.reverse:
        raise SystemExit("error: --pipeline writes a pipeline folder; --reverse reads one (its transformer/) already")
    try:
        if not args.reverse:  # a named model is fetched first; it knows its size and whether it is multi-scale
            named = named_model_at(args.input) is not None
            args.input, args.image_size = resolve_model_argument(args.input, args.image_size)
            if named and args.config is None and args.image_size is not None:
                args.multi_scale_train = args.multi_scale_train or released_model_name(args.image_size) != "PixArt_XL_2"
        reverse(args) if args.reverse else forward(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}")


if __name__ == "__main__":
    main()
