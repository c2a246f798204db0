"""Sample images from prompts with a PixArt checkpoint (batch CLI).

  python scripts/inference.py --image_size 1024 --model_path output/pretrained_models/PixArt-XL-2-1024-MS.pth \\
      --txt_file prompts.txt --sampling_algo dpm-solver --step 20 --cfg_scale 4.5 --seed 0
  python scripts/inference.py --config configs/pixart_config/PixArt_toy_shapes.py \\
      --model_path output/toy/checkpoints/epoch_10_step_2000.pth --prompt "a red circle on a blue background"

A prompt may end in `--ar h:w` / `--aspect_ratio h:w` (nearest bucket of a multi-scale model) or `--hw H:W`.
With `--lora PATH [--lora_scale S]` (repeatable) LoRA adapters act on the model; `--lora_merge` folds them in.
Prompt i is sampled from seed + i, so an image does not depend on the batch size. T5 encodes every prompt
first and is freed before sampling (`--t5_device cpu` keeps it off the GPU altogether).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json
import re

import torch
from torchvision.transforms.functional import to_pil_image

from diffusion.data.errors import DataError
from diffusion.pipeline import (
    DEFAULT_STEPS,
    SAMPLERS,
    PromptError,
    PromptJob,
    load_pipeline,
    pair_lora_scales,
    parse_prompt,
)
from diffusion.release import DTYPES, RELEASED_IMAGE_SIZES, RELEASED_T5_DIR, RELEASED_VAE_DIR
from diffusion.utils.checkpoint import CheckpointError
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.fileio import save_png


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True,
                        help="our checkpoint (EMA weights used when present), a released .pth, a .safetensors file "
                             "or a diffusers PixArtTransformer2DModel folder")
    parser.add_argument("--config", help="config describing the model, T5, VAE and scale factor (instead of "
                                         "--image_size, for models other than the released ones)")
    add_cfg_options_argument(parser)
    parser.add_argument("--image_size", type=int, choices=RELEASED_IMAGE_SIZES,
                        help="released XL/2 model at this size (1024 = the multi-scale model)")
    parser.add_argument("--t5_path", help="T5 encoder folder (or its parent holding t5-v1_1-xxl/); default: the "
                                          f"config's t5_pretrained, else {RELEASED_T5_DIR}")
    parser.add_argument("--vae_path", "--tokenizer_path", dest="vae_path",
                        help="VAE (diffusers AutoencoderKL) folder; --tokenizer_path is the reference's name for it. "
                             f"Default: the config's vae_pretrained, else {RELEASED_VAE_DIR}")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--txt_file", help="a text file with one prompt per line (blank lines ignored)")
    parser.add_argument("--negative_prompt", default="",
                        help="caption used for the unconditional half of guidance (default: the null caption)")
    parser.add_argument("--sampling_algo", choices=SAMPLERS, default="dpm-solver", help="sampler")
    parser.add_argument("--step", type=int, help=f"sampling steps (default {DEFAULT_STEPS})")
    parser.add_argument("--cfg_scale", type=float, default=4.5, help="classifier-free guidance scale")
    parser.add_argument("--cfg_compat", choices=("fixed", "official"), default="fixed",
                        help="iddpm only: 'official' reproduces the reference's guidance (channels 0-2; see README)")
    parser.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    parser.add_argument("--bs", type=int, default=1, help="images sampled together")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="output/samples",
                        help="where images and metadata.jsonl are written")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32" if not torch.cuda.is_available() else "fp16",
                        help="transformer dtype (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    parser.add_argument("--t5_device", help="device for T5 (default: --device); 'cpu' keeps the GPU for the transformer")
    parser.add_argument("--no_ema", action="store_true", help="use the live weights of a training checkpoint")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH",
                        help="LoRA adapter: a peft folder in diffusers' module names (tools/export_lora.py's, "
                             "PixArt-LCM-LoRA, ...) or a LoRA training checkpoint; repeatable, all act together")
    parser.add_argument("--lora_scale", action="append", type=float, default=[], metavar="S",
                        help="scale of an adapter's update (default 1): none, or one per --lora in the same order")
    parser.add_argument("--lora_merge", action="store_true",
                        help="fold the adapters into the weights before sampling: as fast as no adapter, the same "
                             "images up to float rounding")
    return parser.parse_args(argv)


def slug(text, limit=48):
    """A file-name-safe fragment of a prompt: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def next_free_number(out_dir):
    """1 + the highest NNNN_ number of the images already in out_dir (0 for a new folder)."""
    numbers = [int(m[1]) for p in out_dir.glob("*.png") if (m := re.match(r"(\d+)_", p.name))]
    return max(numbers, default=-1) + 1


