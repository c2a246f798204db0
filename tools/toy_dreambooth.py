"""DreamBooth and LoRA on the toy model: teach the quickstart's model a shape kind it has never seen, and a
colour-kind pair it was never shown, and measure what it learns and what it forgets.

1. New kind: NUM_INSTANCE images of bars (toy_shapes.NEW_KINDS: the dataset never draws one) in INSTANCE_COLOURS
   at INSTANCE_POSITIONS, captioned in the DreamBooth paper's form 'a [V] [class noun]': the rare word TOKEN before
   CLASS_WORD, the known kind nearest a bar, in the kind's place ('a large red sks square on the left, on a gray
   background'; caption files beside the images, one image on the config's instance_prompt). DreamBooth of every
   weight (configs/pixart_app_config/PixArt_toy_dreambooth.py), with prior preservation and without. The class
   prompts are the instance prompts without TOKEN (the same scenes with a square: what TOKEN changes) and training
   captions (the rest of the vocabulary), NUM_CLASS_PROMPTS in all, their images made by the base model. Measured
   on bars of the other colours at the other positions, both sizes, on 'TOKEN CLASS_WORD'; and on the base
   vocabulary (the dataset's val prompts), against the base model, with a judge that also knows bars (a circle
   drawn as a bar counts as wrong).
2. Held-out pair: a LoRA adapter (DreamBooth-LoRA without prior preservation: plain LoRA fine-tuning on a handful
   of captioned images) on NUM_INSTANCE renders of the dataset's first held-out colour-kind pair at
   INSTANCE_POSITIONS; measured on that pair at the other positions, against the base model.

Writes OUT/metrics.json and OUT/dreambooth.png (rows: instance images, then per model the new-kind prompts, and
the held-out pair before and after LoRA). Every stage that has finished is reused when run again with the same
inputs (OUT/inputs.json: base model, prompts, --cfg-options); an OUT of other inputs is refused. Example:
  python tools/toy_dreambooth.py        # after python scripts/quickstart.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json
import time

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pixart_app_config/PixArt_toy_dreambooth.py"
TOKEN = "sks"
NEW_KIND = "bar"
# 'sks square' rather than 'sks' alone: the model already draws a square at every position and colour, and TOKEN
# only has to stretch it (new kind 0.25 against 0.09 with prior preservation, measured; README "DreamBooth")
CLASS_WORD = "square"
NUM_INSTANCE = 8
INSTANCE_COLOURS = ("red", "blue")
INSTANCE_POSITIONS = ("left", "center", "top", "bottom right")
NUM_CLASS_PROMPTS = 32
NUM_EVAL = 64
EVAL_SEED = 5000  # sampling seeds of the evaluation prompts: EVAL_SEED + i (the quickstart's are below 2000)
GRID_COLUMNS = 8
LORA_RANK = 8
LORA_LR = 5e-3  # an adapter starts at zero and moves far less per step than the weights: 10x the DreamBooth lr


def parse_args(argv=None):
    from diffusion.utils.arguments import positive_int
    from diffusion.utils.config import add_cfg_options_argument
    from scripts.quickstart import QUICKSTART_RUN
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=None,
                        help="the toy model to fine-tune (default: the newest checkpoint of the quickstart, "
                        f"{QUICKSTART_RUN}/checkpoints)")
    parser.add_argument("--data", default="data/toy_shapes", help="the toy dataset (its val prompts, training "
                        "captions and held-out pairs; default data/toy_shapes)")
    parser.add_argument("--out", default="output/toy_dreambooth", help="output folder (default output/toy_dreambooth)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default 2, as the quickstart)")
    add_cfg_options_argument(parser)
    return parser.parse_args(argv)


def prompt_of(scene):
    """The scene's caption with 'TOKEN CLASS_WORD' for every new-kind word."""
    from diffusion.data.toy_shapes import caption
    return " ".join(f"{TOKEN} {CLASS_WORD}" if word == NEW_KIND else word for word in caption(scene).split(" "))


def class_prompt_of(prompt):
    """An instance prompt's class prompt: the same words without TOKEN."""
    return prompt.replace(f"{TOKEN} {CLASS_WORD}", CLASS_WORD)


