"""Export the adapter of a LoRA training checkpoint as a peft folder in diffusers' module names.

  python tools/export_lora.py --checkpoint output/my_lora/checkpoints/epoch_5_step_1000.pth \
      --output output/my_lora/adapter

The folder (adapter_config.json + adapter_model.safetensors) loads on diffusers' PixArtTransformer2DModel with
`PeftModel.from_pretrained(transformer, folder)`, and here with `scripts/inference.py --lora folder`. The EMA
adapter is exported unless --no_ema is given.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse

from diffusion.train.lora import adapter_from_checkpoint
from diffusion.utils.checkpoint import CheckpointError
from diffusion.utils.lora_interop import adapter_to_diffusers, write_peft_folder


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of a LoRA training run (epoch_E_step_S.pth)")
    parser.add_argument("--output", required=True, help="the peft adapter folder to write")
    parser.add_argument("--no_ema", action="store_true", help="export the live adapter instead of its EMA")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        weights, spec = adapter_from_checkpoint(args.checkpoint, use_ema=not args.no_ema)
        folder = write_peft_folder(args.output, *adapter_to_diffusers(weights, spec), overwrite=args.overwrite)
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        raise SystemExit(f"error: {err}")
    ranks = sorted(set(spec.ranks.values()))
    print(f"wrote {folder}: {'DoRA' if spec.use_dora else 'LoRA'} adapter of {len(spec.modules)} modules, rank "
          f"{ranks[0] if len(ranks) == 1 else ranks} ({'EMA' if not args.no_ema else 'live'} weights); diffusers: "
          f"PeftModel.from_pretrained(transformer, {str(folder)!r})")


if __name__ == "__main__":
    main()
