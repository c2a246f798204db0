"""The model's speed options (trim_captions, pack_captions, fused_modulation, compile) and captions encoded once
for sampling (`encode_captions`) change the work, never the function: outputs and gradients match the plain model, diffusers, and the
released state-dict layout, on or off."""
import pytest
import torch

from diffusion import DPMS
from diffusion.model.guidance import guided_model
from diffusion.sampling import sample_dpm_solver
from diffusion.model.nets import PixArt, PixArtMS
from diffusion.model.nets.PixArt import trim_caption_padding
from diffusion.utils.diffusers_interop import architecture_of, build_diffusers_model, pixart_to_diffusers
from tests.conftest import tiny_inputs, tiny_model

ALL_OFF = dict(trim_captions=False, pack_captions=False, fused_modulation=False, compile=False)
ALL_ON = dict(trim_captions=True, pack_captions=True, fused_modulation=True, compile=True)
# Compiled blocks run eagerly on the CPU, and packing is off with compile: ALL_ON alone would not pack here.
EAGER_ON = dict(ALL_ON, compile=False)
TOL = dict(rtol=0, atol=1e-5)


def padded_at_the_end(mask):
    """Every caption padded after token 5 (so the shared padding can be cut), one of them shorter."""
    mask = mask.clone()
    mask[:, 5:] = 0
    mask[1, 2:] = 0
    return mask


def test_trim_caption_padding_cuts_the_shared_padding_and_drops_a_full_mask():
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    trimmed, length = trim_caption_padding(mask)
    assert length == 2 and torch.equal(trimmed, mask[:, :2])
    trimmed, length = trim_caption_padding(torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool))
    assert length == 2 and trimmed is None


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
@pytest.mark.parametrize("mask_kind", ["shared-padding", "ragged", "no-padding", "mask-none"])
@pytest.mark.parametrize("options", [ALL_ON, EAGER_ON], ids=["all-on", "eager-on"])
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_speed_options_give_the_plain_models_outputs_and_gradients(cls, mask_kind, options, grad_checkpointing):
    x, t, y, mask, info = tiny_inputs()
    mask = {"shared-padding": padded_at_the_end(mask), "ragged": mask, "no-padding": torch.ones_like(mask),
            "mask-none": None}[mask_kind]
    results = []
    for opts in (ALL_OFF, options):
        model = tiny_model(cls, grad_checkpointing=grad_checkpointing, gc_step=1, **opts).train()
        model.y_embedder.uncond_prob = 0.0
        out = model(x, t, y, mask, data_info=info)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [ALL_OFF, ALL_ON, EAGER_ON], ids=["options-off", "options-on", "eager-on"])
def test_speed_options_match_diffusers_on_shared_caption_padding(options):
    ours = tiny_model(PixArtMS, lewei_scale=2.0, **options)
    state, _ = pixart_to_diffusers(ours.state_dict())
    theirs = build_diffusers_model(architecture_of(ours), state).eval()
    x, t, y, mask, info = tiny_inputs(height=8, width=12)
    mask = padded_at_the_end(mask)
    with torch.no_grad():
        expected = ours(x, t, y, mask, data_info=info)
        out = theirs(x, y, t, added_cond_kwargs={"resolution": info["img_hw"], "aspect_ratio": info["aspect_ratio"]},
                     encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, expected, **TOL)


def test_speed_options_keep_the_state_dict_layout():
    plain, fast = tiny_model(PixArt, **ALL_OFF), tiny_model(PixArt, **ALL_ON)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in fast.state_dict().items()}
    fast.load_state_dict(plain.state_dict(), strict=True)


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_the_residual_stream_is_contiguous_from_the_patch_embedding_on(cls):
    """A transposed (column-major) token layout would make every LayerNorm and Linear copy its input."""
    model = tiny_model(cls)
    x, t, y, mask, info = tiny_inputs(height=8, width=12 if cls is PixArtMS else 8)
    layouts = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda _, args: layouts.append(args[0].is_contiguous()))
    model(x, t, y, mask, data_info=info)
    assert layouts == [True] * len(model.blocks)


