"""Distil the quickstart's toy model into a 4-step latent consistency model (PIXART-delta's LCM) and score it.

  python scripts/quickstart.py      # the teacher, once
  python scripts/lcm_toy.py         # distils it (configs/pixart_config/PixArt_toy_lcm.py), then scores

Trains configs/pixart_config/PixArt_toy_lcm.py from the teacher (--teacher, default the newest checkpoint of
output/quickstart/train) into OUT/train, then samples the quickstart's held-out prompts (the same prompts and seeds:
validation scenes and scenes with held-out colour-kind pairs) with the teacher (DPM-Solver++ at 20 and at 4 steps,
guided at the quickstart's usual scale, 1 + the config's LCM guidance w) and with the student (the lcm sampler at
4, 2 and 1 steps, no guidance), reads the shapes back out of the images (tools/eval_toy_alignment.py's judge) and
writes OUT/metrics.json (accuracies, the distillation's wall time, steps and threads, the load on the machine)
and OUT/samples.png (rows: teacher 20 | teacher 4 | student 4 | student 2). Every stage runs on exactly --threads
CPU threads with deterministic algorithms; re-running reuses a finished distillation.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json
import os
import time

from diffusion.utils.arguments import int_at_least, positive_int
from diffusion.utils.config import add_cfg_options_argument
from scripts.quickstart import QUICKSTART_RUN, quickstart_model, train_toy

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/pixart_config/PixArt_toy_lcm.py"
OUT = Path("output/lcm_toy")
# (label, model, sampler, steps): the rows of the table; the grid shows GRID_ROWS of them
RUNS = [("teacher, DPM-Solver++ 20 steps", "teacher", "dpm-solver", 20),
        ("teacher, DPM-Solver++ 4 steps", "teacher", "dpm-solver", 4),
        ("student, LCM 4 steps", "student", "lcm", 4),
        ("student, LCM 2 steps", "student", "lcm", 2),
        ("student, LCM 1 step", "student", "lcm", 1)]
GRID_ROWS = 4
GRID_PROMPTS = 4  # of each split


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="the teacher's checkpoint (default: the newest of "
                                          f"{QUICKSTART_RUN}/checkpoints, which scripts/quickstart.py writes)")
    parser.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT})")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="distillation steps (default: the config's max_steps)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of every stage (default 2; results are bitwise reproducible for a fixed "
                             "thread count, not across counts)")
    parser.add_argument("--num-prompts", type=int_at_least(2), default=128,
                        help="held-out prompts sampled and scored, half validation, half unseen pairs (default 128, "
                             "the quickstart's)")
    parser.add_argument("--student-weights", choices=("ema", "live"), default="ema",
                        help="the student's weights sampled: its EMA (default) or the live ones")
    add_cfg_options_argument(parser)
    args = parser.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    from diffusion.utils.config import load_config
    from diffusion.utils.cpu import RECIPE_THREADS, numerics_record, pin_cpu_numerics
    from diffusion.utils.fileio import atomic_write_text
    threads = pin_cpu_numerics(args.threads or RECIPE_THREADS)
    out = REPO / args.out
    teacher = quickstart_model(args.teacher, "--teacher")
    overrides = dict(args.cfg_options or {})
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    cfg = load_config(REPO / CONFIG, overrides)
    cfg = cfg.with_overrides({"data_root": str(REPO / cfg.data_root)})

    print(f"== distilling {teacher} for {cfg.max_steps} steps ({threads} threads)", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    student = train_toy(cfg, out / "train", load_from=teacher, report_to="none")  # found if finished, else resumed
    trained = bool(student["losses"])
    distil_s = time.perf_counter() - start
    load_after = os.getloadavg()

    print("== sampling and scoring the held-out prompts", flush=True)
    start = time.perf_counter()
    scores, images, prompts = sample_and_score(cfg, teacher, student["checkpoint"], args)
    sample_s = time.perf_counter() - start
    grid = {label: images[label] for label, *_ in RUNS[:GRID_ROWS]}
    write_grid(grid, prompts, out / "samples.png")
    metrics = {
        "teacher": str(teacher), "student": str(student["checkpoint"]), "student_weights": args.student_weights,
        "distillation": {"steps": cfg.max_steps, "wall_s": round(distil_s, 1) if trained else None,
                         "s_per_step": round(distil_s / cfg.max_steps, 3) if trained else None,
                         "loss_first": student["losses"][0][1] if student["losses"] else None,
                         "loss_last": student["losses"][-1][1] if student["losses"] else None,
                         "load_average_1_5_15_min": {"before": load_before, "after": load_after}},
        "sampling_and_scoring_s": round(sample_s, 1),
        "teacher_guidance": 1.0 + cfg.cfg_scale,
        "scores": scores,
        "numerics": numerics_record(threads, cfg.seed),
        "prompts": prompts,
    }
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    print(f"\nwrote {out / 'samples.png'} and {out / 'metrics.json'}")
    if trained:
        print(f"distillation: {cfg.max_steps} steps in {distil_s:.0f} s ({distil_s / cfg.max_steps:.3f} s a step, "
              f"{threads} threads, load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    for split in ("val", "unseen"):
        print(f"{split} prompts")
        for label, *_ in RUNS:
            s = scores[label][split]["all_shapes"]
            print(f"  {label:32s} colour {s['colour']:.2f}, kind {s['kind']:.2f}, position {s['position']:.2f}, "
                  f"size {s['size']:.2f}, count {s['count']:.2f}, background {s['background']:.2f}")


def sample_and_score(cfg, teacher, student, args):
    """{label: {split: alignment report}}, {label: [PIL images of the grid's prompts]}, {split: [prompts]}: every
    run of RUNS on the quickstart's held-out prompts and seeds."""
    from torchvision.transforms.functional import to_pil_image

    from diffusion.data.toy_shapes import MANIFEST, alignment_report, parse_caption
    from diffusion.pipeline import load_pipeline
    from scripts.quickstart import SEED_STRIDE, held_out_prompts
    dataset = Path(cfg.data_root) / cfg.data.root
    prompts = held_out_prompts(dataset, args.num_prompts // 2)
    held_out = json.loads((dataset / MANIFEST).read_text())["held_out_pairs"]
    # the teacher as it was distilled: the weights --load-from read (a checkpoint's live ones)
    pipes = {"teacher": load_pipeline(teacher, config=cfg, use_ema=False),
             "student": load_pipeline(student, config=cfg, use_ema=args.student_weights == "ema")}
    encoded = {split: pipes["teacher"].text_encoder.get_text_embeddings(texts) for split, texts in prompts.items()}
    scores, grid = {}, {}
    for label, which, sampler, steps in RUNS:
        scores[label], grid[label] = {}, []
        for row, (split, texts) in enumerate(prompts.items()):
            features, mask = encoded[split]
            seeds = [SEED_STRIDE * row + i for i in range(len(texts))]
            batch = pipes[which].sample(features, mask, cfg.image_size, cfg.image_size, seeds, sampler, steps,
                                        1.0 + cfg.cfg_scale)
            images = [to_pil_image(image) for image in batch]
            scores[label][split] = alignment_report(images, [parse_caption(t) for t in texts], held_out)
            grid[label] += images[:GRID_PROMPTS]
    shown = {split: texts[:GRID_PROMPTS] for split, texts in prompts.items()}
    return scores, grid, shown


def write_grid(rows, prompts, path, scale=3):
    """One row per run (its label on the left), one column per prompt (val, then unseen), prompts below."""
    import textwrap

    from PIL import Image, ImageDraw

    from diffusion.utils.fileio import save_png
    texts = [t for split in prompts.values() for t in split]
    cell = next(iter(rows.values()))[0].width * scale
    label_w, text_h = 200, 60
    grid = Image.new("RGB", (label_w + len(texts) * (cell + 6) + 6, len(rows) * (cell + 6) + 6 + text_h), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, images) in enumerate(rows.items()):
        top = 6 + r * (cell + 6)
        draw.multiline_text((6, top + cell // 2 - 10), "\n".join(textwrap.wrap(label, 28)), fill="black")
        for c, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_w + 6 + c * (cell + 6), top))
    for c, text in enumerate(texts):
        draw.multiline_text((label_w + 6 + c * (cell + 6), 6 + len(rows) * (cell + 6)),
                            "\n".join(textwrap.wrap(text, width=cell // 6)[:4]), fill="black", spacing=1)
    save_png(path, grid)


if __name__ == "__main__":
    main()
