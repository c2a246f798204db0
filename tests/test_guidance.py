"""Classifier-free guidance on tiny random PixArt / PixArtMS models: all four latent channels, the null
caption read with the prompt's mask, and the `cfg_compat="official"` switch (SPEC sections 6 and 9)."""
import pytest
import torch

from diffusion import DPMS, IDDPM, SASolverSampler
from diffusion.model.guidance import cfg_inputs, guided_model
from diffusion.model.nets import PixArt, PixArtMS
from tests.conftest import tiny_inputs, tiny_model

SCALE = 4.5


def null_caption(model, batch):
    return model.y_embedder.y_embedding[None].expand(batch, -1, -1)


def setup(cls):
    model = tiny_model(cls)
    x, t, y, mask, data_info = tiny_inputs()
    return model, x, t, y, mask, (data_info if cls is PixArtMS else None)


def guided(model, x, t, y, mask, data_info, scale, compat="fixed"):
    """forward_with_cfg on [x; x] with [prompt; null] captions, as the IDDPM sampling recipe calls it."""
    batch = len(x)
    with torch.no_grad():
        return model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null_caption(model, batch)]),
                                      scale, mask=mask, data_info=data_info, cfg_compat=compat)


def separate(model, x, t, y, mask, data_info):
    """Conditional and unconditional outputs from two plain forward passes, both with the prompt's mask."""
    with torch.no_grad():
        return (model(x, t, y, mask=mask, data_info=data_info),
                model(x, t, null_caption(model, len(x)), mask=mask, data_info=data_info))


# ---------------------------------------------------------------- forward_with_cfg

@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_cfg_scale_one_equals_the_conditional_prediction(cls):
    model, x, t, y, mask, data_info = setup(cls)
    cond, _ = separate(model, x, t, y, mask, data_info)
    out = guided(model, x, t, y, mask, data_info, 1.0)
    assert torch.allclose(out[:len(x), :4], cond[:, :4], atol=1e-5)


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_guidance_extrapolates_all_four_channels_from_the_null_caption_read_with_the_prompt_mask(cls):
    model, x, t, y, mask, data_info = setup(cls)
    cond, uncond = separate(model, x, t, y, mask, data_info)
    out = guided(model, x, t, y, mask, data_info, SCALE)
    expected = uncond[:, :4] + SCALE * (cond[:, :4] - uncond[:, :4])
    assert torch.allclose(out[:len(x), :4], expected, atol=1e-4)
    assert torch.equal(out[len(x):, :4], out[:len(x), :4])  # both halves carry the guided eps


def test_official_compat_changes_exactly_channel_3_of_pixart():
    model, x, t, y, mask, _ = setup(PixArt)
    fixed = guided(model, x, t, y, mask, None, SCALE)
    official = guided(model, x, t, y, mask, None, SCALE, compat="official")
    same = torch.isclose(fixed, official, atol=1e-6).flatten(2).all(dim=2)  # (2B, channels)
    assert same[:, [0, 1, 2, 4, 5, 6, 7]].all()
    assert not same[:, 3].any()
    cond, _ = separate(model, x, t, y, mask, None)
    assert torch.allclose(official[:len(x), 3], cond[:, 3], atol=1e-5)  # channel 3 left unguided


def test_official_compat_of_pixart_ms_also_ignores_the_caption_mask():
    model, x, t, y, mask, data_info = setup(PixArtMS)
    official = guided(model, x, t, y, mask, data_info, SCALE, compat="official")
    unmasked = guided(model, x, t, y, None, data_info, SCALE)
    masked = guided(model, x, t, y, mask, data_info, SCALE)
    assert torch.allclose(official[:, :3], unmasked[:, :3], atol=1e-6)
    assert not torch.allclose(official[:, :3], masked[:, :3], atol=1e-4)  # the mask does matter
    assert not torch.allclose(official[:, 3], unmasked[:, 3], atol=1e-4)


# ---------------------------------------------------------------- DPM-Solver / SA-Solver guidance

@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_dpms_guidance_uses_the_null_caption_with_the_prompt_mask(cls):
    model, x, _, y, mask, data_info = setup(cls)
    kwargs = {"mask": mask} if data_info is None else {"mask": mask, "data_info": data_info}
    t_continuous = 0.4505  # model time 449.5
    model_time = torch.full((len(x),), 449.5)
    with torch.no_grad():
        cond = model.forward_with_dpmsolver(x, model_time, y, **kwargs)
        uncond = model.forward_with_dpmsolver(x, model_time, null_caption(model, len(x)), **kwargs)
        # The null caption is given once, as y_embedding, and broadcast to the batch.
        guided_eps = DPMS(model.forward_with_dpmsolver, y, model.y_embedder.y_embedding[None], SCALE,
                          kwargs).model_fn(x, t_continuous)
        scale_one = DPMS(model.forward_with_dpmsolver, y, null_caption(model, len(x)), 1.0,
                         kwargs).model_fn(x, t_continuous)
    assert torch.allclose(guided_eps, uncond + SCALE * (cond - uncond), atol=1e-4)
    assert torch.allclose(scale_one, cond, atol=1e-6)


# ---------------------------------------------------------------- sampling a real model end to end

def test_iddpm_guided_sampling_recipe_is_reproducible_from_a_seed():
    model, x, _, y, mask, _ = setup(PixArt)
    z = torch.cat([x, x])
    model_kwargs = dict(y=torch.cat([y, null_caption(model, len(x))]), cfg_scale=SCALE, mask=mask)

    def sample(seed):
        return IDDPM("4").p_sample_loop(model.forward_with_cfg, z.shape, z, clip_denoised=False,
                                        model_kwargs=model_kwargs, generator=seed)

    first, again = sample(0), sample(0)
    assert torch.equal(first, again) and torch.isfinite(first).all()
    assert not torch.allclose(first, sample(1))