def instance_scenes(kind=NEW_KIND, colours=INSTANCE_COLOURS):
    """NUM_INSTANCE one-shape scenes of `kind` over `colours` x INSTANCE_POSITIONS x both sizes (the first: large,
    in the center on gray, the config's instance prompt)."""
    from diffusion.data.toy_shapes import BACKGROUNDS, SIZES, Scene, Shape
    positions = ("center",) + tuple(p for p in INSTANCE_POSITIONS if p != "center")
    scenes = []
    for i in range(NUM_INSTANCE):  # every colour at every position, sizes and backgrounds alternating
        scenes.append(Scene(list(BACKGROUNDS)[(i + 1) % len(BACKGROUNDS)],
                            (Shape(colours[(i // len(positions)) % len(colours)], kind,
                                   list(SIZES)[(i + 1 + i // len(positions)) % len(SIZES)],
                                   positions[i % len(positions)]),)))
    return scenes


def evaluation_scenes(kind, colours, seed):
    """NUM_EVAL one-shape scenes of `kind` in `colours` at the positions no instance image has, both sizes, every
    background, drawn from `seed`."""
    import numpy as np

    from diffusion.data.toy_shapes import BACKGROUNDS, POSITIONS, SIZES, Scene, Shape
    rng = np.random.default_rng(seed)
    positions = [p for p in POSITIONS.values() if p not in INSTANCE_POSITIONS]
    pick = lambda names: list(names)[int(rng.integers(len(names)))]  # noqa: E731
    return [Scene(pick(BACKGROUNDS), (Shape(pick(colours), kind, pick(SIZES), pick(positions)),))
            for _ in range(NUM_EVAL)]


def sha256_of(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def claim_out_folder(out, inputs):
    """Record what OUT's runs are made from (OUT/inputs.json), or check that an earlier start recorded the same:
    finished stages are reused only for the same inputs, and a folder of other inputs is never written over."""
    from diffusion.utils.fileio import atomic_write_text
    record = out / "inputs.json"
    text = json.dumps(inputs, indent=2, sort_keys=True, default=str)
    if record.is_file():
        if record.read_text() != text:
            sys.exit(f"error: {out} holds runs made from other inputs (another base model, prompts or --cfg-options: "
                     f"see {record}); give another --out")
    elif out.exists() and any(out.iterdir()):
        sys.exit(f"error: {out} is not empty and has no {record.name}: it is not a run of this tool's; give another "
                 "--out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record, text)


def write_instances(folder, scenes, prompts, default_prompt):
    """The instance images and, for those whose prompt is not `default_prompt`, their caption files."""
    from diffusion.data.toy_shapes import render_scene
    from diffusion.train.dreambooth import caption_file
    from diffusion.utils.fileio import atomic_write_text, save_png
    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, prompt) in enumerate(zip(scenes, prompts, strict=True)):
        path = folder / f"instance_{i:02d}.png"
        if prompt != default_prompt:
            atomic_write_text(caption_file(path), prompt)
        if not path.exists():
            save_png(path, render_scene(scene, 64))
    return folder


def fine_tune(name, out, base, overrides):
    """Train one run into OUT/runs/NAME (reused when finished); returns (checkpoint, seconds or None, config)."""
    from diffusion.utils.config import load_config
    from scripts.quickstart import train_toy
    cfg = load_config(REPO / CONFIG, {"work_dir": str(out / "runs" / name), "eval_interval": 0, **overrides})
    start = time.perf_counter()
    result = train_toy(cfg, Path(cfg.work_dir), load_from=base)
    return result["checkpoint"], (time.perf_counter() - start if result["losses"] else None), cfg


def sample(cfg, checkpoint, prompts, seed, loras=()):
    from torchvision.transforms.functional import to_pil_image

    from diffusion.pipeline import load_pipeline
    pipe = load_pipeline(checkpoint, config=cfg, t5_path=REPO / cfg.t5_pretrained,
                         vae_path=REPO / cfg.vae_pretrained, loras=loras)
    features, mask = pipe.text_encoder.get_text_embeddings(prompts)
    images = pipe.sample(features, mask, cfg.image_size, cfg.image_size, [seed + i for i in range(len(prompts))],
                         "iddpm", 100, cfg.cfg_scale)
    return [to_pil_image(image) for image in images]


def score(images, scenes, only=None):
    from diffusion.data.toy_shapes import KINDS, NEW_KINDS, alignment_scores
    kinds = KINDS + NEW_KINDS
    scores = alignment_scores(images, scenes, only=only, kinds=kinds)
    return {k: round(v, 4) for k, v in scores.items()}


def main(argv=None):
    args = parse_args(argv)
    from diffusion.data.toy_shapes import COLOURS, MANIFEST, caption, parse_caption
    from diffusion.utils.cpu import RECIPE_THREADS, numerics_record, pin_cpu_numerics
    from diffusion.utils.fileio import atomic_write_text
    threads = pin_cpu_numerics(args.threads or RECIPE_THREADS)
    out, data = REPO / args.out, REPO / args.data
    from scripts.quickstart import quickstart_model, write_labelled_grid
    base = quickstart_model(args.base, "--base")
    if not (data / MANIFEST).is_file():
        sys.exit(f"error: {data} is not a toy dataset (no {MANIFEST}): give the quickstart's, --data data/toy_shapes")
    overrides = dict(args.cfg_options or {})
    manifest = json.loads((data / MANIFEST).read_text())
    partition = data / "partition"
    val_prompts = [r["prompt"] for r in json.loads((partition / "val_info.json").read_text())][:NUM_EVAL]
    training_captions = [r["prompt"] for r in json.loads((partition / "data_info.json").read_text())]
    timings, started = {}, time.perf_counter()

    # the new kind, taught under TOKEN
    scenes = instance_scenes()
    prompts = [prompt_of(s) for s in scenes]
    class_prompts = [class_prompt_of(p) for p in prompts] + training_captions[:NUM_CLASS_PROMPTS - len(prompts)]
    new_colours = [c for c in COLOURS if c not in INSTANCE_COLOURS]
    kind_scenes = evaluation_scenes(NEW_KIND, new_colours, seed=1)
    kind_prompts = [prompt_of(s) for s in kind_scenes]
    # the held-out pair, taught by name
    colour, kind = manifest["held_out_pairs"][0]
    pair_scenes = instance_scenes(kind, (colour,))
    pair_prompts = [caption(s) for s in pair_scenes]
    pair_eval = evaluation_scenes(kind, (colour,), seed=2)
    pair_eval_prompts = [caption(s) for s in pair_eval]
    val_scenes = [parse_caption(p) for p in val_prompts]

    common = {"dreambooth.instance_prompt": prompts[0], "dreambooth.instance_data_dir": str(out / "instance"),
              "dreambooth.class_prompt": class_prompts, "dreambooth.num_class_images": NUM_CLASS_PROMPTS,
              "dreambooth.cache_dir": str(out / "cache"), **overrides}
    runs = {
        "prior": dict(common, **{"dreambooth.with_prior_preservation": True}),
        "no_prior": dict(common, **{"dreambooth.with_prior_preservation": False}),
        "pair_lora": dict(common, **{"dreambooth.with_prior_preservation": False,
                                     "dreambooth.instance_data_dir": str(out / "pair"),
                                     "dreambooth.instance_prompt": pair_prompts[0],
                                     "lora": dict(rank=LORA_RANK, alpha=LORA_RANK),
                                     "optimizer.lr": LORA_LR}),
    }
    claim_out_folder(out, {"base": str(base), "base_sha256": sha256_of(base), "runs": runs,
                           "instance_prompts": prompts, "pair_prompts": pair_prompts})
    write_instances(out / "instance", scenes, prompts, prompts[0])
    write_instances(out / "pair", pair_scenes, pair_prompts, pair_prompts[0])
    checkpoints, cfg = {}, None
    for name, run_overrides in runs.items():
        print(f"\n== fine-tuning: {name}")
        checkpoints[name], seconds, cfg = fine_tune(name, out, base, run_overrides)
        timings[f"train_{name}_s"] = None if seconds is None else round(seconds, 1)

    print("\n== sampling and scoring")
    start = time.perf_counter()
    from PIL import Image
    results = {}
    grid = {"instance images": [Image.open(p).convert("RGB") for p in sorted((out / "instance").glob("*.png"))]}
    pair_only = lambda s: (s.colour, s.kind) == (colour, kind)  # noqa: E731
    for name, checkpoint in (("base", base), ("prior", checkpoints["prior"]), ("no_prior", checkpoints["no_prior"])):
        images = sample(cfg, checkpoint, kind_prompts + val_prompts, EVAL_SEED)
        results[name] = {"new_kind": score(images[:NUM_EVAL], kind_scenes),
                         "base_vocabulary": score(images[NUM_EVAL:], val_scenes)}
        grid[f"{name}: {TOKEN} prompts"] = images[:GRID_COLUMNS]
    for name, loras, extra in (("base", (), []), ("pair_lora", ((checkpoints["pair_lora"], 1.0),), val_prompts)):
        images = sample(cfg, base, pair_eval_prompts + extra, EVAL_SEED, loras=loras)  # base: its val scores above
        results.setdefault(name, {})["held_out_pair"] = score(images[:NUM_EVAL], pair_eval, only=pair_only)
        if extra:
            results[name]["base_vocabulary"] = score(images[NUM_EVAL:], val_scenes)
        grid[f"{name}: {colour} {kind}"] = images[:GRID_COLUMNS]
    timings["sample_s"] = round(time.perf_counter() - start, 1)
    timings["total_s"] = round(time.perf_counter() - started, 1)

    labels = {"instance images": prompts, **{k: (pair_eval_prompts if k.endswith(f"{colour} {kind}")
                                                 else kind_prompts)[:GRID_COLUMNS] for k in grid if k != "instance images"}}
    write_labelled_grid(grid, labels, out / "dreambooth.png")
    metrics = {"base": str(base), "token": TOKEN, "class_word": CLASS_WORD, "new_kind": NEW_KIND,
               "held_out_pair": [colour, kind], "instance_prompts": prompts, "class_prompts": class_prompts,
               "new_kind_prompts": kind_prompts, "pair_prompts": pair_prompts,
               "pair_eval_prompts": pair_eval_prompts, "results": results, "timings_s": timings,
               "numerics": numerics_record(threads)}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    print(f"\nwrote {out / 'dreambooth.png'} and {out / 'metrics.json'} ({timings['total_s']:.0f} s, {threads} threads)")
    for name, parts in results.items():
        for part, s in parts.items():
            print(f"  {name:9s} {part:16s} colour {s['colour']:.2f}, kind {s['kind']:.2f}, position "
                  f"{s['position']:.2f}, size {s['size']:.2f}, count {s['count']:.2f}")


if __name__ == "__main__":
    main()
