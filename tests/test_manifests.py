"""The XL/2 models have exactly the released checkpoints' keys, shapes, kinds and parameter counts."""
import json

import pytest
import torch

from diffusion.model.builder import build_model, build_model_from_config
from diffusion.model.nets import PixArt, PixArtMS
from diffusion.model.nets.PixArt_blocks import get_2d_sincos_pos_embed
from diffusion.utils.config import load_config
from tests.conftest import REPO, SHARED_REF

# the plain models' manifests; the ControlNet wrappers' (manifest_Control*.json, keyed by "wrapper_class") are
# checked in tests/test_controlnet.py
MANIFESTS = sorted(p for p in SHARED_REF.glob("manifest_*.json") if not p.stem.startswith("manifest_Control"))
CLASSES = {"PixArt": PixArt, "PixArtMS": PixArtMS}


def load_manifest(path):
    return json.loads(path.read_text())


def meta_model(manifest):
    with torch.device("meta"):
        return CLASSES[manifest["class"]](**manifest["constructor_kwargs"])


def test_manifests_are_present():
    assert [p.stem for p in MANIFESTS] == ["manifest_PixArtMS_XL_2_1024", "manifest_PixArt_XL_2_256",
                                           "manifest_PixArt_XL_2_512"], f"expected three model manifests in {SHARED_REF}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_model_has_exactly_the_released_keys_shapes_and_kinds(path):
    manifest = load_manifest(path)
    model = meta_model(manifest)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    state = model.state_dict()
    assert list(state) == list(manifest["state_dict"])
    assert len(state) == manifest["num_keys"]
    for key, entry in manifest["state_dict"].items():
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype).replace("torch.", "") == entry["dtype"], key
        assert (key in params) == (entry["kind"] == "parameter"), key
        assert (key in buffers) == (entry["kind"] == "buffer"), key


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_model_has_the_released_parameter_count(path):
    manifest = load_manifest(path)
    model = meta_model(manifest)
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(t.numel() for t in model.state_dict().values()) == manifest["num_state_dict_elements"]
    assert model.base_size == manifest["base_size"]
    assert [model.lewei_scale] == manifest["lewei_scale_attr"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_position_table_matches_the_released_rows(path):
    manifest = load_manifest(path)
    kwargs = manifest["constructor_kwargs"]
    grid = kwargs["input_size"] // kwargs["patch_size"]
    table = get_2d_sincos_pos_embed(kwargs["hidden_size"], grid, kwargs["lewei_scale"], manifest["base_size"]).float()
    assert list(table.unsqueeze(0).shape) == manifest["buffers"]["pos_embed"]
    for row, values in manifest["pos_embed_rows"].items():
        torch.testing.assert_close(table[int(row), :len(values)], torch.tensor(values), rtol=0, atol=1e-7)
    assert table.double().sum().item() == pytest.approx(manifest["pos_embed_sum"], rel=1e-9)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_preset_by_name_builds_the_same_model(path):
    manifest = load_manifest(path)
    with torch.device("meta"):
        model = build_model(manifest["model"], **manifest["constructor_kwargs"])
    reference = meta_model(manifest).state_dict()
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_released_config_builds_the_manifest_model(path):
    manifest = load_manifest(path)
    cfg = load_config(REPO / manifest["config_file"])
    with torch.device("meta"):
        model = build_model_from_config(cfg)
    assert type(model).__name__ == manifest["class"]
    assert cfg.model == manifest["model"]
    assert (model.input_size, model.lewei_scale) == (manifest["constructor_kwargs"]["input_size"],
                                                     manifest["constructor_kwargs"]["lewei_scale"])
    assert list(model.state_dict()) == list(manifest["state_dict"])
