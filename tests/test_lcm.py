"""LCM distillation (PIXART-delta): the boundary scalings, the DDIM step, the guided teacher's target and the Huber
loss against closed forms written from the formulas; the flavour's loss against the same formulas composed by
hand; exact resume of full LCM and LCM-LoRA runs; what is refused at start-up."""
import math

import pytest
import torch

from diffusion import IDDPM
from diffusion.model.consistency import (
    DDIMSolver,
    boundary_scalings,
    consistency_distances,
    consistency_loss,
    consistency_output,
    ddim_timesteps,
    huber_loss,
    lcm_guidance,
)
from diffusion.model.lora import base_state_dict, fingerprint, is_adapter_key
from diffusion.train.lcm import LCMFlavour, LCMLoRAFlavour, teacher_ddim_step
from diffusion.train.randomness import draw_for_samples
from diffusion.utils.checkpoint import CheckpointError, save_weights
from diffusion.utils.config import ConfigError, load_config
from tests.conftest import REPO, TINY, tiny_model
from tests.train_kit import assert_states_equal, final_state, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

ABAR = IDDPM("1000").alphas_cumprod  # float64, the linear schedule's


# ---------------------------------------------------------------- the formulas, against closed forms

@pytest.mark.parametrize("t", [0, 1, 19, 279, 519, 759, 999])
def test_boundary_scalings_are_the_closed_form_with_sigma_data_half_and_t_over_a_tenth(t):
    c_skip, c_out = boundary_scalings(torch.tensor([t]))
    s = t / 0.1
    assert c_skip.item() == pytest.approx(0.25 / (s ** 2 + 0.25), rel=1e-6, abs=1e-12)
    assert c_out.item() == pytest.approx(s / math.sqrt(s ** 2 + 0.25), rel=1e-6)
    assert c_skip.dtype == torch.float32  # long timesteps / 0.1, as the reference


def test_the_boundary_condition_makes_f_the_identity_at_t_zero_and_x0_far_from_it():
    x_t, x0 = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(consistency_output(x_t, x0, torch.tensor([0, 0])), x_t, rtol=0, atol=0)
    far = consistency_output(x_t, x0, torch.tensor([999, 999]))
    torch.testing.assert_close(far, x0, rtol=0, atol=1e-4)  # c_skip 2.5e-8, c_out 1 - 1.3e-9 at t = 999


def test_the_ddim_grid_is_every_twentieth_timestep_ending_at_999():
    assert ddim_timesteps(50).tolist() == [20 * k - 1 for k in range(1, 51)]
    assert ddim_timesteps(4).tolist() == [249, 499, 749, 999]
    solver = DDIMSolver(ABAR, 50)
    t_start, t_end = solver.skip(torch.tensor([0, 1, 13, 49]))
    assert t_start.tolist() == [19, 39, 279, 999] and t_end.tolist() == [0, 19, 259, 979]  # max(t_start - 20, 0)


def test_a_ddim_step_is_sqrt_abar_prev_x0_plus_sqrt_one_minus_abar_prev_eps():
    solver = DDIMSolver(ABAR, 50)
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    index = torch.tensor([0, 7, 49])
    x_prev = solver.step(x0, eps, index)
    for i, (n, t_prev) in enumerate(zip(index.tolist(), [0, 139, 979])):  # n = 0 steps to alphas_cumprod[0]
        a = ABAR[t_prev].item()
        expected = math.sqrt(a) * x0[i].double() + math.sqrt(1 - a) * eps[i].double()
        torch.testing.assert_close(x_prev[i], expected, rtol=0, atol=1e-12)
    assert x_prev.dtype == torch.float64  # the reference's coefficients are float64


def test_the_ddim_step_of_the_true_x0_and_noise_lands_on_the_same_trajectory():
    """With the exact x0 and noise of x_t, one step gives q(x0, t_end) with that noise: the ODE's solution."""
    diffusion, solver = IDDPM("1000"), DDIMSolver(ABAR, 50)
    x0, noise, index = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2), torch.tensor([0, 3, 24, 49])
    _, t_end = solver.skip(index)
    torch.testing.assert_close(solver.step(x0, noise, index).float(), diffusion.q_sample(x0, t_end, noise=noise),
                               rtol=0, atol=1e-6)


