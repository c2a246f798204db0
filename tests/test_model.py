"""Behaviour of PixArt / PixArtMS: initialisation, masks, positions, micro-conditions, dtypes, checkpointing."""
import math

import pytest
import torch

from diffusion.model.builder import build_model
from diffusion.model.nets import PixArt, PixArtMS
from diffusion.model.nets.PixArt_blocks import timestep_embedding
from tests.conftest import TINY, tiny_inputs, tiny_model


# ---------------------------------------------------------------- initialisation

def test_fresh_model_zero_initialises_cross_attention_output_and_final_layer():
    model = PixArt(**TINY)
    for block in model.blocks:
        assert not block.cross_attn.proj.weight.any() and not block.cross_attn.proj.bias.any()
    assert not model.final_layer.linear.weight.any() and not model.final_layer.linear.bias.any()
    x, t, y, mask, _ = tiny_inputs()
    assert not model(x, t, y, mask).any()


def test_initialisation_follows_the_reference_scheme():
    torch.manual_seed(0)
    model = PixArt(**{**TINY, "hidden_size": 384, "num_heads": 6, "caption_channels": 256})
    D = 384
    for linear in (model.t_embedder.mlp[0], model.t_block[1], model.y_embedder.y_proj.fc1):
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert not linear.bias.any()
    qkv = model.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (qkv.shape[0] + qkv.shape[1]))  # xavier_uniform
    assert qkv.abs().max().item() <= bound
    assert qkv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert not model.blocks[0].attn.qkv.bias.any()
    patch = model.x_embedder.proj.weight.view(D, -1)
    assert patch.abs().max().item() <= math.sqrt(6 / (patch.shape[0] + patch.shape[1]))
    assert model.blocks[0].scale_shift_table.std().item() == pytest.approx(1 / math.sqrt(D), rel=0.1)
    assert model.y_embedder.y_embedding.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.1)
    assert not model.y_embedder.y_embedding.requires_grad


def test_pixartms_size_embedders_are_initialised_like_the_timestep_embedder():
    torch.manual_seed(0)
    model = PixArtMS(**{**TINY, "hidden_size": 384, "num_heads": 6})
    for embedder in (model.csize_embedder, model.ar_embedder):
        assert embedder.mlp[0].weight.shape == (128, 256)
        assert embedder.mlp[2].weight.std().item() == pytest.approx(0.02, rel=0.15)
        assert not embedder.mlp[0].bias.any()


# ---------------------------------------------------------------- timesteps

def test_timestep_sinusoid_is_cos_first_with_reference_frequencies():
    emb = timestep_embedding(torch.tensor([3.0]), 256)
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    torch.testing.assert_close(emb[0, :128], torch.cos(3.0 * freqs))
    torch.testing.assert_close(emb[0, 128:], torch.sin(3.0 * freqs))


def test_fractional_timesteps_are_not_rounded_in_half_precision():
    model = PixArt(**TINY).half()
    a = model.t_embedder(torch.tensor([949.05]))
    b = model.t_embedder(torch.tensor([949.0]))
    assert not torch.equal(a, b)  # the reference casts t to fp16 first, making these equal


def test_scalar_timestep_is_broadcast_to_the_batch():
    model = tiny_model()
    x, _, y, mask, _ = tiny_inputs()
    torch.testing.assert_close(model(x, 500.0, y, mask), model(x, torch.full((3,), 500.0), y, mask))


# ---------------------------------------------------------------- caption masks

def test_masked_caption_tokens_do_not_influence_the_output():
    model = tiny_model()
    x, t, y, mask, _ = tiny_inputs()
    y2 = y.clone()
    y2[mask == 0] = torch.randn_like(y2[mask == 0])
    torch.testing.assert_close(model(x, t, y, mask), model(x, t, y2, mask), rtol=0, atol=0)


