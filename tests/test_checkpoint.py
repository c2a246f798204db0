"""Checkpoint files: released layout, our own layout, safetensors; every corruption gives a named error."""
import os

import pytest
import torch

from diffusion.model.nets import PixArt, PixArtMS
from diffusion.utils.checkpoint import (
    CheckpointError,
    atomic_save,
    load_checkpoint,
    load_state_dict_into,
    read_state_dict,
    save_weights,
)
from tests.conftest import TINY, tiny_model


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_released_format_checkpoint_reloads_strictly(tmp_path, cls):
    source = tiny_model(cls, seed=1)
    path = tmp_path / "PixArt-tiny.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    target = tiny_model(cls, seed=2)
    report = load_checkpoint(path, target)
    assert_same_weights(source, target)
    assert report.regenerated == ["pos_embed"] and not report.missing and not report.unexpected


def test_safetensors_and_flat_state_dicts_load(tmp_path):
    source = tiny_model(seed=1)
    save_weights(source.state_dict(), tmp_path / "w.safetensors")
    torch.save(source.state_dict(), tmp_path / "flat.pt")
    for name in ("w.safetensors", "flat.pt"):
        target = tiny_model(seed=2)
        load_checkpoint(tmp_path / name, target)
        assert_same_weights(source, target)


def test_ema_weights_are_chosen_with_use_ema(tmp_path):
    live, ema = tiny_model(seed=1), tiny_model(seed=3)
    path = tmp_path / "epoch_1_step_10.pth"
    torch.save({"state_dict": live.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 1, "step": 10}, path)
    target = tiny_model(seed=2)
    load_checkpoint(path, target, use_ema=True)
    assert_same_weights(ema, target)
    plain = save_weights(live.state_dict(), tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match="plain.pth has no EMA weights"):
        load_checkpoint(plain, target, use_ema=True)


def test_pos_embed_of_another_resolution_is_regenerated(tmp_path):
    source = tiny_model(PixArtMS, seed=1)
    state = source.state_dict()
    state["pos_embed"] = torch.randn(1, 64, TINY["hidden_size"])  # as saved by a model at another size
    target = tiny_model(PixArtMS, seed=2)
    expected_pos = target.pos_embed.clone()
    load_state_dict_into(target, state)
    assert torch.equal(target.pos_embed, expected_pos)
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_checkpoint_without_pos_embed_loads(tmp_path):
    source = tiny_model(seed=1)
    state = {k: v for k, v in source.state_dict().items() if k != "pos_embed"}
    target = tiny_model(seed=2)
    load_state_dict_into(target, state)
    assert_same_weights(source, target)


def test_missing_key_is_an_error_listing_it(tmp_path):
    state = tiny_model().state_dict()
    del state["blocks.1.mlp.fc2.bias"]
    torch.save({"state_dict": state}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\]"):
        load_checkpoint(tmp_path / "c.pth", tiny_model())


def test_unexpected_key_is_an_error_listing_it(tmp_path):
    state = tiny_model().state_dict()
    state["blocks.2.attn.qkv.weight"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \[blocks\.2\.attn\.qkv\.weight\]"):
        load_checkpoint(tmp_path / "c.pth", tiny_model())


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    state = tiny_model().state_dict()
    state["t_block.1.weight"] = torch.zeros(10, 96)
    torch.save({"state_dict": state}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match=r"t_block\.1\.weight: checkpoint \(10, 96\) vs model \(576, 96\)"):
        load_checkpoint(tmp_path / "c.pth", tiny_model())


@pytest.mark.parametrize("content", [b"", b"this is not a checkpoint", os.urandom(256)], ids=["empty", "text", "noise"])
def test_a_file_that_is_not_a_checkpoint_is_an_error_naming_it(tmp_path, content):
    path = tmp_path / "broken.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pth is not a readable PyTorch checkpoint"):
        load_checkpoint(path, tiny_model())


