"""Fold LoRA adapters into a full checkpoint: the merged weights sample like base + adapters, at no extra cost.

  python tools/merge_lora.py --model_path output/pretrained_models/PixArt-XL-2-512x512.pth --image_size 512 \\
      --lora output/my_lora/adapter --output output/PixArt-XL-2-512x512-my-lora.pth
  python tools/merge_lora.py --model_path base.pth --config configs/pixart_config/PixArt_toy_shapes.py \\
      --lora run/checkpoints/epoch_2_step_400.pth --lora_scale 0.8 --output merged.pth

--lora (repeatable) is a peft folder in diffusers' module names or a LoRA training checkpoint (its EMA adapter);
--lora_scale gives each one's scale, in order (default 1). The output is a released-layout {'state_dict': ...}
.pth (or a .safetensors file) for --model_path / --load-from anywhere here.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse

from diffusion.pipeline import load_loras, load_transformer, pair_lora_scales
from diffusion.release import RELEASED_IMAGE_SIZES
from diffusion.utils.checkpoint import CheckpointError, save_weights
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True,
                        help="the base: our checkpoint (EMA weights when present), a released .pth, a .safetensors "
                             "file or a diffusers PixArtTransformer2DModel folder")
    parser.add_argument("--config", help="config describing the base model (instead of --image_size)")
    add_cfg_options_argument(parser)
    parser.add_argument("--image_size", type=int, choices=RELEASED_IMAGE_SIZES,
                        help="the base is the released XL/2 model at this size (1024 = the multi-scale model)")
    parser.add_argument("--lora", action="append", required=True, metavar="PATH",
                        help="adapter to fold in: a peft folder or a LoRA training checkpoint (repeatable)")
    parser.add_argument("--lora_scale", action="append", type=float, default=[], metavar="S",
                        help="scale of an adapter's update: none, or one per --lora in the same order (default 1)")
    parser.add_argument("--no_ema", action="store_true", help="use the live weights of a training checkpoint as base")
    parser.add_argument("--output", required=True, help="merged checkpoint to write (.pth, .pt or .safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.output)
    try:
        if out.suffix not in (".pth", ".pt", ".safetensors"):
            raise ValueError(f"--output {out} must end in .pth, .pt or .safetensors")
        if out.exists() and not args.overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        cfg = load_config(args.config, args.cfg_options) if args.config else None
        model = load_transformer(args.model_path, config=cfg, image_size=args.image_size, use_ema=not args.no_ema)
        loras = pair_lora_scales(args.lora, args.lora_scale)
        load_loras(model, loras, merge=True)
        save_weights(model.state_dict(), out)
    except (CheckpointError, ConfigError, FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    print(f"wrote {out}: {args.model_path} with {', '.join(f'{p} x {s:g}' for p, s in loras)} folded in")


if __name__ == "__main__":
    main()
