"""scripts/lcm_toy.py end to end at a tiny size (the shipped toy encoders, a small toy dataset, a random teacher of
the toy config's shape): it distils, scores every row, writes the grid and the metrics, and a second run reuses the
finished distillation."""
import json
import subprocess
import sys

from PIL import Image

from scripts import lcm_toy
from tests.conftest import REPO


def test_lcm_toy_distils_scores_every_row_and_reuses_the_distillation(tmp_path, capsys):
    from diffusion.data.toy_shapes import write_toy_dataset
    from diffusion.model.builder import build_model_from_config
    from diffusion.utils.checkpoint import save_weights
    from diffusion.utils.config import load_config
    data = tmp_path / "data"
    write_toy_dataset(data / "toy_shapes", num_train=16, num_val=2, num_unseen=2, progress=False)
    done = subprocess.run([sys.executable, "tools/extract_features.py", lcm_toy.CONFIG, "--threads", "1",
                           "--no-progress", "--cfg-options", f"data_root={data}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    teacher = tmp_path / "teacher.pth"
    save_weights(build_model_from_config(load_config(REPO / lcm_toy.CONFIG)).state_dict(), teacher)
    args = ["--teacher", str(teacher), "--steps", "2", "--num-prompts", "4", "--threads", "1", "--out",
            str(tmp_path / "out"), "--cfg-options", f"data_root={data}", "train_batch_size=8", "log_interval=1",
            "save_model_steps=2"]
    lcm_toy.main(args)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["distillation"]["steps"] == 2 and metrics["distillation"]["wall_s"] > 0
    assert metrics["student"].endswith("step_2.pth") and metrics["teacher_guidance"] == 3.0
    assert list(metrics["scores"]) == [label for label, *_ in lcm_toy.RUNS]
    for scores in metrics["scores"].values():
        assert set(scores) == {"val", "unseen"} and "colour" in scores["unseen"]["all_shapes"]
    grid = Image.open(tmp_path / "out" / "samples.png")
    assert grid.height > lcm_toy.GRID_ROWS * 64 * 3 and grid.width > 4 * 64 * 3  # 4 rows of 2 + 2 prompts
    capsys.readouterr()
    lcm_toy.main(args)
    assert "found " in capsys.readouterr().out  # the finished distillation is reused, not retrained
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["distillation"]["wall_s"] is None and metrics["numerics"]["threads"] == 1