def test_caption_dropout_still_sees_whole_captions_when_trimming():
    model = tiny_model(PixArt, class_dropout_prob=1.0).train()
    x, t, y, mask, _ = tiny_inputs()
    null = model.y_embedder.y_embedding.expand_as(y)
    with torch.no_grad():
        dropped = model(x, t, y, padded_at_the_end(mask))
        model.y_embedder.uncond_prob = 0.0
        explicit = model(x, t, null, padded_at_the_end(mask))
    torch.testing.assert_close(dropped, explicit, **TOL)


# ---------------------------------------------------------------- CUDA: the fused kernels and compiled blocks

@pytest.mark.gpu
@pytest.mark.parametrize("grad_checkpointing", [False, True], ids=["plain", "grad-ckpt"])
def test_cuda_fused_and_compiled_blocks_match_the_plain_model(grad_checkpointing):
    cuda = torch.device("cuda")
    x, t, y, mask, info = (v.to(cuda) if torch.is_tensor(v) else {k: a.to(cuda) for k, a in v.items()}
                           for v in tiny_inputs(height=8, width=12))
    mask = padded_at_the_end(mask)
    results = []
    for options in (ALL_OFF, ALL_ON):
        model = tiny_model(PixArtMS, grad_checkpointing=grad_checkpointing, **options).to(cuda).train()
        model.y_embedder.uncond_prob = 0.0
        out = model(x, t, y, mask, data_info=info)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad for p in model.parameters()]))
    (ref, ref_grads), (out, grads) = results
    # Generated kernels sum in another order than eager ones (and TF32 may be on): compare loosely.
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- captions encoded once for sampling

def count_projections(model):
    calls = []
    model.y_embedder.y_proj.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
@pytest.mark.parametrize("mask_kind", ["ragged", "shared-padding", "mask-none"])
def test_encoded_captions_project_once_per_dpm_solver_run_and_sample_the_same(cls, mask_kind):
    x, _, y, mask, info = tiny_inputs()
    mask = {"ragged": mask, "shared-padding": padded_at_the_end(mask), "mask-none": None}[mask_kind]
    model = tiny_model(cls)
    calls = count_projections(model)
    null = model.y_embedder.y_embedding[None].expand(len(y), -1, -1)
    with torch.no_grad():
        plain = DPMS(model.forward_with_dpmsolver, y, null, 4.5, dict(mask=mask, data_info=info)).sample(
            x, steps=6, order=2, skip_type="time_uniform", method="multistep", progress=False)
        evaluations = len(calls)
        both_masks = None if mask is None else torch.cat([mask, mask])
        captions = model.encode_captions(torch.cat([y, null]), both_masks)
        inputs = dict(y=captions, data_info={k: torch.cat([v, v]) for k, v in info.items()})
        encoded = sample_dpm_solver(guided_model(model, inputs, 4.5), x, 6)
    assert evaluations >= 6 and len(calls) == evaluations + 1
    assert torch.equal(encoded, plain)  # the same kernels on the same inputs, only fewer times


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_a_forward_with_encoded_captions_equals_one_with_the_features(cls):
    x, t, y, mask, info = tiny_inputs()
    model = tiny_model(cls)
    with torch.no_grad():
        expected = model(x, t, y, padded_at_the_end(mask), data_info=info)
        captions = model.encode_captions(y, padded_at_the_end(mask))
        torch.testing.assert_close(model(x, t, captions, data_info=info), expected, rtol=0, atol=0)
        with pytest.raises(ValueError, match="carry their mask"):
            model(x, t, captions, mask, data_info=info)
        with pytest.raises(ValueError, match="encoded caption batch 3 differs from latent batch 2"):
            model(x[:2], t[:2], captions, data_info={k: v[:2] for k, v in info.items()})


def test_encoded_captions_follow_the_weights_they_were_computed_with_only():
    """No hidden cache: features passed again are projected again, so changed weights take effect at once."""
    model = tiny_model(PixArt)
    x, t, y, mask, _ = tiny_inputs()
    calls = count_projections(model)
    with torch.no_grad():
        before = model(x, t, y, mask)
        model.blocks[1].cross_attn.kv_linear.weight.add_(0.1)
        after = model(x, t, y, mask)
    assert len(calls) == 2 and not torch.equal(before, after)
