"""Sample images from prompts with a PixArt checkpoint (batch CLI).

  python scripts/inference.py --model_path PixArt-XL-2-1024-MS --prompt "a cactus in the Sahara --ar 4:3"  # downloads
  python scripts/inference.py --image_size 1024 --model_path output/pretrained_models/PixArt-XL-2-1024-MS.pth \\
      --txt_file prompts.txt --sampling_algo dpm-solver --step 20 --cfg_scale 4.5 --seed 0
  python scripts/inference.py --config configs/pixart_config/PixArt_toy_shapes.py \\
      --model_path output/toy/checkpoints/epoch_10_step_2000.pth --prompt "a red circle on a blue background"

Distilled models (LCM: an LCM training checkpoint, an LCM-LoRA one as --lora, the PixArt-LCM-XL-2-1024-MS pipeline
folder) sample with the lcm sampler by default: 4 steps (1-8 are its range), no guidance.
A prompt may end in `--ar h:w` / `--aspect_ratio h:w` (nearest bucket of a multi-scale model) or `--hw H:W`.
With `--lora PATH [--lora_scale S]` (repeatable) LoRA adapters act on the model; `--lora_merge` folds them in.
Prompt i is sampled from seed + i, so an image does not depend on the batch size. Every prompt (its size flag,
its token count against the model's caption length) and every option is checked before any weights load. T5
encodes every prompt first and is freed before sampling (`--t5_device cpu` keeps it off the GPU altogether).
Images are numbered NNNN_ and never overwritten, also by runs writing into the same --output-dir at once.

ControlNet (PIXART-delta): with a ControlNet checkpoint (PixArt-XL-2-{512,1024}-ControlNet.pth), --control_image
steers every prompt: edges are taken from it by --condition (canny: no weights; hed: the annotators' HED network,
--hed_checkpoint; image: it already is an edge map), resized to each image's size, VAE-encoded and scaled;
--conditioning_scale scales the control (1 = the released behaviour, 0 = the base model).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import re

import torch
from torchvision.transforms.functional import to_pil_image

from diffusion.data.conditions import CONDITIONS, control_latent_of_image, read_condition_image
from diffusion.data.errors import DataError
from diffusion.model.hed import DEFAULT_HED_CHECKPOINT, load_hed
from diffusion.model.nets import ControlPixArtHalf
from diffusion.model.builder import is_multi_scale
from diffusion.model_zoo import resolve_model_argument
from diffusion.pipeline import (
    DEFAULT_STEPS,
    SAMPLERS,
    PromptError,
    PromptJob,
    check_prompt_length,
    check_steps,
    describe_transformer,
    is_distilled,
    load_pipeline,
    pair_lora_scales,
    load_tokenizer,
    parse_prompt,
)
from diffusion.sampling import get_sampler
from diffusion.release import DTYPES, RELEASED_IMAGE_SIZES, RELEASED_T5_DIR, RELEASED_VAE_DIR, VAE_DOWNSAMPLE
from diffusion.utils.checkpoint import CheckpointError
from diffusion.utils.config import ConfigError, add_cfg_options_argument, load_config
from diffusion.utils.arguments import MAX_SEED, device_name, finite_float, positive_int, seed_value
from diffusion.utils.outputs import OutputError, append_jsonl, prepare_output_dir, save_numbered_png


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_path", required=True,
                        help="a named model (PixArt-XL-2-1024-MS, ...: tools/download.py --list; downloaded on first "
                             "use, with its T5 and VAE), our checkpoint (EMA weights used when present), a released "
                             ".pth, a .safetensors file (diffusers' tensor names too), a diffusers "
                             "PixArtTransformer2DModel folder or a PixArtAlphaPipeline folder (its T5 and VAE used "
                             "unless --t5_path / --vae_path say otherwise)")
    parser.add_argument("--config", help="config describing the model, T5, VAE and scale factor (instead of "
                                         "--image_size, for models other than the released ones)")
    add_cfg_options_argument(parser)
    parser.add_argument("--image_size", type=int, choices=RELEASED_IMAGE_SIZES,
                        help="released XL/2 model at this size (1024 = the multi-scale model); a named model knows "
                             "its own")
    parser.add_argument("--t5_path", help="T5 encoder folder (or its parent holding t5-v1_1-xxl/); default: the "
                                          f"config's t5_pretrained, else {RELEASED_T5_DIR}")
    parser.add_argument("--vae_path", "--tokenizer_path", dest="vae_path",
                        help="VAE (diffusers AutoencoderKL) folder; --tokenizer_path is the reference's name for it. "
                             f"Default: the config's vae_pretrained, else {RELEASED_VAE_DIR}")
    parser.add_argument("--prompt", action="append", default=[],
                        help="a prompt (repeatable); one over the model's token limit is refused")
    parser.add_argument("--txt_file", help="a UTF-8 text file with one prompt per line (blank lines ignored)")
    parser.add_argument("--negative_prompt", default="",
                        help="caption used for the unconditional half of guidance (default: the null caption)")
    parser.add_argument("--sampling_algo", choices=SAMPLERS,
                        help="sampler (default: lcm, 4 steps without guidance, for distilled models: an LCM pipeline "
                             "folder, an LCM or LCM-LoRA training checkpoint; else dpm-solver)")
    parser.add_argument("--step", type=positive_int,
                        help=f"sampling steps (default: the sampler's, {DEFAULT_STEPS}; dpm-solver and sa-solver "
                             "take 2 or more)")
    parser.add_argument("--cfg_scale", type=finite_float, default=4.5,
                        help="classifier-free guidance scale (lcm samples without guidance: not used)")
    parser.add_argument("--cfg_compat", choices=("fixed", "official"), default="fixed",
                        help="iddpm only: 'official' reproduces the reference's guidance (channels 0-2; see README)")
    parser.add_argument("--seed", type=seed_value, default=0, help=f"prompt i uses seed + i (0 to {MAX_SEED})")
    parser.add_argument("--bs", type=positive_int, default=1, help="images sampled together (>= 1)")
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="output/samples",
                        help="where images and metadata.jsonl are written; images already there are kept, and "
                             "runs sharing the folder at the same time never overwrite each other's")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32" if not torch.cuda.is_available() else "fp16",
                        help="transformer dtype (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--t5_device", type=device_name,
                        help="device for T5 (default: --device); 'cpu' keeps the GPU for the transformer")
    parser.add_argument("--no_ema", action="store_true", help="use the live weights of a training checkpoint")
    parser.add_argument("--control_image", help="ControlNet checkpoints: the image whose edges steer every prompt")
    parser.add_argument("--condition", choices=CONDITIONS, default="canny",
                        help="how --control_image becomes the edge map: canny (OpenCV, no weights), hed (the released "
                             "models' training condition; needs --hed_checkpoint) or image (already an edge map)")
    parser.add_argument("--hed_checkpoint", default=str(DEFAULT_HED_CHECKPOINT),
                        help="the ControlNet annotators' ControlNetHED.pth, for --condition hed")
    parser.add_argument("--conditioning_scale", type=finite_float,
                        help="scale of the control residuals (default 1, the released behaviour; 0 = no control)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH",
                        help="LoRA adapter: a peft folder in diffusers' module names (tools/export_lora.py's, "
                             "PixArt-LCM-LoRA, ...) or a LoRA training checkpoint; repeatable, all act together")
    parser.add_argument("--lora_scale", action="append", type=finite_float, default=[], metavar="S",
                        help="scale of an adapter's update (default 1): none, or one per --lora in the same order")
    parser.add_argument("--lora_merge", action="store_true",
                        help="fold the adapters into the weights before sampling: as fast as no adapter, the same "
                             "images up to float rounding")
    return parser.parse_args(argv)


def slug(text, limit=48):
    """A file-name-safe fragment of a prompt: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def read_prompt_file(path):
    """[(where, prompt)] of the non-blank lines of a UTF-8 prompt file; where = 'FILE:LINE' (1-based)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--txt_file {path}: no such file")
    prompts = []
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise PromptError(f"--txt_file {path}:{number}: not UTF-8 text (byte 0x{line[err.start]:02x} at column "
                              f"{err.start + 1}); expected a UTF-8 text file, one prompt per line") from None
        if text.strip():
            prompts.append((f"{path}:{number}", text.strip()))
    if not prompts:
        raise PromptError(f"--txt_file {path} holds no prompt (it is empty or blank): expected one prompt per line")
    return prompts


def read_prompts(args):
    """[(where, prompt)]: the --prompt values ('--prompt N', 1-based), then the --txt_file lines."""
    prompts = [(f"--prompt {i}", text) for i, text in enumerate(args.prompt, 1)]
    if args.txt_file:
        prompts += read_prompt_file(args.txt_file)
    if not prompts:
        raise PromptError("no prompts: give --prompt TEXT (repeatable) or --txt_file FILE")
    return prompts


def plan_jobs(prompts, model, seed):
    """One PromptJob per prompt (prompt i samples from seed + i); a prompt the model cannot take is an error
    naming it."""
    jobs = []
    for i, (where, text) in enumerate(prompts):
        try:
            prompt, height, width = parse_prompt(text, model.input_size * VAE_DOWNSAMPLE, is_multi_scale(model))
        except PromptError as err:
            raise PromptError(f"{where}: {err}") from None
        jobs.append(PromptJob(prompt, height, width, seed + i))
    return jobs


def check_control_options(args):
    """(control image, HED network or None, conditioning scale) of the ControlNet options, checked before the model
    loads. Without --control_image the other ControlNet options are refused."""
    if args.control_image is None:
        if args.conditioning_scale is not None or args.condition != "canny":
            raise ValueError("--condition and --conditioning_scale steer a ControlNet: give --control_image too")
        return None, None, None
    image = read_condition_image(args.control_image, "--control_image")
    hed = load_hed(args.hed_checkpoint, args.device) if args.condition == "hed" else None
    return image, hed, 1.0 if args.conditioning_scale is None else args.conditioning_scale


def main(argv=None):
    args = parse_args(argv)
    try:
        # a named model (or its conventional path) is fetched first, so everything after reads a local path
        args.model_path, args.image_size = resolve_model_argument(args.model_path, args.image_size)
        run(args)
    except (PromptError, ConfigError, CheckpointError, DataError, OutputError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")


def run(args):
    # Everything a user typed is checked before any weights load: options, prompts, their sizes and token counts.
    sampler = args.sampling_algo or ("lcm" if is_distilled(args.model_path, args.lora) else "dpm-solver")
    steps = args.step if args.step is not None else DEFAULT_STEPS[sampler]
    try:
        check_steps(sampler, steps)
    except ValueError as err:
        raise ValueError(f"--step {steps}: {err}") from None
    prompts = read_prompts(args)
    loras = pair_lora_scales(args.lora, args.lora_scale)
    cfg = load_config(args.config, args.cfg_options) if args.config else None
    if cfg is None and args.image_size is None and not Path(args.model_path).is_dir():
        raise ValueError("give --image_size (released models) or --config to describe the model, or a named model "
                         "(python tools/download.py --list)")
    described = describe_transformer(args.model_path, config=cfg, image_size=args.image_size)
    jobs = plan_jobs(prompts, described, args.seed)
    tokenizer = load_tokenizer(args.t5_path, cfg, described, args.model_path)
    for (where, _), job in zip(prompts, jobs):
        check_prompt_length(tokenizer, job.prompt, where)
    if args.negative_prompt:
        check_prompt_length(tokenizer, args.negative_prompt, "--negative_prompt")
    control_image, hed, conditioning_scale = check_control_options(args)
    out_dir = prepare_output_dir(args.output_dir)

    # Load on the CPU, encode every prompt with T5 (on --t5_device), free T5, then move the transformer to the
    # device: the two never share the GPU.
    pipe = load_pipeline(args.model_path, config=cfg, image_size=args.image_size, t5_path=args.t5_path,
                         vae_path=args.vae_path, device="cpu", dtype=DTYPES[args.dtype],
                         t5_device=args.t5_device or args.device, use_ema=not args.no_ema, loras=loras,
                         merge_loras=args.lora_merge)
    encoded = [pipe.text_encoder.get_text_embeddings([job.prompt]) for job in jobs]
    negative = pipe.text_encoder.get_text_embeddings([args.negative_prompt]) if args.negative_prompt else None
    pipe.free_text_encoder()
    pipe.to(args.device)
    if control_image is not None and not isinstance(pipe.model, ControlPixArtHalf):
        raise ValueError(f"--control_image needs a ControlNet checkpoint (PixArt-XL-2-*-ControlNet.pth); "
                         f"{args.model_path} is a plain PixArt model")
    controls = {}  # (height, width) -> the control latent at that size
    written = 0
    for start in range(0, len(jobs), args.bs):
        group = list(range(start, min(start + args.bs, len(jobs))))
        images = {}
        # a batch shares one size; sample size groups separately, then write the images in prompt order
        for size in sorted({(jobs[i].height, jobs[i].width) for i in group}):
            members = [i for i in group if (jobs[i].height, jobs[i].width) == size]
            features = torch.cat([encoded[i][0] for i in members]).to(args.device)
            mask = torch.cat([encoded[i][1] for i in members]).to(args.device)
            neg = None if negative is None else tuple(t.to(args.device) for t in negative)
            extra = {}
            if control_image is not None:
                if size not in controls:
                    controls[size] = control_latent_of_image(control_image, pipe.vae, size[0], size[1],
                                                             pipe.scale_factor, args.condition, hed)
                extra = dict(c=controls[size], conditioning_scale=conditioning_scale)
            images.update(zip(members, pipe.sample(
                features, mask, size[0], size[1], [jobs[i].seed for i in members], sampler, steps,
                args.cfg_scale, negative=neg, cfg_compat=args.cfg_compat, extra_inputs=extra)))
        for i in group:
            job = jobs[i]
            # the number is claimed as the image is written, so runs sharing the folder never collide
            path = save_numbered_png(out_dir, lambda n: f"{n:04d}_{slug(job.prompt)}_s{job.seed}.png",
                                     to_pil_image(images[i].cpu()))
            append_jsonl(out_dir / "metadata.jsonl", {
                "file": path.name, "prompt": job.prompt, "seed": job.seed, "sampler": sampler,
                "steps": steps, "cfg_scale": args.cfg_scale if get_sampler(sampler).guided else None,
                "height": job.height, "width": job.width,
                "negative_prompt": args.negative_prompt, "checkpoint": str(args.model_path),
                "loras": [{"path": str(p), "scale": w} for p, w in loras], "lora_merge": args.lora_merge,
                **({} if control_image is None else {"control_image": str(args.control_image),
                                                    "condition": args.condition,
                                                    "conditioning_scale": conditioning_scale})})
            written += 1
            print(f"wrote {path}", flush=True)
    print(f"{written} images and metadata.jsonl in {out_dir}")


if __name__ == "__main__":
    main()
