"""scripts/toy_controlnet.py end to end at a tiny size: condition features, ControlNet training over a given base,
the held-out and contradiction measurements, the grids and metrics; a finished run is reported, not redone."""
import json

import pytest
from PIL import Image

from diffusion.data.toy_shapes import write_toy_dataset
from scripts import toy_controlnet
from tests.conftest import randomize


@pytest.fixture
def tiny_run(tmp_path, tiny_pipeline):
    """Arguments of a tiny run: a toy dataset, the tiny pipeline's T5 and VAE, and a random 2-block base model."""
    from diffusion.model.nets import PixArt
    from diffusion.utils.checkpoint import save_weights
    root, _ = tiny_pipeline
    write_toy_dataset(tmp_path / "data" / "toy_shapes", num_train=16, num_val=12, num_unseen=2, progress=False)
    base = randomize(PixArt(input_size=8, hidden_size=96, depth=2, num_heads=4, caption_channels=32,
                            model_max_length=48), scale=0.02)
    save_weights(base.state_dict(), tmp_path / "base.pth")
    return ["--base", str(tmp_path / "base.pth"), "--steps", "2", "--num-scenes", "3", "--num-contradictions", "2",
            "--scales", "0", "2", "--sampler", "dpm-solver", "--sample-steps", "2", "--out", str(tmp_path / "out"),
            "--cfg-options", f"data_root={tmp_path / 'data'}", f"t5_pretrained={root / 't5'}",
            f"vae_pretrained={root / 'vae'}", "caption_channels=32", "model_max_length=48", "scale_factor=1.0",
            "model_kwargs={'depth': 2, 'hidden_size': 96, 'num_heads': 4, 'patch_size': 2}", "copy_blocks_num=1",
            "train_batch_size=4", "log_interval=1"]


def test_the_proof_runs_every_stage_and_reports_a_finished_run(tmp_path, tiny_run, capsys):
    toy_controlnet.main(tiny_run)
    features = list((tmp_path / "data" / "toy_shapes" / "canny_feature_64" / "train").glob("*.npy"))
    assert len(features) == 16  # the Canny condition of every training record
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 and metrics["checkpoint"].endswith("step_2.pth")
    assert metrics["base_checkpoint"] == str(tmp_path / "base.pth") and metrics["copy_blocks_num"] == 1
    held = metrics["held_out"]
    assert held["records"] == 3 and len(held["prompts"]) == 3
    for name in ("controlnet", "base", "edges_only", "base_null_caption"):
        assert len(held[name]["iou"]) == 3 and 0 <= held[name]["iou_mean"] <= 1
    assert set(held["controlnet"]["alignment"]) == {"background", "count", "position", "colour", "kind", "size", "all"}
    contradiction = metrics["contradiction"]
    assert contradiction["records"] == 2
    assert [(row["cfg_scale"], row["scale"]) for row in contradiction["per_scale"]] == [(3.0, 0), (3.0, 2), (1.0, 0),
                                                                                        (1.0, 2)]
    for row in contradiction["per_scale"]:
        assert 0 <= row["edges_win"] + row["text_wins"] <= 1
    for name, rows in (("samples.png", 4), ("contradiction.png", 5)):
        grid = Image.open(tmp_path / "out" / name)
        assert grid.height > rows * 64 * 2  # one row of enlarged images per run
    assert "target IoU >= 0.70" in capsys.readouterr().out

    toy_controlnet.main(tiny_run)  # finished: reported from metrics.json, nothing sampled or trained again
    out = capsys.readouterr().out
    assert "a finished run" in out and "== 2/4" not in out


def test_bad_arguments_are_named(tiny_run, tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        toy_controlnet.main([*tiny_run, "--base", str(tmp_path / "missing.pth")])
    for flag, value in (("--num-scenes", "0"), ("--steps", "0"), ("--scales", "-1")):
        with pytest.raises(SystemExit):
            toy_controlnet.parse_args([flag, value])