def test_a_truncated_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save({"state_dict": tiny_model().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(CheckpointError, match="cut.pth is not a readable PyTorch checkpoint"):
        load_checkpoint(path, tiny_model())


class Payload:
    """Any class instance: unpickling it would run arbitrary code in the reference's torch.load."""


def test_pickled_objects_are_refused_without_being_executed(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(CheckpointError, match="not loaded for safety"):
        load_checkpoint(path, tiny_model())


@pytest.mark.parametrize("obj, message", [
    ([1, 2, 3], "expected a dict, found list"),
    ({"model": "weights.bin", "epoch": 3}, "not a model checkpoint"),
    ({"state_dict": {"a": 1}}, "must map names to tensors"),
])
def test_wrong_structures_are_errors(tmp_path, obj, message):
    path = tmp_path / "odd.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_corrupt_safetensors_is_an_error(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_state_dict(path)


def test_missing_file_is_named():
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        read_state_dict("/no/such/dir/nowhere.pth")


def test_ddp_prefix_is_stripped_and_reported():
    source = tiny_model(seed=1)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    target = tiny_model(seed=2)
    report = load_state_dict_into(target, state)
    assert report.stripped_prefix == "module."
    assert_same_weights(source, target)


def test_non_strict_load_reports_instead_of_failing():
    state = tiny_model(seed=1).state_dict()
    del state["final_layer.linear.bias"]
    state["extra_head.weight"] = torch.zeros(2)
    report = load_state_dict_into(tiny_model(seed=2), state, strict=False)
    assert report.missing == ["final_layer.linear.bias"] and report.unexpected == ["extra_head.weight"]
    assert "missing (kept initialised)" in report.summary()


def test_diffusers_state_dict_gets_a_conversion_hint():
    with pytest.raises(CheckpointError, match="convert_pixart_to_diffusers.py --reverse"):
        load_state_dict_into(tiny_model(), {"transformer_blocks.0.attn1.to_q.weight": torch.zeros(1)})


def test_interrupted_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    atomic_save({"step": 1}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


# ---------------------------------------------------------------- diffusers weights (--load-from, --model_path)

def diffusers_folder(tmp_path, model, **save_options):
    """`model` saved as a diffusers PixArtTransformer2DModel folder, by diffusers itself (sharded if asked)."""
    from diffusion.utils.diffusers_interop import (
        NULL_CAPTION_FILE,
        architecture_of,
        build_diffusers_model,
        pixart_to_diffusers,
    )
    state, extras = pixart_to_diffusers(model.state_dict())
    folder = tmp_path / "transformer"
    build_diffusers_model(architecture_of(model), state).save_pretrained(folder, **save_options)
    save_weights({"y_embedding": extras["y_embedding"]}, folder / NULL_CAPTION_FILE)
    return folder


def test_a_diffusers_folder_reads_as_our_state_dict(tmp_path):
    source = tiny_model(seed=1)
    target = tiny_model(seed=2)
    report = load_state_dict_into(target, read_state_dict(diffusers_folder(tmp_path, source)))
    assert_same_weights(source, target)
    assert not report.missing and not report.unexpected


def test_a_sharded_diffusers_folder_reads_every_shard(tmp_path):
    source = tiny_model(seed=1)
    folder = diffusers_folder(tmp_path, source, max_shard_size="200KB")
    assert len(list(folder.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    target = tiny_model(seed=2)
    load_state_dict_into(target, read_state_dict(folder))
    assert_same_weights(source, target)


def test_a_diffusers_named_safetensors_file_is_converted(tmp_path):
    from diffusion.utils.diffusers_interop import pixart_to_diffusers
    source = tiny_model(seed=1)
    save_weights(pixart_to_diffusers(source.state_dict())[0], tmp_path / "diffusers.safetensors")
    target = tiny_model(seed=2)
    initial_null_caption = target.y_embedder.y_embedding.clone()
    report = load_state_dict_into(target, read_state_dict(tmp_path / "diffusers.safetensors"), strict=False)
    # the file carries no null caption: every other weight is loaded, that one stays initialised and is reported
    assert report.missing == ["y_embedder.y_embedding"] and not report.unexpected
    assert torch.equal(target.y_embedder.y_embedding, initial_null_caption)
    assert torch.equal(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_a_non_strict_load_that_matches_no_weight_is_an_error_naming_both_sides(tmp_path):
    path = tmp_path / "other_model.safetensors"
    save_weights({"encoder.layer.0.weight": torch.zeros(2), "pos_embed": torch.zeros(1, 16, 96)}, path)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_into(tiny_model(), read_state_dict(path), strict=False, source=path)
    message = str(err.value)
    assert message.startswith(f"{path}: none of its 2 tensors is a weight of PixArt")
    assert "its keys [encoder.layer.0.weight, pos_embed] (2 keys)" in message
    assert "the model's keys [blocks.0.attn.proj.bias" in message


def test_a_folder_is_not_a_missing_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty is a folder without config.json .*expected a diffusers"):
        read_state_dict(tmp_path / "empty")


@pytest.mark.parametrize("damage, message", [
    (lambda f: [p.unlink() for p in f.glob("diffusion_pytorch_model*")],
     r"transformer has config.json but no weights: expected diffusion_pytorch_model.safetensors"),
    (lambda f: (f / "config.json").write_text("{'sample_size': 8,"),
     r"transformer/config.json is not valid JSON \(Expecting property name .* at line 1 column 2\): expected the "
     "config of a diffusers PixArtTransformer2DModel"),
    (lambda f: (f / "config.json").write_text('{"_class_name": "AutoencoderKL", "sample_size": 8}'),
     r"transformer/config.json describes a diffusers AutoencoderKL: expected the config of a diffusers "
     "PixArtTransformer2DModel"),
    (lambda f: (f / "config.json").write_text('{"model_type": "t5", "d_model": 32}'),
     r"config.json is the config of a transformers 't5' model"),
    (lambda f: (f / "config.json").write_text('{"_class_name": "PixArtTransformer2DModel", "num_layers": 2}'),
     r"config.json lacks \['sample_size', 'num_attention_heads'"),
], ids=["no-weights", "not-json", "another-class", "a-t5-folder", "incomplete"])
def test_a_broken_diffusers_folder_is_a_named_error(tmp_path, damage, message):
    folder = diffusers_folder(tmp_path, tiny_model())
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(folder)
