"""The Gradio demo of a PixArt model. Works on the toy model out of the box:

  python scripts/quickstart.py          # trains the toy model once
  python scripts/interface.py           # then open http://127.0.0.1:7860

  python scripts/interface.py --lora output/my_lora/adapter --lora output/other_lora/adapter   # + a LoRA picker
  python scripts/interface.py --config configs/pixart_config/PixArt_toy_lcm.py \\
      --model_path output/lcm_toy/train/checkpoints/<newest>.pth      # a distilled model: opens in LCM mode
  python scripts/interface.py --model_path PixArt-XL-2-1024-MS      # a named model, downloaded on first use
  python scripts/interface.py --image_size 1024 --model_path output/pretrained_models/PixArt-XL-2-1024-MS.pth \\
      --t5_path output/pretrained_models/t5_ckpts --vae_path output/pretrained_models/sd-vae-ft-ema
  python scripts/interface.py --image_size 1024 --model_path output/pretrained_models/PixArt-XL-2-1024-ControlNet.pth \\
      --hed_checkpoint output/pretrained_models/ControlNetHED.pth      # ControlNet: adds a control image panel
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse

import torch

from diffusion.model_zoo import resolve_model_argument
from diffusion.pipeline import is_distilled, load_pipeline
from diffusion.release import DTYPES, RELEASED_IMAGE_SIZES, RELEASED_T5_DIR, RELEASED_VAE_DIR
from diffusion.train.state import list_checkpoints
from diffusion.utils.arguments import device_name, positive_int
from diffusion.utils.checkpoint import CheckpointError
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.diffusers_interop import pipeline_part

TOY_CONFIG = "configs/pixart_config/PixArt_toy_shapes.py"
TOY_WORK_DIR = "output/quickstart/train"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=f"config describing the model, T5 and VAE (default without --image_size: "
                                         f"{TOY_CONFIG})")
    add_cfg_options_argument(parser)
    parser.add_argument("--model_path", help="a named model (tools/download.py --list; downloaded on first use), a "
                                             "checkpoint, a diffusers transformer folder or a PixArtAlphaPipeline "
                                             "folder (its T5 and VAE used unless --t5_path / --vae_path say "
                                             "otherwise); default with the toy config: the newest checkpoint in "
                                             f"{TOY_WORK_DIR}/checkpoints")
    parser.add_argument("--image_size", type=int, choices=RELEASED_IMAGE_SIZES,
                        help="released XL/2 model at this size (1024 = the multi-scale model)")
    parser.add_argument("--t5_path", help="T5 folder (or its parent holding t5-v1_1-xxl/); default: the config's "
                                          f"t5_pretrained, else {RELEASED_T5_DIR}")
    parser.add_argument("--vae_path", "--tokenizer_path", dest="vae_path",
                        help=f"VAE folder (default: the config's vae_pretrained, else {RELEASED_VAE_DIR})")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH",
                        help="LoRA adapter the demo offers in its picker: a peft folder or a LoRA training checkpoint "
                             "(repeatable)")
    parser.add_argument("--lcm", action="store_true",
                        help="open in LCM mode (the lcm sampler, 4 steps, guidance off), e.g. for a PixArt-LCM-LoRA "
                             "peft folder; automatic for distilled models (an LCM pipeline folder, an LCM or LCM-LoRA "
                             "training checkpoint)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="create a public Gradio share link (off by default)")
    parser.add_argument("--concurrency", type=positive_int, default=1,
                        help="requests sampled at the same time (default 1)")
    parser.add_argument("--max-queue", type=positive_int, default=16, help="requests waiting at most (default 16)")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--t5_device", type=device_name,
                        help="device for T5 (default: --device; 'cpu' saves GPU memory)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16" if torch.cuda.is_available() else "fp32",
                        help="transformer dtype")
    parser.add_argument("--hed_checkpoint",
                        help="ControlNet models: the annotators' ControlNetHED.pth, which adds the HED condition "
                             "(Canny and ready edge maps need no weights)")
    return parser.parse_args(argv)


def newest_checkpoint(work_dir):
    found = list_checkpoints(work_dir)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {Path(work_dir) / 'checkpoints'}: train the toy model first "
                                "(python scripts/quickstart.py) or pass --model_path")
    return found[-1]


def build(args):
    # a named model is fetched first; it, a PixArtAlphaPipeline folder or --image_size describes the model, else the
    # toy config does
    model_path, image_size = resolve_model_argument(args.model_path, args.image_size) if args.model_path else (
        None, args.image_size)
    config_path = args.config or (None if image_size or pipeline_part(model_path, "transformer") else TOY_CONFIG)
    cfg = load_config(config_path, args.cfg_options) if config_path else None
    model_path = model_path or (newest_checkpoint(TOY_WORK_DIR) if config_path == TOY_CONFIG else None)
    if model_path is None:
        raise ValueError("give --model_path")
    pipe = load_pipeline(model_path, config=cfg, image_size=image_size, t5_path=args.t5_path,
                         vae_path=args.vae_path, device=args.device, dtype=DTYPES[args.dtype],
                         t5_device=args.t5_device, loras=[(path, 1.0) for path in args.lora])
    options = toy_demo_options(cfg)
    if args.lcm or is_distilled(model_path, args.lora):
        options["default_sampler"] = "LCM"
    if args.hed_checkpoint:
        from diffusion.model.hed import load_hed
        options["hed"] = load_hed(args.hed_checkpoint, args.device)
    return pipe, pipe.text_encoder, model_path, options


def toy_demo_options(cfg):
    """build_demo options for a model trained on a toy-shapes dataset (its folder holds the toy manifest): example
    prompts, held-out pairs among them, the one grammar it knows, and the quickstart's sampler and guidance."""
    from diffusion.data.toy_shapes import MANIFEST, example_prompts, vocabulary_note
    dataset = Path(cfg.data_root) / cfg.data.root if cfg is not None else None
    if dataset is None or not (dataset / MANIFEST).is_file():
        return {}
    prompts, held_out = example_prompts(dataset)
    pairs = ", ".join(f"{colour} {kind}" for colour, kind in held_out)
    note = (f"{vocabulary_note()}\n\nThe last {len(prompts) // 2} examples name colour-kind pairs no training "
            f"image has ({pairs}). Images are {cfg.image_size} px, shown enlarged without smoothing.")
    return dict(examples=prompts, note=note, default_sampler="IDDPM", default_guidance=cfg.cfg_scale)


def main(argv=None):
    args = parse_args(argv)
    try:
        pipe, text_encoder, model_path, demo_options = build(args)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    from diffusion.demo import build_demo
    demo = build_demo(pipe, text_encoder, title=f"PixArt-α demo ({Path(model_path).name})", **demo_options)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=args.max_queue)
    print(f"serving {model_path} on http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True)


if __name__ == "__main__":
    main()
