"""scripts/inference.py refuses bad input by name before any model loads, and never loses an image: concurrent
runs into one folder, a full disk, long prompts (the demo's rule too)."""
import errno
import json
import os
import subprocess
import sys
import textwrap

import pytest

from diffusion.utils import outputs
from scripts import inference
from tests.conftest import REPO

PROMPT = "a small red circle on a gray background"


def files_in(folder):
    """Every file under `folder` (hidden temp files included), as relative names."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def metadata(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def cli(tiny_pipeline, out, *extra):
    root, config = tiny_pipeline
    return ["--config", str(config), "--model_path", str(root / "model.pth"), "--output-dir", str(out),
            "--step", "2", "--device", "cpu", *map(str, extra)]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fails the test if the CLI gets as far as loading the transformer, T5 or VAE."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(inference, "load_pipeline", refuse)


def refused(argv, capsys):
    """The error line of a CLI run that must fail (argparse's or ours), checking it is one line, not exit 0."""
    with pytest.raises(SystemExit) as exit_info:
        inference.main(argv)
    code = exit_info.value.code
    assert code not in (0, None)
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "Traceback" not in message
    return message


# ---------------------------------------------------------------- concurrent runs

RUNNER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from scripts import inference
    barrier, me, other = Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    load = inference.load_pipeline

    def load_then_wait(*args, **kwargs):  # both runs start writing at the same moment
        pipe = load(*args, **kwargs)
        (barrier / me).touch()
        deadline = time.time() + 120
        while not (barrier / other).exists() and time.time() < deadline:
            time.sleep(0.01)
        return pipe

    inference.load_pipeline = load_then_wait
    inference.main(sys.argv[5:])
""")


def test_two_runs_writing_into_one_folder_at_once_lose_no_image(tiny_pipeline, tmp_path):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "0000_an-earlier-run_s0.png").write_bytes(b"an earlier run's image")
    prompts = [a for i in range(12) for a in ("--prompt", f"{PROMPT} {i}")]
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, str(REPO), str(tmp_path), me, other,
                               *cli(tiny_pipeline, out, *prompts, "--seed", seed)],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for me, other, seed in (("a", "b", 0), ("b", "a", 100))]
    logs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], logs
    lines = metadata(out)
    listed = [line["file"] for line in lines]
    images = sorted(p.name for p in out.glob("*.png"))
    assert len(lines) == 24 and len(set(listed)) == 24  # every image of both runs, each listed once
    assert sorted(listed + ["0000_an-earlier-run_s0.png"]) == images  # every listed file is there, nothing else
    numbers = [int(name[:4]) for name in listed]
    # numbers interleave and never repeat; two runs claiming one number at the same instant may both give it up,
    # which skips it (a gap, never a lost or shared image)
    assert len(set(numbers)) == 24 and min(numbers) >= 1
    assert sorted(line["seed"] for line in lines) == list(range(12)) + list(range(100, 112))
    assert (out / "0000_an-earlier-run_s0.png").read_bytes() == b"an earlier run's image"
    assert files_in(out) == sorted(images + ["metadata.jsonl"])  # no temp file left


# ---------------------------------------------------------------- options, checked before any model loads

@pytest.mark.parametrize("flag, value, expected", [
    ("--bs", "-1", "expected an integer >= 1, got -1"),
    ("--bs", "0", "expected an integer >= 1, got 0"),
    ("--step", "0", "expected an integer >= 1, got 0"),
    ("--cfg_scale", "nan", "expected a finite number, got 'nan'"),
    ("--cfg_scale", "inf", "expected a finite number, got 'inf'"),
    ("--seed", "-1", "expected an integer from 0 to 4294967295, got -1"),
    ("--device", "gpu0", "expected a torch device"),
])
def test_an_impossible_option_is_refused_by_name(tiny_pipeline, tmp_path, capsys, no_model_loads, flag, value,
                                                 expected):
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--prompt", PROMPT, flag, value), capsys)
    assert f"argument {flag}" in message and expected in message
    assert files_in(tmp_path) == []


def test_too_few_steps_for_the_sampler_are_refused_first(tiny_pipeline, tmp_path, capsys, no_model_loads):
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--prompt", PROMPT, "--step", "1"), capsys)
    assert message == "error: --step 1: dpm-solver takes at least 2 steps, got 1"


def test_an_output_dir_that_cannot_be_a_folder_is_refused_first(tiny_pipeline, tmp_path, capsys, no_model_loads):
    (tmp_path / "file").write_text("a regular file")
    message = refused(cli(tiny_pipeline, tmp_path / "file" / "out", "--prompt", PROMPT), capsys)
    assert message.startswith("error: --output-dir") and str(tmp_path / "file" / "out") in message
    assert files_in(tmp_path) == ["file"]


def test_an_aspect_ratio_the_model_has_no_buckets_for_is_a_named_error(tiny_pipeline, tmp_path, capsys,
                                                                       no_model_loads):
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--prompt", PROMPT, "--prompt", f"{PROMPT} --ar 1:2"),
                      capsys)
    assert message.startswith("error: --prompt 2: --ar 1:2")
    assert "64 px, has no aspect-ratio buckets" in message and "64x64 only" in message


# ---------------------------------------------------------------- prompt files

def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tiny_pipeline, tmp_path, capsys, no_model_loads):
    path = tmp_path / "prompts.txt"
    path.write_bytes(f"{PROMPT}\n\n{PROMPT} caf\xe9\n".encode("latin-1"))
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--txt_file", path), capsys)
    assert f"{path}:3: not UTF-8 text (byte 0xe9 at column" in message and "expected a UTF-8 text file" in message


@pytest.mark.parametrize("content", ["", "\n  \n\t\n"], ids=["empty", "blank"])
def test_a_prompt_file_without_prompts_is_a_named_error(tiny_pipeline, tmp_path, capsys, no_model_loads, content):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--prompt", PROMPT, "--txt_file", path), capsys)
    assert message == f"error: --txt_file {path} holds no prompt (it is empty or blank): expected one prompt per line"


def test_a_prompt_file_may_start_with_a_byte_order_mark(tiny_pipeline):
    args = inference.parse_args(["--model_path", "m", "--txt_file", str(tiny_pipeline[0] / "bom.txt")])
    (tiny_pipeline[0] / "bom.txt").write_bytes(b"\xef\xbb\xbf" + PROMPT.encode() + b"\n")
    assert inference.read_prompts(args) == [(f"{tiny_pipeline[0] / 'bom.txt'}:1", PROMPT)]


# ---------------------------------------------------------------- prompt length: one rule, CLI and demo

LONG = " ".join(["circle"] * 10_000)


def test_a_prompt_over_the_token_limit_is_refused_with_its_count_and_the_limit(tiny_pipeline, tmp_path, capsys,
                                                                               no_model_loads):
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--prompt", PROMPT, "--prompt", LONG), capsys)
    from diffusion.model.t5 import CaptionTokenizer
    count = CaptionTokenizer(tiny_pipeline[0] / "t5", model_max_length=48).token_count(LONG)
    assert message.startswith("error: --prompt 2 ('circle circle")
    assert f"has {count} tokens; the model reads at most 48" in message and count > 10_000


def test_a_long_prompt_in_a_file_is_named_by_its_line(tiny_pipeline, tmp_path, capsys, no_model_loads):
    path = tmp_path / "prompts.txt"
    path.write_text(f"{PROMPT}\n\n{LONG}\n")
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--txt_file", path), capsys)
    assert message.startswith(f"error: {path}:3 ") and "at most 48" in message


def test_a_long_negative_prompt_is_refused_too(tiny_pipeline, tmp_path, capsys, no_model_loads):
    message = refused(cli(tiny_pipeline, tmp_path / "out", "--prompt", PROMPT, "--negative_prompt", LONG), capsys)
    assert message.startswith("error: --negative_prompt ('circle") and "at most 48" in message


@pytest.fixture(scope="module")
def demo_generate(tiny_pipeline):
    """The demo's request handler on the tiny T5's tokenizer (no model: refusals come before sampling)."""
    from types import SimpleNamespace

    from diffusion.demo import build_demo
    from diffusion.model.t5 import CaptionTokenizer
    sampler = SimpleNamespace(image_size=64, multi_scale=False, model=object(), adapters={})
    demo = build_demo(sampler, CaptionTokenizer(tiny_pipeline[0] / "t5", model_max_length=48))
    return next(f.fn for f in demo.fns.values() if f.fn.__name__ == "generate")


@pytest.mark.parametrize("prompt, negative, named", [(LONG, "", "the prompt ("),
                                                      (PROMPT, LONG, "the negative prompt (")],
                         ids=["prompt", "negative-prompt"])
def test_the_demo_refuses_what_the_cli_refuses(demo_generate, prompt, negative, named):
    import gradio as gr
    with pytest.raises(gr.Error) as err:
        demo_generate(prompt, negative, "(no style)", "DPM-Solver", 20, 4.5, 0, False, "64 x 64", 1)
    assert err.value.message.startswith(named) and "tokens; the model reads at most 48" in err.value.message


# ---------------------------------------------------------------- writing

def test_a_full_disk_stops_the_run_naming_the_image_and_keeps_what_was_written(tiny_pipeline, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "0000_earlier_s0.png").write_bytes(b"earlier")
    real_write, calls = outputs.atomic_write, []

    def disk_full_on_second_image(path, write):
        calls.append(path)
        if len(calls) < 2:
            return real_write(path, write)

        def partial(f):
            f.write(b"\x89PNG half an image")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(path, partial)

    monkeypatch.setattr(outputs, "atomic_write", disk_full_on_second_image)
    message = refused(cli(tiny_pipeline, out, "--prompt", PROMPT, "--prompt", PROMPT, "--prompt", PROMPT), capsys)
    assert message == f"error: cannot write {out / calls[1].name}: No space left on device"
    assert calls[1].name.startswith("0002_")
    assert files_in(out) == ["0000_earlier_s0.png", calls[0].name, "metadata.jsonl"]  # no partial or empty image
    assert [line["file"] for line in metadata(out)] == [calls[0].name]


def test_a_metadata_line_is_valid_json_or_nothing(tmp_path):
    path = tmp_path / "metadata.jsonl"
    outputs.append_jsonl(path, {"file": "0000_a.png", "cfg_scale": 4.5})
    with pytest.raises(ValueError, match="Out of range float"):
        outputs.append_jsonl(path, {"file": "0001_b.png", "cfg_scale": float("nan")})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"file": "0000_a.png", "cfg_scale": 4.5}]


def test_a_number_another_file_holds_is_skipped_even_when_the_scan_is_stale(tmp_path, monkeypatch):
    from PIL import Image
    (tmp_path / "0000_other-prompt_s3.png").write_bytes(b"another run's")  # same number, another name
    (tmp_path / "0001_x_s0.png").write_bytes(b"same name")
    monkeypatch.setattr(outputs, "next_free_number", lambda folder: 0)  # as if both were written after our scan
    path = outputs.save_numbered_png(tmp_path, lambda n: f"{n:04d}_x_s0.png", Image.new("RGB", (4, 4)))
    assert path.name == "0002_x_s0.png" and Image.open(path).size == (4, 4)
    assert files_in(tmp_path) == ["0000_other-prompt_s3.png", "0001_x_s0.png", "0002_x_s0.png"]
    assert (tmp_path / "0001_x_s0.png").read_bytes() == b"same name"
