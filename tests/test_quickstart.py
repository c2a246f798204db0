"""scripts/quickstart.py end to end at a tiny size: every stage runs, writes the grid and the metrics, and a
second run reuses what the first one built."""
import json

import pytest
from PIL import Image

from scripts import quickstart


def test_quickstart_runs_every_stage_and_reuses_them(tmp_path, capsys):
    args = ["--steps", "3", "--num-prompts", "4", "--num-train", "32", "--vae-steps", "2", "--out",
            str(tmp_path / "out"), "--cfg-options", f"data_root={tmp_path / 'data'}",
            f"t5_pretrained={tmp_path / 'enc' / 't5'}", f"vae_pretrained={tmp_path / 'enc' / 'vae'}",
            "train_batch_size=8", "log_interval=1"]
    quickstart.main(args)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["train_steps"] == 3 and metrics["checkpoint"].endswith("step_3.pth")
    assert set(metrics["alignment"]) == {"val", "unseen"}
    assert metrics["alignment"]["unseen"]["held_out_pairs"] is not None  # unseen scenes hold a held-out pair
    for split in ("val", "unseen"):
        assert set(metrics["alignment"][split]["all_shapes"]) == {"background", "count", "position", "colour",
                                                                 "kind", "size", "all"}
        assert len(metrics["prompts"][split]) == 2
    assert set(metrics["timings_s"]) == {"dataset_s", "encoders_s", "features_s", "train_s", "sample_s"}
    import torch
    assert metrics["numerics"] == {"threads": 2, "torch": torch.__version__, "seed": 0,
                                   "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    grid = Image.open(tmp_path / "out" / "samples.png")
    assert grid.width > 2 * 64 * 3 and grid.height > 2 * 64 * 3  # two rows of two enlarged images
    assert len(json.loads((tmp_path / "data" / "toy_shapes" / "partition" / "data_info.json").read_text())) == 32
    capsys.readouterr()

    quickstart.main(args)  # everything is found, nothing rebuilt or retrained
    out = capsys.readouterr().out
    assert f"found {tmp_path / 'data' / 'toy_shapes'}" in out and "found " in out.split("== 2/5")[1].split("== 3/5")[0]
    assert "step_3.pth" in out.split("== 4/5")[1].split("== 5/5")[0]


def test_a_training_stopped_by_a_signal_ends_the_run_instead_of_being_scored(tmp_path, monkeypatch):
    import pytest

    from diffusion.train import core
    from diffusion.utils.config import load_config
    stopped = core.TrainResult(tmp_path, global_step=7, epoch=0, last_checkpoint=tmp_path / "epoch_1_step_7.pth",
                               stopped_by_signal=True)
    monkeypatch.setattr(core, "train", lambda cfg, options: stopped)
    cfg = load_config(quickstart.REPO / quickstart.CONFIG)
    with pytest.raises(SystemExit, match="training stopped by a signal at step 7 of 5000.*again to resume"):
        quickstart.train_toy(cfg, tmp_path / "train")


@pytest.mark.parametrize("flag, value, expected, scripts", [
    ("--steps", "0", "expected an integer >= 1, got 0", ("quickstart", "lcm_toy", "toy_controlnet")),
    ("--threads", "-2", "expected an integer >= 1, got -2",
     ("quickstart", "lcm_toy", "toy_controlnet", "toy_dreambooth")),
    ("--num-prompts", "1", "expected an integer >= 2, got 1", ("quickstart", "lcm_toy")),
    ("--num-train", "x", "expected an integer >= 1, got 'x'", ("quickstart",)),
    ("--cfg-scale", "nan", "expected a finite number, got 'nan'", ("quickstart", "toy_controlnet"))])
def test_the_toy_scripts_name_a_bad_value_before_doing_anything(flag, value, expected, scripts, capsys):
    from scripts import lcm_toy, toy_controlnet
    from tools import toy_dreambooth
    modules = {"quickstart": quickstart, "lcm_toy": lcm_toy, "toy_controlnet": toy_controlnet,
               "toy_dreambooth": toy_dreambooth}
    for name in scripts:
        with pytest.raises(SystemExit) as exit_info:
            modules[name].parse_args([flag, value])
        assert exit_info.value.code == 2 and f"argument {flag}: {expected}" in capsys.readouterr().err, name
