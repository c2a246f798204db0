"""Numerical equivalence with diffusers' PixArtTransformer2DModel and lossless conversion both ways."""
import subprocess
import sys

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from diffusion.model.nets import PixArt, PixArtMS
from diffusion.utils.checkpoint import CheckpointError, read_state_dict
from diffusion.utils.diffusers_interop import (
    NULL_CAPTION_FILE,
    architecture_of,
    build_diffusers_model,
    diffusers_to_pixart,
    load_diffusers_transformer,
    pixart_to_diffusers,
    save_diffusers_transformer,
)
from tests.conftest import REPO, tiny_inputs, tiny_model
from tools import convert_pixart_to_diffusers as convert_tool

TOOL = REPO / "tools" / "convert_pixart_to_diffusers.py"
TOL = dict(rtol=0, atol=1e-5)


def converted(model):
    state, _ = pixart_to_diffusers(model.state_dict())
    return build_diffusers_model(architecture_of(model), state).eval()


def diffusers_forward(model, x, t, y, mask, info=None):
    added = {"resolution": info["img_hw"], "aspect_ratio": info["aspect_ratio"]} if info else None
    with torch.no_grad():
        return model(x, y, t, added_cond_kwargs=added, encoder_attention_mask=mask).sample


@pytest.mark.parametrize("use_mask", [True, False], ids=["padded-mask", "mask-none"])
def test_pixart_matches_diffusers(use_mask):
    ours = tiny_model(PixArt)
    theirs = converted(ours)
    x, t, y, mask, _ = tiny_inputs()
    mask = mask if use_mask else None
    with torch.no_grad():
        expected = ours(x, t, y, mask)
    torch.testing.assert_close(diffusers_forward(theirs, x, t, y, mask), expected, **TOL)


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (12, 6)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("use_mask", [True, False], ids=["padded-mask", "mask-none"])
def test_pixartms_matches_diffusers_with_micro_conditions(hw, use_mask):
    ours = tiny_model(PixArtMS, lewei_scale=2.0)
    theirs = converted(ours)
    x, t, y, mask, info = tiny_inputs(height=hw[0], width=hw[1])
    mask = mask if use_mask else None
    with torch.no_grad():
        expected = ours(x, t, y, mask, data_info=info)
    assert expected.abs().max() > 0.1  # every layer randomised: a real signal, not zeros
    torch.testing.assert_close(diffusers_forward(theirs, x, t, y, mask, info), expected, **TOL)


def test_fractional_timesteps_match_diffusers():
    ours = tiny_model(PixArt)
    theirs = converted(ours)
    x, _, y, mask, _ = tiny_inputs()
    t = torch.tensor([949.05, 0.001, 12.5])
    with torch.no_grad():
        expected = ours(x, t, y, mask)
    torch.testing.assert_close(diffusers_forward(theirs, x, t, y, mask), expected, **TOL)


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_conversion_round_trip_gives_the_identical_state_dict(cls):
    model = tiny_model(cls)
    arch = architecture_of(model)
    state, extras = pixart_to_diffusers(model.state_dict())
    back = diffusers_to_pixart(state, extras["y_embedding"], arch["input_size"], arch["lewei_scale"])
    original = model.state_dict()
    assert set(back) == set(original)
    for key in original:
        assert torch.equal(back[key], original[key]), key


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_diffusers_folder_loads_with_from_pretrained_and_converts_back(tmp_path, cls):
    model = tiny_model(cls)
    save_diffusers_transformer(model.state_dict(), architecture_of(model), tmp_path / "transformer")
    assert (tmp_path / "transformer" / NULL_CAPTION_FILE).is_file()
    theirs = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    x, t, y, mask, info = tiny_inputs()
    with torch.no_grad():
        expected = model(x, t, y, mask, data_info=info)
    torch.testing.assert_close(diffusers_forward(theirs, x, t, y, mask, info if cls is PixArtMS else None),
                               expected, **TOL)
    arch, back = load_diffusers_transformer(tmp_path / "transformer")
    assert arch == architecture_of(model)
    for key, value in model.state_dict().items():
        assert torch.equal(back[key], value), key


def test_folder_without_null_caption_needs_an_explicit_source(tmp_path):
    model = tiny_model()
    folder = save_diffusers_transformer(model.state_dict(), architecture_of(model), tmp_path / "t")
    (folder / NULL_CAPTION_FILE).unlink()
    with pytest.raises(CheckpointError, match="no pixart_null_caption.safetensors"):
        load_diffusers_transformer(folder)
    _, back = load_diffusers_transformer(folder, null_caption=model.y_embedder.y_embedding)
    assert torch.equal(back["y_embedder.y_embedding"], model.y_embedder.y_embedding)


def test_unmapped_keys_are_errors():
    state = tiny_model().state_dict()
    state["blocks.0.attn.q_norm.weight"] = torch.ones(24)
    with pytest.raises(CheckpointError, match="no diffusers counterpart.*q_norm"):
        pixart_to_diffusers(state)