def test_mask_equals_running_each_sample_on_its_kept_tokens_only():
    """The reference packs each caption's kept tokens block-diagonally; this is that semantics."""
    model = tiny_model()
    x, t, y, mask, _ = tiny_inputs()
    batched = model(x, t, y, mask)
    for i in range(3):
        kept = y[i:i + 1, mask[i] == 1]
        alone = model(x[i:i + 1], t[i:i + 1], kept, None)
        torch.testing.assert_close(batched[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_mask_none_keeps_all_tokens_and_4d_training_masks_are_accepted():
    model = tiny_model()
    x, t, y, mask, _ = tiny_inputs()
    torch.testing.assert_close(model(x, t, y, None), model(x, t, y, torch.ones_like(mask)))
    torch.testing.assert_close(model(x, t, y, mask[:, None, None, :]), model(x, t, y, mask))
    torch.testing.assert_close(model(x, t, y[:, None], mask), model(x, t, y, mask))


def test_a_smaller_mask_batch_is_repeated_for_guidance():
    model = tiny_model()
    x, t, y, mask, _ = tiny_inputs(batch=2)
    doubled = model(x, t, y, mask[:1])
    torch.testing.assert_close(doubled, model(x, t, y, mask[:1].repeat(2, 1)))


def test_a_caption_mask_keeping_no_token_is_an_error():
    model = tiny_model()
    x, t, y, mask, _ = tiny_inputs()
    mask[1] = 0
    with pytest.raises(ValueError, match=r"rows \[1\] keep no token"):
        model(x, t, y, mask)


# ---------------------------------------------------------------- sizes and micro-conditions

def test_pixart_rejects_latents_of_another_size():
    model = tiny_model()
    x, t, y, mask, _ = tiny_inputs(height=8, width=12)
    with pytest.raises(ValueError, match="use PixArtMS"):
        model(x, t, y, mask)


@pytest.mark.parametrize("hw", [(8, 12), (12, 8), (6, 10), (16, 16)])
def test_pixartms_takes_any_size_divisible_by_the_patch(hw):
    model = tiny_model(PixArtMS)
    x, t, y, mask, info = tiny_inputs(height=hw[0], width=hw[1])
    out = model(x, t, y, mask, data_info=info)
    assert out.shape == (3, 8, *hw) and torch.isfinite(out).all()


def test_pixartms_latent_not_divisible_by_patch_is_an_error():
    model = tiny_model(PixArtMS)
    x, t, y, mask, info = tiny_inputs(height=8, width=9)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        model(x, t, y, mask, data_info=info)


def test_pixartms_requires_data_info_and_tiles_a_single_row():
    model = tiny_model(PixArtMS)
    x, t, y, mask, info = tiny_inputs()
    with pytest.raises(ValueError, match="needs data_info"):
        model(x, t, y, mask)
    one = {k: v[:1] for k, v in info.items()}
    tiled = {k: v[:1].repeat(3, 1) for k, v in info.items()}
    torch.testing.assert_close(model(x, t, y, mask, data_info=one), model(x, t, y, mask, data_info=tiled))


def test_micro_conditions_change_the_output():
    model = tiny_model(PixArtMS)
    x, t, y, mask, info = tiny_inputs()
    other = {"img_hw": info["img_hw"] * 2, "aspect_ratio": info["aspect_ratio"]}
    assert not torch.allclose(model(x, t, y, mask, data_info=info), model(x, t, y, mask, data_info=other))


def test_pixartms_on_its_base_grid_uses_the_same_positions_as_pixart():
    ms, plain = tiny_model(PixArtMS), tiny_model(PixArt)
    torch.testing.assert_close(ms.position_embedding(4, 4, "cpu"), plain.pos_embed)
    recomputed = ms.position_embedding(4, 6, "cpu")
    assert recomputed.shape == (1, 24, 96)


# ---------------------------------------------------------------- options

def test_gradient_checkpointing_gives_identical_outputs_and_gradients():
    x, t, y, mask, _ = tiny_inputs()
    results = []
    for ckpt, gc_step in ((False, 1), (True, 1), (True, 2)):
        model = tiny_model(grad_checkpointing=ckpt, gc_step=gc_step).train()
        model.y_embedder.uncond_prob = 0.0
        out = model(x, t, y, mask)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0])
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_on_cpu_close_to_fp32(dtype):
    model = tiny_model(PixArtMS)
    x, t, y, mask, info = tiny_inputs(height=8, width=12)
    ref = model(x, t, y, mask, data_info=info)
    out = model.to(dtype)(x, t, y, mask, data_info=info)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_fp32_attention_and_bf16_autocast_agree_with_fp32():
    x, t, y, mask, _ = tiny_inputs()
    ref = tiny_model()(x, t, y, mask)
    model = tiny_model(fp32_attention=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, mask)
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_pred_sigma_false_predicts_only_eps_channels():
    model = tiny_model(pred_sigma=False, learn_sigma=False)
    x, t, y, mask, _ = tiny_inputs()
    assert model(x, t, y, mask).shape == (3, 4, 8, 8)
    with pytest.raises(ValueError, match="learn_sigma=True needs pred_sigma=True"):
        PixArt(**TINY, pred_sigma=False, learn_sigma=True)


def test_forward_with_dpmsolver_returns_the_eps_half():
    model = tiny_model(PixArtMS)
    x, t, y, mask, info = tiny_inputs()
    full = model(x, t, y, mask, data_info=info)
    torch.testing.assert_close(model.forward_with_dpmsolver(x, t, y, info, mask=mask), full[:, :4])


def test_drop_path_is_random_in_training_and_off_in_eval():
    model = tiny_model(drop_path=0.5)
    model.y_embedder.uncond_prob = 0.0
    x, t, y, mask, _ = tiny_inputs()
    torch.testing.assert_close(model(x, t, y, mask), model(x, t, y, mask))
    model.train()
    torch.manual_seed(0)
    a = model(x, t, y, mask)
    torch.manual_seed(1)
    assert not torch.allclose(a, model(x, t, y, mask))


@pytest.mark.parametrize("option", [dict(window_size=14), dict(window_block_indexes=[0]), dict(use_rel_pos=True)])
def test_windowed_attention_options_are_refused_not_ignored(option):
    with pytest.raises(NotImplementedError, match="not part of PixArt-alpha"):
        PixArt(**TINY, **option)


def test_build_model_suggests_the_nearest_name_and_guards_preset_shapes():
    with pytest.raises(KeyError, match="did you mean 'PixArt_XL_2'"):
        build_model("PixArt_XL2")
    with pytest.raises(ValueError, match="fixes depth=28"):
        build_model("PixArt_XL_2", depth=12)
