"""scripts/inference.py and diffusion.pipeline on a tiny model, T5 and VAE: files, metadata, seeds, errors."""
import json

import numpy as np
import pytest
from PIL import Image

from diffusion.pipeline import PromptError, parse_prompt
from scripts import inference


def run(tiny_pipeline, out, *extra):
    root, config = tiny_pipeline
    inference.main(["--config", str(config), "--model_path", str(root / "model.pth"), "--output-dir", str(out),
                    "--step", "3", "--device", "cpu", *map(str, extra)])


def test_images_get_sanitised_unique_names_and_metadata(tiny_pipeline, tmp_path):
    prompts = ["a small red circle / on a gray background?", "a small red circle / on a gray background?"]
    run(tiny_pipeline, tmp_path, "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "7")
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["0000_a-small-red-circle-on-a-gray-background_s7.png",
                     "0001_a-small-red-circle-on-a-gray-background_s8.png"]
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [(m["file"], m["seed"], m["prompt"]) for m in lines] == [(files[0], 7, prompts[0]), (files[1], 8, prompts[1])]
    assert lines[0]["sampler"] == "dpm-solver" and lines[0]["steps"] == 3 and lines[0]["height"] == 64
    assert Image.open(tmp_path / files[0]).size == (64, 64)


@pytest.mark.parametrize("algo", ["dpm-solver", "sa-solver", "iddpm"])
def test_an_image_does_not_depend_on_the_batch_size(tiny_pipeline, tmp_path, algo):
    prompts = ["a large blue circle on a gray background", "a small green circle on a gray background"]
    args = ["--prompt", prompts[0], "--prompt", prompts[1], "--sampling_algo", algo]
    run(tiny_pipeline, tmp_path / "bs1", *args, "--bs", "1")
    run(tiny_pipeline, tmp_path / "bs2", *args, "--bs", "2")
    for name in (p.name for p in (tmp_path / "bs1").glob("*.png")):
        a = np.asarray(Image.open(tmp_path / "bs1" / name), dtype=np.float32)
        b = np.asarray(Image.open(tmp_path / "bs2" / name), dtype=np.float32)
        assert np.abs(a - b).max() <= 1, name  # equal up to one 8-bit level of float rounding


def test_no_prompt_is_an_error(tiny_pipeline, tmp_path):
    with pytest.raises(SystemExit, match="no prompts"):
        run(tiny_pipeline, tmp_path)


def test_size_flags_of_the_papers_demo():
    assert parse_prompt("a cat --ar 1:2", 1024, True) == ("a cat", 704, 1408)
    assert parse_prompt("a cat --aspect_ratio 2:1", 512, True)[1:] == (704, 352)
    assert parse_prompt("a cat --hw 512:768", 1024, True) == ("a cat", 512, 768)
    with pytest.raises(PromptError, match="single-scale model samples 512x512 only"):
        parse_prompt("a cat --ar 1:2", 512, False)
    with pytest.raises(PromptError, match="malformed size flag"):
        parse_prompt("a cat --ar wide", 1024, True)
    with pytest.raises(PromptError, match="multiples of 16"):
        parse_prompt("a cat --hw 500:700", 1024, True)
    with pytest.raises(PromptError, match="empty"):
        parse_prompt("   --ar 1:1", 1024, True)
