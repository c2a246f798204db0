"""The shipped toy encoders (pretrained/toy) load like T5-XXL and SD-VAE, and tools/build_toy_encoders.py with its
defaults rebuilds encoders that meet the same report thresholds. The rebuild is the recipe's full build, the
longest test of the suite: about 13 minutes on an idle 2-core AVX-512 machine, 20-24 on the slower AVX2 ones
(most of it the VAE's 4000 steps)."""
import json

import pytest

from diffusion.data.toy_encoders import REPORT_THRESHOLDS, report_shortfalls
from diffusion.data.toy_shapes import write_toy_dataset
from diffusion.utils.config import load_config
from tests.conftest import REPO

SHIPPED = REPO / "pretrained" / "toy"
TOY_CONFIG = REPO / "configs/pixart_config/PixArt_toy_shapes.py"


def test_the_toy_config_names_the_shipped_encoders_and_their_scale_factor():
    cfg = load_config(TOY_CONFIG)
    assert REPO / cfg.t5_pretrained == SHIPPED / "t5" and REPO / cfg.vae_pretrained == SHIPPED / "vae"
    report = json.loads((SHIPPED / "vae" / "vae_report.json").read_text())
    assert cfg.scale_factor == pytest.approx(report["scale_factor"], rel=1e-6)


def test_the_shipped_encoders_load_through_the_released_code_paths_and_meet_the_thresholds():
    from diffusers import AutoencoderKL

    from diffusion.model.t5 import T5Embedder
    cfg = load_config(TOY_CONFIG)
    t5 = T5Embedder(SHIPPED / "t5", model_max_length=cfg.model_max_length)
    features, mask = t5.get_text_embeddings(["a large red circle on the left, on a gray background"])
    assert features.shape[-2:] == (cfg.model_max_length, cfg.caption_channels) and mask.sum() > 0
    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", local_files_only=True)
    assert vae.config.scaling_factor == pytest.approx(cfg.scale_factor, rel=1e-6)
    assert (SHIPPED / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (SHIPPED / "t5" / "model.safetensors").is_file()
    for kind in REPORT_THRESHOLDS:
        report = json.loads((SHIPPED / kind / f"{kind}_report.json").read_text())
        assert report_shortfalls(kind, report) == []


def test_a_report_below_a_threshold_is_named():
    report = {"psnr_val_db": 30.0, "reconstruction_alignment": dict(background=1, count=1, position=1, colour=1,
                                                                    kind=0.5, size=1)}
    assert report_shortfalls("vae", report) == ["vae psnr_val_db = 30.000, below the threshold 32.0",
                                                "vae reconstruction_alignment kind = 0.500, below the threshold 0.8"]


def test_a_rebuild_with_the_defaults_meets_the_shipped_thresholds(tmp_path):
    from tools import build_toy_encoders
    data = tmp_path / "toy_shapes"
    write_toy_dataset(data, progress=False)  # the quickstart's dataset: seed 0, 4000 + 200 + 200 images
    assert build_toy_encoders.main(["--data", str(data), "--out", str(tmp_path / "toy"), "--no-progress"]) == 0
    for kind in REPORT_THRESHOLDS:
        report = json.loads((tmp_path / "toy" / kind / f"{kind}_report.json").read_text())
        assert report_shortfalls(kind, report) == [], kind
