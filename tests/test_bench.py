"""The benchmark scripts run (tiny sizes, one round) and report what bench/README.md says they do: the two
models agree, every row has its ratio, the JSON holds the table. No timing is asserted here."""
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

TINY = ["--preset", "cpu", "--size", "64", "--threads", "1", "--warmup", "0", "--rounds", "1"]


def run_bench(script, *args, tmp_path):
    out = tmp_path / f"{script}.json"
    done = subprocess.run([sys.executable, str(REPO / "bench" / f"{script}.py"), *TINY, *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_train_bench_times_ours_options_off_and_diffusers_on_the_same_function(tmp_path):
    payload, stdout = run_bench("bench_train", "--batch", "2", "--with-baseline", tmp_path=tmp_path)
    assert payload["agreement_rel_error"] < 1e-5
    rows = {r["model"]: r for r in payload["results"]}
    assert set(rows) == {"ours", "ours, options off", "diffusers"}
    assert rows["diffusers"]["ratio_vs_diffusers"] == 1.0 and rows["ours"]["ratio_vs_diffusers"] > 0
    assert rows["ours"]["speedup_vs_options_off"] > 0 and rows["ours"]["images_per_s"] > 0
    assert "| ours " in stdout and "vs diffusers" in stdout


@pytest.mark.parametrize("caption_len", [32, 120])
def test_sample_bench_agrees_with_diffusers(tmp_path, caption_len):
    payload, _ = run_bench("bench_sample", "--steps", "3", "--caption-len", str(caption_len), "--with-baseline",
                           tmp_path=tmp_path)
    assert payload["agreement_rel_error"] < 1e-5
    assert {r["model"] for r in payload["results"]} == {"ours", "ours, options off", "diffusers"}


def test_sample_bench_end_to_end_with_a_local_t5_and_vae(tmp_path, tiny_pipeline):
    """--t5/--vae add T5 encoding and VAE decoding around the same sampling; the model takes the T5's width."""
    root, _ = tiny_pipeline
    payload, _ = run_bench("bench_sample", "--steps", "2", "--t5", str(root / "t5"), "--vae", str(root / "vae"),
                           tmp_path=tmp_path)
    rows = {r["model"]: r for r in payload["results"]}
    assert set(rows) == {"ours", "diffusers", "ours end to end", "diffusers end to end"}
    assert rows["ours end to end"]["ratio_vs_diffusers"] > 0
    assert rows["ours end to end"]["seconds"] > 0


def test_sample_bench_names_a_t5_folder_without_config(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "bench_sample.py"), *TINY, "--t5", str(tmp_path),
                           "--vae", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and str(tmp_path / "config.json") in done.stderr


def test_sample_bench_times_an_lcm_student_against_the_guided_teacher_in_the_same_rounds(tmp_path):
    payload, stdout = run_bench("bench_sample", "--steps", "3", "--lcm-steps", "2", "--no-diffusers",
                                tmp_path=tmp_path)
    rows = {r["model"]: r for r in payload["results"]}
    assert set(rows) == {"ours", "LCM student"}
    assert (rows["LCM student"]["steps"], rows["LCM student"]["guided"]) == (2, False)
    assert rows["ours"]["steps"] == 3 and rows["ours"]["speedup_vs_ours"] == 1.0
    assert rows["LCM student"]["speedup_vs_ours"] > 0 and payload["config"]["lcm_steps"] == 2
    assert "| LCM student | 2, no CFG" in stdout and "vs ours 3 steps" in stdout
