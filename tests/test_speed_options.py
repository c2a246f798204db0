"""The model's speed options (trim_captions, fused_modulation, compile) change the work, never the function:
outputs and gradients match the plain model, diffusers, and the released state-dict layout, on or off."""
import pytest
import torch

from diffusion.model.nets import PixArt, PixArtMS
from diffusion.model.nets.PixArt import trim_caption_padding
from diffusion.utils.diffusers_interop import architecture_of, build_diffusers_model, pixart_to_diffusers
from tests.conftest import tiny_inputs, tiny_model

ALL_OFF = dict(trim_captions=False, fused_modulation=False, compile=False)
ALL_ON = dict(trim_captions=True, fused_modulation=True, compile=True)
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
@pytest.mark.parametrize("mask_kind", ["shared-padding", "no-padding", "mask-none"])
def test_speed_options_give_the_plain_models_outputs_and_gradients(cls, mask_kind):
    x, t, y, mask, info = tiny_inputs()
    mask = {"shared-padding": padded_at_the_end(mask), "no-padding": torch.ones_like(mask),
            "mask-none": None}[mask_kind]
    results = []
    for options in (ALL_OFF, ALL_ON):
        model = tiny_model(cls, **options).train()
        model.y_embedder.uncond_prob = 0.0
        out = model(x, t, y, mask, data_info=info)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [ALL_OFF, ALL_ON], ids=["options-off", "options-on"])
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