def test_lcm_guidance_is_cond_plus_w_times_cond_minus_uncond():
    cond, uncond = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(lcm_guidance(cond, uncond, 4.5), 5.5 * cond - 4.5 * uncond)
    torch.testing.assert_close(lcm_guidance(cond, uncond, 0.0), cond)
    per_sample = lcm_guidance(cond, uncond, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(per_sample[1], 4.0 * cond[1] - 3.0 * uncond[1])


@pytest.mark.parametrize("d", [0.0, 1e-4, 0.5, 30.0])
def test_the_huber_loss_is_mean_sqrt_d2_plus_c2_minus_c(d):
    c = 0.001
    pred, target = torch.full((2, 3), d), torch.zeros(2, 3)
    expected = math.sqrt(d * d + c * c) - c
    assert huber_loss(pred, target, c).item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert consistency_loss(pred, target, "huber", c).item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert consistency_loss(pred, target, "l2").item() == pytest.approx(d * d, rel=1e-6)


def test_per_sample_distances_average_to_the_loss():
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    for kind in ("huber", "l2"):
        torch.testing.assert_close(consistency_distances(pred, target, kind).mean(),
                                   consistency_loss(pred, target, kind), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        consistency_loss(pred, target, "l1")


def _x0(x_t, t, eps):
    a = ABAR[t].float().view(-1, 1, 1, 1)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def test_the_guided_teacher_takes_a_ddim_step_with_the_null_caption_fully_kept(base_config_path):
    cfg = load_config(base_config_path, {"cfg_scale": 4.5, "mixed_precision": "no"})
    teacher, diffusion, solver = tiny_model(seed=5), IDDPM("1000"), DDIMSolver(ABAR, 50)
    gen = torch.Generator().manual_seed(0)
    B, L = 3, TINY["model_max_length"]
    x_t = torch.randn(B, 4, 8, 8, generator=gen)
    y = torch.randn(B, L, TINY["caption_channels"], generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 3:], mask[2, 5:] = 0, 0
    index = torch.tensor([0, 20, 49])
    info = {"img_hw": torch.tensor([[64.0, 64.0]] * B), "aspect_ratio": torch.ones(B, 1)}
    x_prev = teacher_ddim_step(teacher, diffusion, solver, x_t, index, y, mask, info, torch.zeros(B, dtype=torch.long),
                               cfg, "cpu")
    t = solver.timesteps[index]
    null = teacher.y_embedder.y_embedding[None].expand(B, -1, -1)
    with torch.no_grad():
        eps_c = teacher(x_t, t, y, mask)[:, :4]
        eps_u = teacher(x_t, t, null, None)[:, :4]  # every token of the null caption kept
        eps_u_prompt_mask = teacher(x_t, t, null, mask)[:, :4]  # the reference's bug
    w = 4.5
    x0 = _x0(x_t, t, eps_c) + w * (_x0(x_t, t, eps_c) - _x0(x_t, t, eps_u))
    eps = eps_c + w * (eps_c - eps_u)
    a_prev = ABAR[torch.tensor([0, 399, 979])].view(-1, 1, 1, 1)  # grid[n - 1], alphas_cumprod[0] for n = 0
    torch.testing.assert_close(x_prev, a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps, rtol=0, atol=1e-5)
    buggy = eps_c + w * (eps_c - eps_u_prompt_mask)
    assert (buggy - eps)[0].abs().max() > 1e-3  # the null caption's mask does matter


def test_the_flavours_loss_is_the_consistency_loss_composed_from_the_formulas(base_config_path):
    """Student c_skip x_t + c_out x0 at t_start against the target network's at (x_prev, t_end), Huber distance;
    the per-sample draws (DDIM step, noise, posterior noise) as every flavour draws them."""
    cfg = load_config(base_config_path, {"lcm": True, "cfg_scale": 3.0, "mixed_precision": "no", "seed": 11,
                                         "class_dropout_prob": 0.0, "scale_factor": 1.5, "huber_c": 0.01})
    student, teacher, target = tiny_model(seed=1), tiny_model(seed=2), tiny_model(seed=3)
    diffusion, solver = IDDPM("1000"), DDIMSolver(ABAR, 50)
    gen = torch.Generator().manual_seed(4)
    B, L = 4, TINY["model_max_length"]
    x = torch.cat([torch.randn(B, 4, 8, 8, generator=gen), torch.rand(B, 4, 8, 8, generator=gen) * 0.1], 1)
    y = torch.randn(B, 1, L, TINY["caption_channels"], generator=gen)
    mask = torch.ones(B, 1, 1, L, dtype=torch.long)
    mask[1, ..., 4:] = 0
    info = {"img_hw": torch.tensor([[64.0, 64.0]] * B), "aspect_ratio": torch.ones(B, 1),
            "index": torch.tensor([3, 8, 1, 20])}
    loss, terms = LCMFlavour().loss(student, diffusion, (x, y, mask, info), 2, cfg, "cpu",
                                    companions={"teacher": teacher, "target": target})

    draws = draw_for_samples(info["index"], 2, 11, (4, 8, 8), 50, 0.0, "cpu")
    n = draws.timesteps
    t_start = n * 20 + 19
    t_end = (t_start - 20).clamp(min=0)
    latent = (x[:, :4] + x[:, 4:] * draws.posterior_noise) * 1.5
    a = ABAR[t_start].float().view(-1, 1, 1, 1)
    x_t = a.sqrt() * latent + (1 - a).sqrt() * draws.noise
    y2, m2 = y[:, 0], mask.reshape(B, L)
    with torch.no_grad():
        prediction = consistency_output(x_t, _x0(x_t, t_start, student(x_t, t_start, y2, m2)[:, :4]), t_start)
        x_prev = teacher_ddim_step(teacher, diffusion, solver, x_t, n, y2, m2, info, draws.drop, cfg, "cpu")
        x0_target = _x0(x_prev.float(), t_end, target(x_prev.float(), t_end, y2, m2)[:, :4])
    c_skip, c_out = boundary_scalings(t_end)
    target_f = c_skip.view(-1, 1, 1, 1) * x_prev + c_out.view(-1, 1, 1, 1) * x0_target
    expected = torch.mean(torch.sqrt((prediction - target_f.float()) ** 2 + 0.01 ** 2) - 0.01)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    assert loss.requires_grad and terms["distance"].shape == (B,) and torch.equal(terms["ddim_index"], n)


# ---------------------------------------------------------------- training runs

@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A trained-looking teacher (every weight random, none zero) as a released-layout checkpoint."""
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    save_weights(tiny_model(seed=3).state_dict(), path)
    return path


LCM = {"lcm": True, "ema_decay": 0.8, "cfg_scale": 2.0}  # ema_rate of the tiny runs: 0.9
LORA = {"rank": 4, "alpha": 8, "target_modules": ["lcm_lora"], "dropout": 0.1}


def lcm_run(config, work_dir, teacher, overrides=None, **options):
    return run(config, work_dir, {**LCM, **(overrides or {})}, load_from=str(teacher), **options)


class KeepsTheModules(LCMFlavour):
    """LCM training that keeps its teacher and student, for inspection after the run."""

    def wrap_model(self, model, cfg):
        self.student = super().wrap_model(model, cfg)
        return self.student

    def frozen_modules(self, cfg, device, load_from=None):
        self.frozen = super().frozen_modules(cfg, device, load_from)
        return self.frozen


def test_an_lcm_run_trains_the_student_keeps_the_teacher_and_saves_the_target(train_config, tmp_path, teacher_file):
    flavour = KeepsTheModules()
    result = lcm_run(train_config, tmp_path / "run", teacher_file, {"max_steps": 3}, flavour=flavour)
    state = final_state(result)
    teacher = flavour.frozen["teacher"]
    original = tiny_model(seed=3).state_dict()
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in original.items() if k != "pos_embed")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert state["flavour"]["name"] == "lcm"
    assert state["flavour"]["state"]["teacher_fingerprint"] == fingerprint(teacher.state_dict())
    target = state["flavour"]["averaged"]["target"]
    key = "blocks.0.attn.qkv.weight"
    assert not torch.equal(state["state_dict"][key], original[key])  # the student trained
    assert not torch.equal(target[key], state["state_dict"][key])  # the target lags it at ema_decay
    assert not torch.equal(target[key], state["state_dict_ema"][key])  # ... not at ema_rate
    assert len(state["optimizer"]["state"]) == len(list(flavour.student.parameters()))


def test_lcm_resume_in_mid_epoch_matches_an_uninterrupted_run(train_config, tmp_path, teacher_file):
    """24 records / batch 4 = 6 steps an epoch, stopped at step 3; caption dropout on. Student, EMA, target and
    optimizer bitwise (the core's resume, which full training tests at epoch boundaries too)."""
    extra = {"class_dropout_prob": 0.3}
    straight = lcm_run(train_config, tmp_path / "straight", teacher_file, {"max_steps": 5, **extra})
    lcm_run(train_config, tmp_path / "resumed", teacher_file, {"max_steps": 3, **extra})
    resumed = lcm_run(train_config, tmp_path / "resumed", teacher_file, {"max_steps": 5, **extra},
                      resume_from="auto")
    assert resumed.global_step == 5
    a, b = final_state(straight), final_state(resumed)
    assert_states_equal(a, b)  # student, its EMA and the optimizer
    target_a, target_b = a["flavour"]["averaged"]["target"], b["flavour"]["averaged"]["target"]
    assert target_a.keys() == target_b.keys() and all(torch.equal(target_a[k], target_b[k]) for k in target_a)


def test_lcm_lora_trains_the_adapter_only_and_resumes_exactly(train_config, tmp_path, teacher_file):
    """ema_decay 0: the targets come from the student itself (no copy is kept), as in the reference's LCM-LoRA."""
    overrides = {"lora": LORA, "ema_decay": 0.0}
    straight = lcm_run(train_config, tmp_path / "straight", teacher_file, {"max_steps": 5, **overrides})
    lcm_run(train_config, tmp_path / "resumed", teacher_file, {"max_steps": 3, **overrides})
    flavour = type("Keeps", (LCMLoRAFlavour,), {"wrap_model": lambda self, m, c: setattr(
        self, "model", LCMLoRAFlavour.wrap_model(self, m, c)) or self.model})(LORA)
    resumed = lcm_run(train_config, tmp_path / "resumed", teacher_file, {"max_steps": 5, **overrides},
                      resume_from="auto", flavour=flavour)
    a, b = final_state(straight), final_state(resumed)
    assert_states_equal(a, b)
    assert a["flavour"]["name"] == "lcm-lora" and a["flavour"]["averaged"] == {}
    assert set(a["state_dict"]) == {k for k in a["state_dict"] if ".lora_" in k}  # the adapter only
    assert "x_embedder.proj.lora_A.weight" in a["state_dict"] and "t_block.1.lora_B.weight" in a["state_dict"]
    assert fingerprint(base_state_dict(flavour.model)) == fingerprint(tiny_model(seed=3).state_dict())
    assert not any(p.requires_grad for n, p in flavour.model.named_parameters() if not is_adapter_key(n))


def test_two_processes_match_one_process_with_twice_the_batch(train_config, tmp_path, teacher_file):
    """LCM-LoRA with ema_decay 0 under DDP: the targets come from the wrapped student itself, without gradient;
    scripts/train.py picks the flavour from the config."""
    import subprocess
    import sys

    from diffusion.train import state as ckpt
    from diffusion.utils.checkpoint import read_checkpoint
    overrides = {"lora": {**LORA, "dropout": 0.0}, "ema_decay": 0.0, "max_steps": 2}
    one = lcm_run(train_config, tmp_path / "one", teacher_file, {**overrides, "train_batch_size": 8})
    options = [f"{key}={value!r}" for key, value in {**LCM, **overrides, "train_batch_size": 4}.items()]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29571",
                          str(REPO / "scripts" / "train.py"), str(train_config), "--report-to", "none", "--load-from",
                          str(teacher_file), "--work-dir", str(tmp_path / "two"), "--cfg-options", *options],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    b = read_checkpoint(ckpt.list_checkpoints(tmp_path / "two")[-1])
    assert b["flavour"]["name"] == "lcm-lora" and b["world_size"] == 2
    assert_states_equal(final_state(one), b, atol=1e-5)


def test_bf16_mixed_precision_lcm_trains_on_cpu(train_config, tmp_path, teacher_file):
    """The teacher and the target network run under the student's autocast."""
    state = final_state(lcm_run(train_config, tmp_path / "run", teacher_file, {"max_steps": 2,
                                                                               "mixed_precision": "bf16"}))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state["state_dict"].values())
    assert all(torch.isfinite(v).all() for v in state["flavour"]["averaged"]["target"].values())


def test_a_resume_from_another_teacher_is_refused(train_config, tmp_path, teacher_file):
    lcm_run(train_config, tmp_path / "run", teacher_file, {"max_steps": 1})
    other = tmp_path / "other.pth"
    save_weights(tiny_model(seed=4).state_dict(), other)
    with pytest.raises(CheckpointError, match="distilled from another teacher"):
        lcm_run(train_config, tmp_path / "run", other, {"max_steps": 2}, resume_from="auto")


def test_lcm_needs_the_teachers_weights(train_config, tmp_path):
    with pytest.raises(ConfigError, match="'lcm' training flavour fine-tunes loaded weights.*--load-from"):
        run(train_config, tmp_path / "run", {**LCM, "max_steps": 1})


def test_a_teacher_that_does_not_fit_the_model_is_refused_by_name(train_config, tmp_path):
    bad = tmp_path / "partial.pth"
    weights = tiny_model(seed=3).state_dict()
    weights.pop("final_layer.linear.weight")
    save_weights(weights, bad)
    with pytest.raises(CheckpointError, match=r"(?s)partial\.pth \(the LCM teacher\).*final_layer\.linear\.weight"):
        lcm_run(train_config, tmp_path / "run", bad, {"max_steps": 1})


# ---------------------------------------------------------------- configs

def test_the_released_lcm_configs_carry_the_reference_values():
    cfg = load_config(REPO / "configs/pixart_config/PixArt_xl2_img1024_lcm.py")
    assert (cfg.lcm, cfg.loss_type, cfg.huber_c, cfg.num_ddim_timesteps, cfg.ema_decay, cfg.cfg_scale) == (
        True, "huber", 0.001, 50, 0.95, 4.5)
    assert (cfg.w_min, cfg.w_max, cfg.class_dropout_prob, cfg.train_batch_size, cfg.gradient_clip) == (
        3.0, 15.0, 0.0, 16, 0.01)
    assert dict(cfg.optimizer) == dict(type="AdamW", lr=2e-5, weight_decay=0.0, eps=1e-10)
    assert cfg.lr_schedule_args.num_warmup_steps == 100 and cfg.save_model_steps == 200
    lora = load_config(REPO / "configs/pixart_config/PixArt_xl2_img1024_lcm_lora.py")
    assert dict(lora.lora) == dict(rank=32, alpha=8, dropout=0.0, target_modules=["lcm_lora"])
    assert lora.ema_decay == 0.0


@pytest.mark.parametrize("overrides, message", [
    ({"lcm": True, "train_sampling_steps": 100}, "'train_sampling_steps' is 100; expected 1000 with lcm=True"),
    ({"loss_type": "l1"}, "'loss_type' is 'l1'; expected one of 'huber', 'l2'"),
    ({"huber_c": 0.0}, "'huber_c' is 0.0; expected a number > 0"),
    ({"num_ddim_timesteps": 0}, "'num_ddim_timesteps' is 0; expected between 1 and 1000"),
    ({"ema_decay": 1.0}, "'ema_decay' is 1.0; expected a number in [0, 1)"),
])
def test_bad_lcm_settings_fail_at_load_naming_the_key(base_config_path, overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(base_config_path, overrides)
    assert message in str(info.value)


def test_lcm_does_not_combine_with_dreambooth_or_controlnet(base_config_path):
    from diffusion.train.flavour import flavour_from_config
    with pytest.raises(ConfigError, match="lcm=True .* does not combine with dreambooth"):
        flavour_from_config(load_config(base_config_path, {"lcm": True, "dreambooth": {
            "instance_data_dir": "x", "instance_prompt": "a photo of sks dog"}}))
    with pytest.raises(ConfigError, match="does not combine with dreambooth or lora, nor with lcm"):
        flavour_from_config(load_config(base_config_path, {"lcm": True, "controlnet": True}))
    assert flavour_from_config(load_config(base_config_path, {"lcm": True, "lora": {"rank": 2}})).name == "lcm-lora"


@pytest.mark.parametrize("multi_scale", [False, True], ids=["PixArt", "PixArtMS"])
def test_the_lcm_lora_group_adapts_what_the_released_pixart_lcm_lora_adapts(tmp_path, multi_scale):
    """Our 'lcm_lora' targets, saved in diffusers' names, are the modules peft selects on diffusers' model with
    the released PixArt-LCM-LoRA's target list."""
    import json

    from peft import LoraConfig, get_peft_model

    from diffusion.model.lora import LoraSettings, LoraSpec, add_adapter, resolve_targets
    from diffusion.model.nets import PixArtMS
    from diffusion.utils.lora_interop import ADAPTER_CONFIG, save_adapter
    from tests.test_diffusers_interop import converted
    from tests.test_lora_interop import LCM_LORA_TARGETS
    ours = tiny_model(PixArtMS, lewei_scale=2.0) if multi_scale else tiny_model()
    theirs = get_peft_model(converted(ours), LoraConfig(r=2, target_modules=LCM_LORA_TARGETS))
    selected = {name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
                if hasattr(module, "lora_A")}
    spec = LoraSpec.for_modules(resolve_targets(ours, ["lcm_lora"]), LoraSettings.from_config({"rank": 2}))
    save_adapter(add_adapter(ours, spec), tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())["target_modules"]
    assert set(saved) == selected
    assert "pos_embed.proj" in selected and "adaln_single.linear" in selected
    assert multi_scale == ("adaln_single.emb.resolution_embedder.linear_1" in selected)
