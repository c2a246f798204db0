"""LoRA adapters between our PixArt and diffusers' PixArtTransformer2DModel + peft: exact both ways (fp32, 1e-5),
bitwise round trips of ours, merging, and named errors for adapters that do not fit."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from diffusion.model.lora import (
    LoraSpec,
    adapter_state_dict,
    add_adapter,
    merge_adapters,
    resolve_targets,
    use_adapters,
)
from diffusion.model.nets import PixArt, PixArtMS
from diffusion.utils.checkpoint import CheckpointError
from diffusion.utils.lora_interop import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, read_peft_folder, save_adapter
from tests.conftest import tiny_inputs, tiny_model
from tests.test_diffusers_interop import converted, diffusers_forward

TOL = dict(rtol=0, atol=1e-5)
# The target list of the released PixArt-LCM-LoRA (diffusers' names; 'proj' includes the patch-embedding conv).
LCM_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "proj",
                    "linear", "linear_1", "linear_2"]


def randomize_adapters(model, seed=5, scale=0.1):
    """Every adapter tensor N(0, scale) (B too, which peft starts at zero), DoRA magnitudes around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if "magnitude" in name else 0.0))
    return model


def diffusers_adapter(base, folder, **lora):
    """A peft adapter trained (here: drawn) on diffusers' twin of `base`, saved as a peft folder; the twin returned."""
    twin = randomize_adapters(get_peft_model(converted(base), LoraConfig(**lora))).eval()
    twin.save_pretrained(folder)
    return twin


def our_adapter(model, ranks=4, alpha=8.0, targets=("self_attention", "cross_attention", "mlp", "t_block"), **flags):
    names = resolve_targets(model, targets)
    spec = LoraSpec({n: ranks for n in names}, {n: alpha for n in names}, **flags)
    return randomize_adapters(add_adapter(model, spec))


def forward(model, cls, inputs):
    x, t, y, mask, info = inputs
    with torch.no_grad():
        return model(x, t, y, mask, data_info=info if cls is PixArtMS else None)


@pytest.mark.parametrize("cls, lora", [
    (PixArt, dict(r=4, lora_alpha=8)),
    (PixArtMS, dict(r=4, lora_alpha=8)),
    (PixArt, dict(r=4, lora_alpha=4, use_dora=True, rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 16})),
    (PixArt, dict(r=3, lora_alpha=6, use_rslora=True, rank_pattern={"attn2.to_v": 5})),
], ids=["lcm-targets", "multi-scale", "dora-mixed-ranks", "rslora"])
def test_an_adapter_peft_trained_on_diffusers_gives_our_model_the_same_outputs(tmp_path, cls, lora):
    ours = tiny_model(cls, lewei_scale=2.0 if cls is PixArtMS else 1.0)
    twin = diffusers_adapter(ours, tmp_path / "adapter", target_modules=LCM_LORA_TARGETS, **lora)
    x, t, y, mask, info = inputs = tiny_inputs()
    expected = diffusers_forward(twin.base_model.model, x, t, y, mask, info if cls is PixArtMS else None)
    spec = load_adapter(ours, tmp_path / "adapter")
    assert spec.ranks["x_embedder.proj"] == lora["r"]  # the patch-embedding conv ('proj') is adapted too
    torch.testing.assert_close(forward(ours, cls, inputs), expected, **TOL)
    use_adapters(ours, {})
    assert (forward(ours, cls, inputs) - expected).abs().max() > 1e-3  # the adapter does change the outputs


