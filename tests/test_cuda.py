"""The model on a CUDA device: fp32 agrees with the CPU and with diffusers; bf16/fp16 and autocast run; the
XL/2 multi-scale model trains a step at 1024 px. Skipped cleanly where no CUDA device exists."""
import time

import pytest
import torch

from diffusion.model.builder import build_model
from diffusion.model.nets import PixArt, PixArtMS
from tests.conftest import tiny_inputs, tiny_model

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32():
    """Full fp32 matmuls and convolutions (no TF32) so fp32 comparisons are meaningful."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to_cuda(*tensors):
    return [t.to(CUDA) if isinstance(t, torch.Tensor) else {k: v.to(CUDA) for k, v in t.items()} for t in tensors]


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_cuda_fp32_matches_cpu(cls):
    model = tiny_model(cls)
    x, t, y, mask, info = tiny_inputs()
    with torch.no_grad():
        expected = model(x, t, y, mask, data_info=info)
        out = model.to(CUDA)(*to_cuda(x, t, y, mask), data_info=to_cuda(info)[0])
    # Another device sums in another order: fp32 rounding differences, amplified through the blocks.
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_cuda_fp32_matches_diffusers():
    pytest.importorskip("diffusers")
    from diffusion.utils.diffusers_interop import architecture_of, build_diffusers_model, pixart_to_diffusers
    model = tiny_model(PixArtMS)
    theirs = build_diffusers_model(architecture_of(model), pixart_to_diffusers(model.state_dict())[0])
    theirs = theirs.to(CUDA).eval()
    x, t, y, mask, info = to_cuda(*tiny_inputs(height=8, width=12))
    with torch.no_grad():
        expected = model.to(CUDA)(x, t, y, mask, data_info=info)
        out = theirs(x, y, t, added_cond_kwargs={"resolution": info["img_hw"], "aspect_ratio": info["aspect_ratio"]},
                     encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_forward_and_backward(dtype):
    model = tiny_model(PixArtMS, grad_checkpointing=True, class_dropout_prob=0.0).to(CUDA)
    x, t, y, mask, info = to_cuda(*tiny_inputs(height=8, width=12))
    with torch.no_grad():
        ref = model(x, t, y, mask, data_info=info)
    model = model.to(dtype).train()
    out = model(x, t, y, mask, data_info=info)
    out.float().square().mean().backward()
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_cuda_autocast_with_fp32_attention():
    model = tiny_model(PixArt, fp32_attention=True).to(CUDA)
    x, t, y, mask, _ = to_cuda(*tiny_inputs())
    with torch.no_grad():
        ref = model(x, t, y, mask)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t, y, mask)
    assert (out.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()


def test_caption_dropout_draws_on_the_cuda_device():
    model = tiny_model(PixArt, class_dropout_prob=1.0).to(CUDA).train()
    _, _, y, _, _ = tiny_inputs()
    out = model.y_embedder.token_drop(y.to(CUDA))
    torch.testing.assert_close(out, model.y_embedder.y_embedding.expand_as(out))


def test_xl_multiscale_bf16_training_step_at_1024():
    torch.manual_seed(0)
    model = build_model("PixArtMS_XL_2", use_grad_checkpoint=True, input_size=128,
                        lewei_scale=2.0).to(CUDA).train()
    batch = 8
    x = torch.randn(batch, 4, 128, 128, device=CUDA)
    y = torch.randn(batch, 120, 4096, device=CUDA)
    mask = torch.ones(batch, 120, device=CUDA)
    mask[:, 40:] = 0
    info = {"img_hw": torch.tensor([[1024.0, 1024.0]], device=CUDA), "aspect_ratio": torch.tensor([[1.0]], device=CUDA)}
    t = torch.randint(0, 1000, (batch,), device=CUDA)
    torch.cuda.reset_peak_memory_stats()
    for step in range(3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, t, y, mask, data_info=info).float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        print(f"\n[figure] XL/2-MS 1024px batch {batch} bf16 autocast + grad ckpt, fwd+bwd step {step}: "
              f"{time.perf_counter() - start:.3f} s, peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
              f"({torch.cuda.get_device_name()})")
        model.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)
