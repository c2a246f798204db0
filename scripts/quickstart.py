"""The project's main job on its embedded default: train a small PixArt on the toy-shapes recipe and sample it.

  python scripts/quickstart.py
  python scripts/quickstart.py --seed 1 --out output/quickstart_seed1     # another training seed

Renders the toy dataset, extracts its features with the shipped tiny T5 and VAE (pretrained/toy; rebuilt by
tools/build_toy_encoders.py only where the config names missing folders), trains
configs/pixart_config/PixArt_toy_shapes.py for the config's max_steps, samples held-out prompts (validation scenes,
and scenes with colour-shape pairs no training image has), and writes output/quickstart/samples.png (a labelled grid)
and output/quickstart/metrics.json (alignment accuracies measured by reading the shapes back out of the images,
and per described kind what it was read as).
Every stage runs on exactly --threads CPU threads with deterministic algorithms, so a given seed and thread count
give the same figures and images however busy the machine is. Re-running reuses every finished stage (training
resumes from its newest checkpoint).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json
import subprocess
import time

from diffusion.utils.arguments import finite_float, int_at_least, positive_int
from diffusion.utils.config import add_cfg_options_argument

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pixart_config/PixArt_toy_shapes.py"
OUT = Path("output/quickstart")
QUICKSTART_RUN = OUT / "train"  # the quickstart's training run: the base model of the toy proofs
SEED_STRIDE = 1000  # sampling seeds: validation prompts 0, 1, ...; unseen prompts 1000, 1001, ...
GRID_COLUMNS = 8
SAMPLERS = ("iddpm", "dpm-solver", "sa-solver")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps (default: the config's max_steps, 5000)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the config's, 0)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of every stage (default 2: the README's figures; results are bitwise "
                             "reproducible for a fixed thread count, not across counts)")
    parser.add_argument("--num-prompts", type=int_at_least(2), default=128,
                        help="held-out prompts sampled and scored, half validation, half unseen pairs; the grid "
                             f"shows the first {GRID_COLUMNS} of each (default 128)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="iddpm",
                        help="sampler (default iddpm: 100 learned-variance steps; its noise corrects what a few "
                             "minutes of training leave wrong, measured in the README)")
    parser.add_argument("--sample-steps", type=positive_int, default=None,
                        help="sampler steps (default: 100 for iddpm, 20 for dpm-solver, 25 for sa-solver)")
    parser.add_argument("--cfg-scale", type=finite_float, default=None,
                        help="guidance scale (default: the config's, 3)")
    parser.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT})")
    parser.add_argument("--num-train", type=positive_int, default=4000,
                        help="training images of a new toy dataset (default 4000; an existing one is kept)")
    parser.add_argument("--vae-steps", type=positive_int, default=4000,
                        help="training steps of a toy VAE built because the config names a missing folder (default "
                             "4000, as the shipped one)")
    add_cfg_options_argument(parser)
    args = parser.parse_args(argv)
    return args


def cli_cfg_options(options):
    """--cfg-options as the tools take them: KEY=repr(value) parses back to the same value."""
    return ["--cfg-options", *(f"{key}={value!r}" for key, value in options.items())] if options else []


def stage(name):
    print(f"\n== {name}", flush=True)
    return time.perf_counter()


def run_tool(*args):
    """Run one of tools/*.py in its own process, from the repository root, failing loudly."""
    command = [sys.executable, *map(str, args)]
    print("$ " + " ".join(command[1:]), flush=True)
    subprocess.run(command, cwd=REPO, check=True)


def main(argv=None):
    args = parse_args(argv)
    from diffusion.data.toy_shapes import format_kind_confusion
    from diffusion.utils.config import load_config
    from diffusion.utils.cpu import RECIPE_THREADS, numerics_record, pin_cpu_numerics
    from diffusion.utils.fileio import atomic_write_text
    threads = pin_cpu_numerics(args.threads or RECIPE_THREADS)
    out = REPO / args.out
    overrides = dict(args.cfg_options or {})
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    tool_options = [*cli_cfg_options(overrides), "--threads", str(threads)]
    cfg = load_config(REPO / CONFIG, {**overrides, "eval_interval": 0})
    encoders = (REPO / cfg.t5_pretrained).parent
    if (REPO / cfg.vae_pretrained).parent != encoders:
        sys.exit(f"error: t5_pretrained ({cfg.t5_pretrained}) and vae_pretrained ({cfg.vae_pretrained}) must share "
                 f"a folder: tools/build_toy_encoders.py writes t5/ and vae/ side by side")
    timings = {}

    start = stage("1/5 toy dataset")
    dataset = REPO / cfg.data_root / cfg.data.root
    if not (dataset / "partition" / "data_info.json").is_file():
        run_tool("tools/make_toy_dataset.py", "--out", dataset, "--num-train", args.num_train)
    else:
        print(f"found {dataset}")
    timings["dataset_s"] = time.perf_counter() - start

    start = stage("2/5 tiny T5 and VAE")
    if not (REPO / cfg.t5_pretrained / "config.json").is_file() or not (REPO / cfg.vae_pretrained / "config.json").is_file():
        run_tool("tools/build_toy_encoders.py", "--data", dataset, "--config", CONFIG, "--out", encoders,
                 "--vae-steps", args.vae_steps, *tool_options)
    else:
        print(f"found {cfg.t5_pretrained} and {cfg.vae_pretrained}")  # the shipped ones, unless the config says otherwise
    timings["encoders_s"] = time.perf_counter() - start

    start = stage("3/5 features (complete files are skipped)")
    run_tool("tools/extract_features.py", CONFIG, *tool_options)
    timings["features_s"] = time.perf_counter() - start

    start = stage(f"4/5 training {cfg.max_steps} steps")
    result = train_toy(cfg, out / "train")
    timings["train_s"] = time.perf_counter() - start

    start = stage("5/5 sampling held-out prompts")
    metrics = sample_and_score(cfg, result, dataset, out, args)
    timings["sample_s"] = time.perf_counter() - start
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["total_s"] = round(sum(timings.values()), 1)
    metrics["numerics"] = numerics_record(threads, cfg.seed)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))

    print(f"\nwrote {out / 'samples.png'} and {out / 'metrics.json'} in {metrics['total_s']:.0f} s "
          f"(seed {cfg.seed}, {threads} threads)")
    for split in ("val", "unseen"):
        for subset, label in (("all_shapes", f"{split} prompts"), ("held_out_pairs", "  their held-out pairs")):
            scores = metrics["alignment"][split][subset]
            if scores is not None:
                print(f"  {label:22s} colour {scores['colour']:.2f}, shape {scores['kind']:.2f}, "
                      f"position {scores['position']:.2f}, size {scores['size']:.2f}, count {scores['count']:.2f}, "
                      f"background {scores['background']:.2f}, all {scores['all']:.2f}")
        print(f"  {split} shapes by kind:")
        print("\n".join("    " + line for line in format_kind_confusion(metrics["alignment"][split]["kind_confusion"])))
    print("open the demo on this model:  python scripts/interface.py   (then http://127.0.0.1:7860)")


def quickstart_model(path=None, flag="--base"):
    """The toy checkpoint a proof starts from: `path` (the script's `flag`) when given, else the newest checkpoint of
    the quickstart's training run (QUICKSTART_RUN); exits naming what is missing."""
    from diffusion.train.state import list_checkpoints
    if path is not None:
        if not Path(path).is_file():
            sys.exit(f"error: {flag} {path}: no such file; give an existing checkpoint, or leave {flag} out to use "
                     f"the newest in {QUICKSTART_RUN / 'checkpoints'} (run python scripts/quickstart.py first)")
        return Path(path)
    found = list_checkpoints(REPO / QUICKSTART_RUN)
    if not found:
        sys.exit(f"error: no checkpoint in {QUICKSTART_RUN / 'checkpoints'}: run python scripts/quickstart.py first, "
                 f"or give {flag} CKPT")
    return found[-1]


def train_toy(cfg, work_dir, load_from=None, report_to="tensorboard"):
    """Train (or resume, or find finished) `cfg` in `work_dir`, with the config's flavour; `load_from`: the weights it
    starts from (a ControlNet's base, a teacher). Returns {"checkpoint", "losses"} (no losses: found finished); a run
    stopped by a signal exits, saying so."""
    from diffusion.train.core import TrainOptions, train
    from diffusion.train.state import checkpoint_step, list_checkpoints
    done = list_checkpoints(REPO / work_dir)
    if done and checkpoint_step(done[-1]) >= cfg.max_steps:
        print(f"found {done[-1]}")
        return {"checkpoint": done[-1], "losses": []}
    options = TrainOptions(work_dir=str(REPO / work_dir), resume_from="auto", report_to=report_to,
                           load_from=None if load_from is None else str(load_from))
    result = train(cfg.with_overrides({"data_root": str(REPO / cfg.data_root)}), options)  # the config's flavour
    if result.stopped_by_signal:  # a stopped run is not a trained model: nothing after it may score it as one
        sys.exit(f"training stopped by a signal at step {result.global_step} of {cfg.max_steps} (checkpoint "
                 f"{result.last_checkpoint}); run the same command again to resume")
    return {"checkpoint": result.last_checkpoint, "losses": result.losses}


def sample_and_score(cfg, trained, dataset, out, args):
    from diffusion.data.toy_shapes import MANIFEST, alignment_report, parse_caption
    from diffusion.pipeline import load_pipeline
    from torchvision.transforms.functional import to_pil_image

    per_split = args.num_prompts // 2
    steps = args.sample_steps or (100 if args.sampler == "iddpm" else None)
    cfg_scale = cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale
    prompts = held_out_prompts(dataset, per_split)
    pipe = load_pipeline(trained["checkpoint"], config=cfg, t5_path=REPO / cfg.t5_pretrained,
                         vae_path=REPO / cfg.vae_pretrained)
    held_out = json.loads((dataset / MANIFEST).read_text())["held_out_pairs"]
    images, scores = {}, {}
    for row, (split, texts) in enumerate(prompts.items()):
        features, mask = pipe.text_encoder.get_text_embeddings(texts)
        seeds = [SEED_STRIDE * row + i for i in range(len(texts))]  # every image of the grid has its own noise
        batch = pipe.sample(features, mask, cfg.image_size, cfg.image_size, seeds, args.sampler, steps, cfg_scale)
        images[split] = [to_pil_image(image) for image in batch]
        scores[split] = alignment_report(images[split], [parse_caption(t) for t in texts], held_out)
    write_labelled_grid({f"{k} prompts": v[:GRID_COLUMNS] for k, v in images.items()},
                        {f"{k} prompts": v[:GRID_COLUMNS] for k, v in prompts.items()}, out / "samples.png")
    losses = trained["losses"]
    return {"checkpoint": str(trained["checkpoint"]), "train_steps": cfg.max_steps,
            "sampler": {"name": args.sampler, "steps": steps, "cfg_scale": cfg_scale},
            "loss_first": losses[0][1] if losses else None, "loss_last": losses[-1][1] if losses else None,
            "alignment": scores, "prompts": prompts}


def held_out_prompts(dataset, per_split):
    """{split: the first `per_split` prompts} of the toy dataset's val and unseen splits: the prompts the quickstart
    scores (their sampling seeds: SEED_STRIDE * split index + i)."""
    return {split: [r["prompt"] for r in json.loads((dataset / "partition" / f"{split}_info.json").read_text())]
            [:per_split] for split in ("val", "unseen")}


def write_labelled_grid(images, prompts, path, scale=3):
    """One row per key of `images` (the key is the row's title), each image enlarged and captioned with its text in
    `prompts` under the same key (wrapped)."""
    import textwrap

    from PIL import Image, ImageDraw

    from diffusion.utils.fileio import save_png
    cell = next(iter(images.values()))[0].width * scale
    columns = max(len(v) for v in images.values())
    label_h = 56
    grid = Image.new("RGB", (columns * (cell + 8) + 8, len(images) * (cell + label_h + 24) + 8), "white")
    draw = ImageDraw.Draw(grid)
    for row, title in enumerate(images):
        top = 8 + row * (cell + label_h + 24)
        draw.text((8, top), title, fill="black")
        for col, (image, text) in enumerate(zip(images[title], prompts[title])):
            left = 8 + col * (cell + 8)
            grid.paste(image.resize((cell, cell), Image.NEAREST), (left, top + 16))
            draw.multiline_text((left, top + 20 + cell), "\n".join(textwrap.wrap(text, width=cell // 6)[:4]),
                                fill="black", spacing=1)
    save_png(path, grid)


if __name__ == "__main__":
    main()