@pytest.mark.parametrize("flags", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_our_adapter_loads_in_diffusers_with_peft_and_gives_the_same_outputs(tmp_path, flags):
    base = tiny_model()
    ours = our_adapter(tiny_model(), targets=("self_attention", "cross_attention", "mlp", "t_block",
                                              "caption_projection", "final_layer.linear", "x_embedder.proj"), **flags)
    save_adapter(ours, tmp_path / "adapter")
    theirs = PeftModel.from_pretrained(converted(base), tmp_path / "adapter").eval()
    x, t, y, mask, _ = inputs = tiny_inputs()
    expected = forward(ours, PixArt, inputs)
    torch.testing.assert_close(diffusers_forward(theirs.base_model.model, x, t, y, mask), expected, **TOL)
    use_adapters(ours, {})
    assert (forward(ours, PixArt, inputs) - expected).abs().max() > 1e-3  # the adapter does change the outputs
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert "transformer_blocks.0.attn1.to_k" in config["target_modules"] and config["peft_type"] == "LORA"


def test_our_adapter_round_trips_bitwise_through_the_diffusers_folder(tmp_path):
    ours = our_adapter(tiny_model(), use_dora=True)
    save_adapter(ours, tmp_path / "adapter")
    again = tiny_model()
    load_adapter(again, tmp_path / "adapter")
    saved, loaded = adapter_state_dict(ours.state_dict()), adapter_state_dict(again.state_dict())
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def test_merged_adapters_give_the_unmerged_outputs(tmp_path):
    model = our_adapter(tiny_model())
    save_adapter(model, tmp_path / "first")
    diffusers_adapter(tiny_model(), tmp_path / "second", target_modules=LCM_LORA_TARGETS, r=2, lora_alpha=2)
    load_adapter(model, tmp_path / "second", name="second")
    use_adapters(model, {"default": 0.7, "second": 1.5})
    inputs = tiny_inputs()
    unmerged = forward(model, PixArt, inputs)
    merge_adapters(model)
    assert not any(".lora_" in k or ".base_layer." in k for k in model.state_dict())  # the plain model again
    torch.testing.assert_close(forward(model, PixArt, inputs), unmerged, **TOL)


def test_an_adapter_for_modules_this_model_lacks_is_refused_by_key(tmp_path):
    diffusers_adapter(tiny_model(depth=3), tmp_path / "deeper", target_modules=["to_q"], r=2, lora_alpha=2)
    with pytest.raises(CheckpointError, match=r"base_model\.model\.transformer_blocks\.2\.attn1\.to_q\.lora_A\.weight "
                                              r"adapts 'transformer_blocks\.2\.attn1\.to_q', which .* \(2 blocks\)"):
        load_adapter(tiny_model(), tmp_path / "deeper")


def test_an_adapter_of_another_width_is_refused_naming_the_key_and_both_shapes(tmp_path):
    diffusers_adapter(tiny_model(hidden_size=48, num_heads=2), tmp_path / "narrow", target_modules=["attn1.to_q"], r=2,
                      lora_alpha=2)
    with pytest.raises(CheckpointError, match=r"transformer_blocks\.0\.attn1\.to_q\.lora_A\.weight has shape "
                                              r"\(2, 48\); this model needs \(2, 96\)"):
        load_adapter(tiny_model(), tmp_path / "narrow")


def test_weights_of_another_rank_than_the_config_says_are_refused(tmp_path):
    diffusers_adapter(tiny_model(), tmp_path / "adapter", target_modules=["to_q"], r=2, lora_alpha=2)
    path = tmp_path / "adapter" / ADAPTER_CONFIG
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 4}))
    with pytest.raises(CheckpointError, match=r"attn1\.to_q\.lora_A\.weight has shape \(2, 96\); adapter_config.json "
                                              r"gives .* rank 4, i\.e\. \(4, 96\)"):
        read_peft_folder(tmp_path / "adapter")


def test_features_beyond_lora_and_dora_are_refused(tmp_path):
    diffusers_adapter(tiny_model(), tmp_path / "adapter", target_modules=["to_q"], r=2, lora_alpha=2,
                      modules_to_save=["proj_out"])
    with pytest.raises(CheckpointError, match="modules_to_save=.* is not supported"):
        read_peft_folder(tmp_path / "adapter")
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).is_file()