# ---------------------------------------------------------------- the command-line tool

def run_tool(*args):
    """Run the tool's main() in this process (fast); returns (exit code, error text)."""
    try:
        convert_tool.main([str(a) for a in args])
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), str(exc.code)
    return 0, ""


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0
    for flag in ("--orig_ckpt_path", "--dump_path", "--reverse", "--config", "--cfg-options", "--image_size",
                 "--multi_scale_train", "--lewei_scale", "--use-ema", "--dtype", "--null-caption-from",
                 "--random-null-caption", "--model_max_length", "--overwrite"):
        assert flag in result.stdout, flag


def test_tool_converts_a_checkpoint_there_and_back(tmp_path, tiny_config):
    model = tiny_model()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "tiny.pth")
    code, err = run_tool("--orig_ckpt_path", tmp_path / "tiny.pth", "--config", tiny_config,
                         "--dump_path", tmp_path / "diffusers")
    assert code == 0, err
    assert (tmp_path / "diffusers" / "config.json").is_file()
    code, err = run_tool("--reverse", "--orig_ckpt_path", tmp_path / "diffusers", "--dump_path", tmp_path / "back.pth")
    assert code == 0, err
    restored = read_state_dict(tmp_path / "back.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(restored[key], value), key
    code, err = run_tool("--reverse", "--orig_ckpt_path", tmp_path / "diffusers", "--dump_path", tmp_path / "back.pth")
    assert code != 0 and "exists; pass --overwrite" in err


def test_tool_rejects_a_checkpoint_that_does_not_fit_the_config(tmp_path, tiny_config):
    state = tiny_model().state_dict()
    del state["blocks.1.mlp.fc1.weight"]
    torch.save({"state_dict": state}, tmp_path / "bad.pth")
    code, err = run_tool("--orig_ckpt_path", tmp_path / "bad.pth", "--config", tiny_config,
                         "--dump_path", tmp_path / "out")
    assert code != 0
    assert "missing keys [blocks.1.mlp.fc1.weight]" in err
    assert not (tmp_path / "out").exists()


def test_tool_reverse_with_a_random_null_caption_is_explicit_and_seeded(tmp_path, capsys):
    model = tiny_model()
    folder = save_diffusers_transformer(model.state_dict(), architecture_of(model), tmp_path / "t")
    (folder / NULL_CAPTION_FILE).unlink()
    code, err = run_tool("--reverse", "--orig_ckpt_path", folder, "--dump_path", tmp_path / "a.pth")
    assert code != 0 and "no pixart_null_caption.safetensors" in err
    for name in ("a.safetensors", "b.safetensors"):
        code, err = run_tool("--reverse", "--orig_ckpt_path", folder, "--dump_path", tmp_path / name,
                             "--random-null-caption", 7, "--model_max_length", 8)
        assert code == 0, err
    assert "guidance with it is meaningless" in capsys.readouterr().out
    a, b = read_state_dict(tmp_path / "a.safetensors"), read_state_dict(tmp_path / "b.safetensors")
    assert torch.equal(a["y_embedder.y_embedding"], b["y_embedder.y_embedding"])
    assert a["y_embedder.y_embedding"].shape == (8, 32)


# ---------------------------------------------------------------- broken folders are named errors

def test_tool_reverse_of_a_folder_with_a_malformed_config_names_the_file(tmp_path):
    model = tiny_model()
    folder = save_diffusers_transformer(model.state_dict(), architecture_of(model), tmp_path / "t")
    (folder / "config.json").write_text("not json")
    for extra in ([], ["--random-null-caption", 1]):
        code, err = run_tool("--reverse", "--orig_ckpt_path", folder, "--dump_path", tmp_path / "back.pth", *extra)
        assert code != 0 and f"{folder / 'config.json'} is not valid JSON" in err
    assert not (tmp_path / "back.pth").exists()


def test_a_folder_whose_weights_lack_a_tensor_names_the_folder_and_the_tensor(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tiny_model()
    folder = save_diffusers_transformer(model.state_dict(), architecture_of(model), tmp_path / "t")
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    del weights["transformer_blocks.1.attn2.to_k.weight"]
    save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=f"{folder}: diffusers state dict lacks the key "
                                              "'transformer_blocks.1.attn2.to_k.weight'"):
        load_diffusers_transformer(folder)


def test_a_shard_index_naming_a_missing_shard_is_a_named_error(tmp_path):
    model = tiny_model()
    state, _ = pixart_to_diffusers(model.state_dict())
    folder = tmp_path / "t"
    build_diffusers_model(architecture_of(model), state).save_pretrained(folder, max_shard_size="200KB")
    shard = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"shards \\['{shard.name}'\\] listed in "
                                              "diffusion_pytorch_model.safetensors.index.json are missing"):
        load_diffusers_transformer(folder, null_caption=model.y_embedder.y_embedding)