def read_prompts(args):
    prompts = list(args.prompt)
    if args.txt_file:
        path = Path(args.txt_file)
        if not path.is_file():
            raise FileNotFoundError(f"--txt_file {path}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise PromptError("no prompts: give --prompt TEXT (repeatable) or --txt_file FILE")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (PromptError, ConfigError, CheckpointError, DataError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


def run(args):
    cfg = load_config(args.config, args.cfg_options) if args.config else None
    if cfg is None and args.image_size is None and not Path(args.model_path).is_dir():
        raise ValueError("give --image_size (released models) or --config to describe the model")
    prompts = read_prompts(args)
    loras = pair_lora_scales(args.lora, args.lora_scale)
    # Load on the CPU, encode every prompt with T5 (on --t5_device), free T5, then move the transformer to the
    # device: the two never share the GPU.
    pipe = load_pipeline(args.model_path, config=cfg, image_size=args.image_size, t5_path=args.t5_path,
                         vae_path=args.vae_path, device="cpu", dtype=DTYPES[args.dtype],
                         t5_device=args.t5_device or args.device, use_ema=not args.no_ema, loras=loras,
                         merge_loras=args.lora_merge)
    jobs = []
    for i, text in enumerate(prompts):
        prompt, height, width = parse_prompt(text, pipe.image_size, pipe.multi_scale)
        jobs.append(PromptJob(prompt, height, width, args.seed + i))
    encoded = [pipe.text_encoder.get_text_embeddings([job.prompt]) for job in jobs]
    negative = pipe.text_encoder.get_text_embeddings([args.negative_prompt]) if args.negative_prompt else None
    pipe.free_text_encoder()
    pipe.to(args.device)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = args.step or DEFAULT_STEPS[args.sampling_algo]
    first = next_free_number(out_dir)  # an earlier run's images in this folder are kept, never overwritten
    with open(out_dir / "metadata.jsonl", "a", encoding="utf-8") as meta:
        for start in range(0, len(jobs), args.bs):
            group = list(range(start, min(start + args.bs, len(jobs))))
            # a batch shares one size; sample size groups separately
            for size in sorted({(jobs[i].height, jobs[i].width) for i in group}):
                members = [i for i in group if (jobs[i].height, jobs[i].width) == size]
                features = torch.cat([encoded[i][0] for i in members]).to(args.device)
                mask = torch.cat([encoded[i][1] for i in members]).to(args.device)
                neg = None if negative is None else tuple(t.to(args.device) for t in negative)
                images = pipe.sample(features, mask, size[0], size[1], [jobs[i].seed for i in members],
                                        args.sampling_algo, steps, args.cfg_scale, negative=neg,
                                        cfg_compat=args.cfg_compat)
                for i, image in zip(members, images):
                    job = jobs[i]
                    path = out_dir / f"{first + i:04d}_{slug(job.prompt)}_s{job.seed}.png"
                    save_png(path, to_pil_image(image.cpu()))
                    meta.write(json.dumps({"file": path.name, "prompt": job.prompt, "seed": job.seed,
                                           "sampler": args.sampling_algo, "steps": steps, "cfg_scale": args.cfg_scale,
                                           "height": job.height, "width": job.width,
                                           "negative_prompt": args.negative_prompt,
                                           "checkpoint": str(args.model_path),
                                           "loras": [{"path": p, "scale": w} for p, w in loras],
                                           "lora_merge": args.lora_merge}) + "\n")
                    meta.flush()
                    print(f"wrote {path}")
    print(f"{len(jobs)} images and metadata.jsonl in {out_dir}")


if __name__ == "__main__":
    main()