def test_dpms_sampling_of_pixart_ms_is_deterministic_given_the_latents():
    model, x, _, y, mask, data_info = setup(PixArtMS)
    kwargs = dict(mask=mask, data_info=data_info)
    null = model.y_embedder.y_embedding[None]
    first = DPMS(model.forward_with_dpmsolver, y, null, SCALE, kwargs).sample(x, steps=4, progress=False)
    again = DPMS(model.forward_with_dpmsolver, y, null, SCALE, kwargs).sample(x, steps=4, progress=False)
    assert torch.equal(first, again) and torch.isfinite(first).all()


def test_sa_solver_sampling_of_pixart_gives_each_seeded_sample_the_same_result_in_any_batch():
    model, _, _, y, mask, _ = setup(PixArt)
    # float64: a random model is no denoiser, guidance drives its latents to hundreds and the stochastic steps
    # amplify the last-bit differences of batch-size-dependent float32 matrix products beyond any tolerance
    model, y = model.double(), y.double()
    sampler = SASolverSampler(model.forward_with_dpmsolver)

    def sample(rows, seeds):
        return sampler.sample(5, len(rows), (4, 8, 8), conditioning=y[rows], eta=1.0,
                              unconditional_conditioning=null_caption(model, len(rows)),
                              unconditional_guidance_scale=SCALE, model_kwargs=dict(mask=mask[rows]),
                              generator=seeds, progress=False)[0]

    pair = sample([0, 1], [21, 22])
    alone = sample([1], [22])
    assert torch.allclose(pair[1:], alone, rtol=1e-9, atol=1e-9)
    assert torch.equal(pair, sample([0, 1], [21, 22]))


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_sa_solver_on_pixart_follows_the_reference_trajectory_with_the_same_noise(cls):
    from diffusion.model.dpm_solver import NoiseScheduleVP, model_wrapper
    from tests.test_samplers import BETAS, reference_sa_solver

    model, x, _, y, mask, data_info = setup(cls)
    model, x, y = model.double(), x.double(), y.double()
    kwargs = dict(mask=mask, data_info=data_info)
    null = null_caption(model, len(x))
    torch.manual_seed(11)
    ours = SASolverSampler(model.forward_with_dpmsolver).sample(
        25, len(x), tuple(x.shape[1:]), conditioning=y, unconditional_conditioning=null,
        unconditional_guidance_scale=SCALE, eta=1.0, model_kwargs=kwargs, x_T=x.clone(), progress=False)[0]
    torch.manual_seed(11)
    draws = [torch.randn_like(x) for _ in range(26)]
    model_fn = model_wrapper(model.forward_with_dpmsolver, NoiseScheduleVP(betas=BETAS), condition=y,
                             uncondition=null, guidance_scale=SCALE, model_kwargs=kwargs)
    with torch.no_grad():
        expected = reference_sa_solver(model_fn, x.clone(), 25, 1.0, draws)
    assert (ours - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


# ---------------------------------------------------------------- the one guided-model function

def test_guided_model_runs_one_cond_uncond_batch_and_keeps_the_conditional_variance():
    def model(x, timestep, y, scale_by):
        return torch.cat([x * y + timestep.view(-1, 1, 1, 1), x - y], dim=1) * scale_by
    x, cond_y, uncond_y = torch.randn(3, 2, 1, 4, 4)
    t = torch.tensor([5.0, 7.0])
    inputs = cfg_inputs(dict(y=cond_y, scale_by=2.0), dict(y=uncond_y, scale_by=2.0), batch_size=2)
    out = guided_model(model, inputs, SCALE, guided_channels=1)(x, t)
    cond, uncond = model(x, t, cond_y, 2.0), model(x, t, uncond_y, 2.0)
    torch.testing.assert_close(out[:, :1], uncond[:, :1] + SCALE * (cond[:, :1] - uncond[:, :1]))
    torch.testing.assert_close(out[:, 1:], cond[:, 1:])  # unguided channels: the conditional half's
    torch.testing.assert_close(guided_model(model, dict(y=cond_y, scale_by=2.0))(x, t), cond)  # scale 1: cond only


def test_extra_model_inputs_reach_both_halves_by_name():
    """A ControlNet-style input `c` passes through guidance untouched: no input is recognised by its shape."""
    seen = []

    def model(x, timestep, y, c):
        seen.append(c)
        return x + y + c
    x, y, null, c = torch.randn(4, 2, 4, 2, 2)
    guided_model(model, cfg_inputs(dict(y=y, c=c), dict(y=null, c=c), 2), SCALE)(x, torch.zeros(2))
    assert torch.equal(seen[0], torch.cat([c, c]))


def test_cfg_inputs_name_an_input_without_the_batch_and_values_that_differ_between_halves():
    y = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"unconditional input 'mask' is \(1, 3\); per-sample inputs need the batch 2"):
        cfg_inputs(dict(y=y, mask=torch.ones(2, 3)), dict(y=y, mask=torch.ones(1, 3)), 2)
    with pytest.raises(ValueError, match="input 'lora_scale' is 1.0 for the conditional half and 0.5"):
        cfg_inputs(dict(y=y, lora_scale=1.0), dict(y=y, lora_scale=0.5), 2)
    with pytest.raises(ValueError, match="differ in keys"):
        cfg_inputs(dict(y=y, c=y), dict(y=y), 2)
    joined = cfg_inputs(dict(y=y, data_info={"img_hw": y[:, :2]}), dict(y=-y, data_info={"img_hw": y[:, :2]}), 2)
    assert joined["y"].shape == (4, 3) and joined["data_info"]["img_hw"].shape == (4, 2)
