"""The ControlNet proof on the toy (PIXART-delta): Canny edges of toy scenes steer the quickstart's model.

  python scripts/quickstart.py          # once: the toy dataset and model (output/quickstart/)
  python scripts/toy_controlnet.py      # then this: output/toy_controlnet/

Stages, each on exactly --threads CPU threads with deterministic algorithms (figures depend on the seed, the thread
count and the CPU kernel family, not on how busy the machine is):
  1. condition features: tools/extract_features.py on configs/pixart_app_config/PixArt_toy_controlCanny.py writes
     the Canny edge maps of the training images, VAE-encoded (data/toy_shapes/canny_feature_64/);
  2. training: a ControlNet (copies of the first 3 of the 4 blocks) over the quickstart's newest checkpoint, frozen;
  3. held-out scenes (the val split): each scene's Canny edges steer its own caption; the IoU of the generated image's
     shape mask (`diffusion.data.toy_shapes.shape_mask`) with the scene's ground-truth mask (`render_scene_mask`,
     from the toy renderer), for the ControlNet and for the base model on the same prompts and seeds, and the
     alignment scores of both (tools/eval_toy_alignment.py's judge); and the edges alone (the null caption), with
     and without the ControlNet;
  4. contradicting prompts: one-shape val scenes whose caption is replaced by one naming the mirrored cell and the
     next kind (edges of a circle on the left, text "a square on the right"), sampled at each --scales value, with
     the guidance scale and without guidance (1): the IoU with the edges' shapes and with the text's, and which wins.
Writes samples.png (edge map, ControlNet, base, edges alone), contradiction.png (edge map, then one row per guidance
and conditioning scale) and metrics.json. Re-running reuses the features and the trained ControlNet; a finished
--out is reported, not redone.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `diffusion`, installed or not

import argparse
import json
import time

from diffusion.utils.arguments import finite_float, positive_int
from diffusion.utils.config import add_cfg_options_argument
from scripts.quickstart import GRID_COLUMNS, QUICKSTART_RUN, REPO, SAMPLERS, cli_cfg_options, quickstart_model, \
    run_tool, stage, train_toy, write_labelled_grid

CONFIG = "configs/pixart_app_config/PixArt_toy_controlCanny.py"
OUT = Path("output/toy_controlnet")
SCALES = (0.0, 0.5, 1.0, 2.0, 4.0)
IOU_TARGET = 0.70  # the bar for the ControlNet on held-out scenes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help=f"the base model's checkpoint (default: the newest in "
                                       f"{QUICKSTART_RUN}/checkpoints, the quickstart's)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps (default: the config's max_steps)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads of every stage (default 2: the README's figures)")
    parser.add_argument("--num-scenes", type=positive_int, default=64,
                        help="held-out val scenes whose edges steer their own caption (default 64)")
    parser.add_argument("--num-contradictions", type=positive_int, default=24,
                        help="one-shape val scenes given a contradicting caption, per scale (default 24)")
    parser.add_argument("--scales", type=finite_float, nargs="+", default=list(SCALES),
                        help=f"conditioning scales of the contradiction test (default {' '.join(map(str, SCALES))})")
    parser.add_argument("--sampler", choices=SAMPLERS, default="iddpm",
                        help="sampler (default iddpm, as the quickstart)")
    parser.add_argument("--sample-steps", type=positive_int, default=None,
                        help="sampler steps (default: 100 for iddpm, the sampler's default otherwise)")
    parser.add_argument("--cfg-scale", type=finite_float, default=None,
                        help="guidance scale (default: the config's, 3)")
    parser.add_argument("--out", default=str(OUT), help=f"output folder (default {OUT}); training goes to OUT/train")
    add_cfg_options_argument(parser)
    args = parser.parse_args(argv)
    if any(s < 0 for s in args.scales):
        parser.error(f"--scales must be 0 or more, got {args.scales}")
    return args


def main(argv=None):
    args = parse_args(argv)
    from diffusion.utils.config import load_config
    from diffusion.utils.cpu import RECIPE_THREADS, numerics_record, pin_cpu_numerics
    from diffusion.utils.fileio import atomic_write_text
    out = REPO / args.out
    if (out / "metrics.json").is_file():
        print(f"found {out / 'metrics.json'} (a finished run; give another --out for another one)")
        print_summary(json.loads((out / "metrics.json").read_text()))
        return
    threads = pin_cpu_numerics(args.threads or RECIPE_THREADS)
    base = quickstart_model(args.base, "--base")
    overrides = dict(args.cfg_options or {})
    if args.steps is not None:
        overrides["max_steps"] = args.steps
    cfg = load_config(REPO / CONFIG, {**overrides, "eval_interval": 0})
    dataset = REPO / cfg.data_root / cfg.data.root
    if not (dataset / "partition" / "val_info.json").is_file():
        sys.exit(f"error: {dataset} has no toy dataset: run python scripts/quickstart.py first")
    timings = {}

    start = stage("1/4 condition features (complete files are skipped)")
    run_tool("tools/extract_features.py", CONFIG, *cli_cfg_options(overrides), "--threads", str(threads),
             "--no-progress")
    timings["features_s"] = time.perf_counter() - start

    start = stage(f"2/4 training the ControlNet {cfg.max_steps} steps over {base}")
    trained = train_toy(cfg, Path(args.out) / "train", load_from=base)
    timings["train_s"] = time.perf_counter() - start

    start = stage("3/4 held-out scenes: their own edges, and the base model on the same prompts")
    evaluation = Evaluation(cfg, trained["checkpoint"], dataset, args)
    metrics = {"base_checkpoint": str(base), "checkpoint": str(trained["checkpoint"]), "train_steps": cfg.max_steps,
               "copy_blocks_num": cfg.copy_blocks_num, "class_dropout_prob": cfg.class_dropout_prob,
               "sampler": {"name": args.sampler, "steps": evaluation.steps, "cfg_scale": evaluation.cfg_scale},
               "loss_first": trained["losses"][0][1] if trained["losses"] else None,
               "loss_last": trained["losses"][-1][1] if trained["losses"] else None,
               "iou_target": IOU_TARGET}
    metrics["held_out"] = evaluation.held_out(out / "samples.png")
    timings["held_out_s"] = time.perf_counter() - start

    start = stage(f"4/4 contradicting prompts at conditioning scales {', '.join(f'{s:g}' for s in args.scales)}")
    metrics["contradiction"] = evaluation.contradiction(args.scales, out / "contradiction.png")
    timings["contradiction_s"] = time.perf_counter() - start
    metrics["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
    metrics["total_s"] = round(sum(timings.values()), 1)
    metrics["numerics"] = numerics_record(threads, cfg.seed)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    print(f"\nwrote {out / 'samples.png'}, {out / 'contradiction.png'} and {out / 'metrics.json'} in "
          f"{metrics['total_s']:.0f} s ({threads} threads)")
    print_summary(metrics)


class Evaluation:
    """Samples the trained ControlNet (and, with no control, its frozen base: the quickstart's model, bit for bit)
    on val scenes of the toy dataset and measures where the shapes come out."""

    def __init__(self, cfg, checkpoint, dataset, args):
        from diffusion.data.toy_shapes import MANIFEST
        from diffusion.pipeline import load_pipeline
        self.cfg, self.dataset, self.args = cfg, dataset, args
        self.manifest = json.loads((dataset / MANIFEST).read_text())
        self.records = json.loads((dataset / "partition" / "val_info.json").read_text())
        self.pipe = load_pipeline(checkpoint, config=cfg, t5_path=REPO / cfg.t5_pretrained,
                                  vae_path=REPO / cfg.vae_pretrained)
        self.steps = args.sample_steps or (100 if args.sampler == "iddpm" else None)
        self.cfg_scale = cfg.cfg_scale if args.cfg_scale is None else args.cfg_scale

    def control(self, indices):
        """(edge images as PIL, control latents (N, 4, h, w)) of val records `indices`: Canny of their images."""
        import torch
        from PIL import Image
        from torchvision.transforms.functional import to_pil_image

        from diffusion.data.conditions import control_latent, make_condition
        from diffusion.data import paths
        size = self.cfg.image_size
        conditions = []
        for index in indices:
            with Image.open(paths.image_path(self.dataset, self.records[index]["path"])) as image:
                conditions.append(make_condition(image.convert("RGB"), size, size, self.cfg.control_condition))
        conditions = torch.cat(conditions)
        latents = control_latent(self.pipe.vae, conditions.to(self.pipe.device), self.pipe.scale_factor)
        return [to_pil_image((c + 1) / 2) for c in conditions], latents

    def sample(self, prompts, seeds, c=None, scale=1.0, cfg_scale=None):
        """Images of `prompts` (None: the null caption, which guidance leaves as it is: sampled unguided) steered by
        control latents `c` at conditioning `scale` (c None: the base model)."""
        import torch
        from torchvision.transforms.functional import to_pil_image
        if prompts is None:
            features = self.pipe.model.base_model.y_embedder.y_embedding[None].expand(len(seeds), -1, -1)
            mask, cfg_scale = features.new_ones(features.shape[:2], dtype=torch.long), 1.0
        else:
            features, mask = self.pipe.text_encoder.get_text_embeddings(prompts)
        extra = None if c is None else dict(c=c, conditioning_scale=float(scale))
        size = self.cfg.image_size
        images = self.pipe.sample(features, mask, size, size, seeds, self.args.sampler, self.steps,
                                  self.cfg_scale if cfg_scale is None else cfg_scale, extra_inputs=extra)
        return [to_pil_image(image) for image in images]

    def truth(self, indices):
        """Ground-truth shape masks of val records `indices` (the renderer's, with their own jitter)."""
        from diffusion.data.toy_shapes import scene_masks
        return scene_masks(self.manifest["seed"], "val", indices, self.manifest["image_size"])

    def held_out(self, grid_path):
        """IoU and alignment of the ControlNet (each scene's own edges, scale 1) and of the base model (no control),
        same prompts and seeds; and the IoU of the edges alone (null caption) with and without the ControlNet."""
        import numpy as np

        from diffusion.data.toy_shapes import alignment_report, mask_iou, parse_caption, shape_mask
        indices = list(range(min(self.args.num_scenes, len(self.records))))
        prompts = [self.records[i]["prompt"] for i in indices]
        edges, c = self.control(indices)
        truth = self.truth(indices)
        scenes = [parse_caption(p) for p in prompts]
        results, images = {}, {}
        runs = {"controlnet": (prompts, c), "base": (prompts, None), "edges_only": (None, c),
                "base_null_caption": (None, None)}
        for name, (texts, control) in runs.items():
            images[name] = self.sample(texts, indices, control)
            ious = [mask_iou(shape_mask(image), mask) for image, mask in zip(images[name], truth)]
            results[name] = {"iou_mean": float(np.mean(ious)), "iou_median": float(np.median(ious)),
                             "iou_at_least_0.7": float(np.mean([v >= 0.7 for v in ious])),
                             "iou": [round(v, 4) for v in ious]}
            if texts is not None:
                results[name]["alignment"] = alignment_report(images[name], scenes)["all_shapes"]
        n = GRID_COLUMNS
        titles = {"controlnet": "ControlNet: the caption and its scene's edges, scale 1",
                  "base": "base model: the caption alone", "edges_only": "ControlNet: the edges alone (null caption)"}
        rows = {"Canny edges of held-out scenes (the condition) and their captions": edges[:n]}
        labels = {"Canny edges of held-out scenes (the condition) and their captions": prompts[:n]}
        for name, title in titles.items():
            rows[title] = images[name][:n]
            labels[title] = [f"IoU {v:.2f}" for v in results[name]["iou"][:n]]
        write_labelled_grid(rows, labels, grid_path)
        return {"split": "val", "records": len(indices), "prompts": prompts, **results}

    def contradiction(self, scales, grid_path):
        """One-shape, off-center val scenes: their edges, with the caption of `contradicting_scene` (mirrored cell,
        next kind), at each conditioning scale, guided at the evaluation's guidance scale and unguided."""
        import numpy as np

        from diffusion.data.toy_shapes import (caption, contradicting_scene, mask_iou, parse_caption, render_scene_mask,
                                               shape_mask, detect_scene)
        indices = [i for i, r in enumerate(self.records)
                   if len(s := parse_caption(r["prompt"]).shapes) == 1 and s[0].position != "center"]
        indices = indices[:self.args.num_contradictions]
        if not indices:
            raise SystemExit(f"error: no val record of {self.dataset} has one shape outside the center: nothing to "
                             "contradict")
        edge_scenes = [parse_caption(self.records[i]["prompt"]) for i in indices]
        text_scenes = [contradicting_scene(scene) for scene in edge_scenes]
        prompts = [caption(scene) for scene in text_scenes]
        edges, c = self.control(indices)
        edge_truth = self.truth(indices)
        text_truth = [render_scene_mask(scene, self.cfg.image_size) for scene in text_scenes]
        rows, labels, per_scale = {"Canny edges (the condition)": edges[:GRID_COLUMNS]}, {}, []
        labels["Canny edges (the condition)"] = [
            f"edges: {e.shapes[0].kind}, {e.shapes[0].position}; text: {t.shapes[0].kind}, {t.shapes[0].position}"
            for e, t in zip(edge_scenes[:GRID_COLUMNS], text_scenes[:GRID_COLUMNS])]
        for guidance in dict.fromkeys((self.cfg_scale, 1.0)):
            for scale in scales:
                images = self.sample(prompts, [2000 + i for i in indices], c, scale, guidance)
                masks = [shape_mask(image) for image in images]
                iou_edges = np.array([mask_iou(m, t) for m, t in zip(masks, edge_truth)])
                iou_text = np.array([mask_iou(m, t) for m, t in zip(masks, text_truth)])
                found = [detect_scene(image) for image in images]
                per_scale.append({
                    "cfg_scale": guidance, "scale": scale, "iou_edges": float(iou_edges.mean()),
                    "iou_text": float(iou_text.mean()), "edges_win": float((iou_edges > iou_text).mean()),
                    "text_wins": float((iou_text > iou_edges).mean()),
                    # what the edges do not show: does the text still give the colour?
                    "colour_of_text": float(np.mean([any(f.colour == t.shapes[0].colour for f in seen.shapes)
                                                     for seen, t in zip(found, text_scenes)])),
                    "kind_of_edges": kind_rate(found, edge_scenes), "kind_of_text": kind_rate(found, text_scenes)})
                title = f"guidance {guidance:g}, conditioning scale {scale:g}"
                rows[title] = images[:GRID_COLUMNS]
                labels[title] = [f"IoU edges {e:.2f} / text {t:.2f}"
                                 for e, t in zip(iou_edges[:GRID_COLUMNS], iou_text[:GRID_COLUMNS])]
        write_labelled_grid(rows, labels, grid_path, scale=2)
        return {"records": len(indices), "edge_prompts": [caption(s) for s in edge_scenes], "prompts": prompts,
                "per_scale": per_scale}


def kind_rate(found, scenes):
    """Fraction of images with a shape of the kind of their scene's one shape, in that shape's cell."""
    return sum(any(f.kind == s.shapes[0].kind and f.position == s.shapes[0].position for f in seen.shapes)
               for seen, s in zip(found, scenes)) / len(scenes)


def print_summary(metrics):
    held = metrics["held_out"]
    print(f"  {held['records']} held-out scenes, IoU of the shapes with the scene's:")
    for name in ("controlnet", "base", "edges_only", "base_null_caption"):
        scores = held[name].get("alignment")
        alignment = ("" if scores is None else f"; colour {scores['colour']:.2f}, kind {scores['kind']:.2f}, "
                     f"position {scores['position']:.2f}, count {scores['count']:.2f}")
        print(f"  {name:17s} {held[name]['iou_mean']:.2f} (median {held[name]['iou_median']:.2f}; "
              f"{held[name]['iou_at_least_0.7']:.0%} of images >= 0.7){alignment}")
    verdict = "met" if held["controlnet"]["iou_mean"] >= metrics["iou_target"] else "NOT met"
    print(f"  target IoU >= {metrics['iou_target']:.2f}: {verdict}")
    print(f"  {metrics['contradiction']['records']} contradicting prompts (edges vs text):")
    for row in metrics["contradiction"]["per_scale"]:
        print(f"    guidance {row['cfg_scale']:g}, scale {row['scale']:4g}: IoU with edges {row['iou_edges']:.2f}, "
              f"with text {row['iou_text']:.2f}; edges win {row['edges_win']:.0%}, text wins {row['text_wins']:.0%}; "
              f"kind of edges {row['kind_of_edges']:.2f}, of text {row['kind_of_text']:.2f}; colour of text "
              f"{row['colour_of_text']:.2f}")


if __name__ == "__main__":
    main()
