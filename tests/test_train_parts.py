"""Pieces of the training core that need no data: lr rules, schedules, EMA, per-sample draws, checkpoints."""
import math

import pytest
import torch

from diffusion.train import state as ckpt
from diffusion.train.ema import EMA
from diffusion.train.optim import build_lr_scheduler, build_optimizer, scaled_lr
from diffusion.train.randomness import draw_for_samples
from tests.conftest import tiny_model


def test_auto_lr_sqrt_rule_scales_by_sqrt_of_batch_over_256():
    assert scaled_lr(2e-5, 1024, {"rule": "sqrt"}) == pytest.approx(4e-5)
    assert scaled_lr(2e-5, 64, {"rule": "linear"}) == pytest.approx(5e-6)
    assert scaled_lr(2e-5, 1024, {}) == 2e-5
    with pytest.raises(ValueError, match="'sqrt' or 'linear'"):
        scaled_lr(1e-4, 8, {"rule": "cubic"})


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_warms_up_linearly_then_follows_its_closed_form(schedule):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = build_lr_scheduler(opt, schedule, num_warmup_steps=10, num_training_steps=110)
    seen = []
    for _ in range(110):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen[:10] == pytest.approx([k / 10 for k in range(10)])
    for step in (10, 35, 60, 109):
        expected = 1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * (step - 10) / 100))
        assert seen[step] == pytest.approx(expected)


def test_came_optimizer_needs_its_pair_of_eps():
    params = [torch.nn.Parameter(torch.zeros(2, 2))]
    opt = build_optimizer(params, {"type": "CAME", "lr": 1e-4, "weight_decay": 0.0}, lr=1e-4)
    assert type(opt).__name__ == "CAME"
    with pytest.raises(ValueError, match="optimizer.eps for CAME is a pair"):
        build_optimizer(params, {"type": "CAME", "lr": 1e-4, "eps": 1e-10}, lr=1e-4)


def test_ema_update_is_rate_times_ema_plus_one_minus_rate_times_weights():
    model = tiny_model()
    ema = EMA(model, rate=0.9)
    before = {k: v.clone() for k, v in ema.model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(dict(ema.model.named_parameters())[name], 0.9 * before[name] + 0.1 * p)
    assert all(not p.requires_grad for p in ema.model.parameters())


def test_per_sample_draws_do_not_depend_on_batch_composition():
    together = draw_for_samples([5, 9, 13, 2], epoch=3, seed=43, latent_shape=(4, 2, 2), num_timesteps=1000,
                                drop_prob=0.5, device="cpu")
    split = [draw_for_samples(ids, epoch=3, seed=43, latent_shape=(4, 2, 2), num_timesteps=1000, drop_prob=0.5,
                              device="cpu") for ids in ([5, 13], [9, 2])]
    torch.testing.assert_close(together.noise[[0, 2]], split[0].noise)
    torch.testing.assert_close(together.timesteps[[1, 3]], split[1].timesteps)
    other_epoch = draw_for_samples([5], epoch=4, seed=43, latent_shape=(4, 2, 2), num_timesteps=1000,
                                   drop_prob=0.5, device="cpu")
    assert not torch.equal(other_epoch.noise[0], together.noise[0])
    assert not torch.equal(together.noise[0], together.posterior_noise[0])


def test_per_sample_draws_have_the_right_distribution():
    draws = draw_for_samples(range(4000), epoch=0, seed=1, latent_shape=(1,), num_timesteps=1000, drop_prob=0.1,
                             device="cpu")
    assert 0.08 < draws.drop.float().mean().item() < 0.12
    assert 430 < draws.timesteps.float().mean().item() < 570 and draws.timesteps.max() < 1000
    assert abs(draws.noise.std().item() - 1) < 0.05


def test_training_timesteps_cover_every_step_uniformly_and_reproducibly():
    def draw():
        return draw_for_samples(range(20000), epoch=0, seed=0, latent_shape=(1,), num_timesteps=1000,
                                drop_prob=0.1, device="cpu").timesteps

    first = draw()
    assert torch.equal(first, draw()) and first.dtype == torch.long
    assert first.min().item() == 0 and first.max().item() == 999
    counts = torch.bincount(first // 100, minlength=10).double()
    assert (counts / 2000 - 1).abs().max() < 0.1  # ten deciles, 2000 expected each


def test_checkpoints_are_listed_by_step_and_pruned(tmp_path):
    for epoch, step in ((1, 5), (2, 10), (1, 3), (3, 20)):
        ckpt.save_training_checkpoint(ckpt.checkpoint_path(tmp_path, epoch, step), {"step": step})
    (tmp_path / "checkpoints" / ".epoch_4_step_30.pth.abc.tmp").write_bytes(b"partial")  # an interrupted save
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "epoch_1_step_3.pth", "epoch_1_step_5.pth", "epoch_2_step_10.pth", "epoch_3_step_20.pth"]
    removed = ckpt.prune_checkpoints(tmp_path, keep_last_n=2)
    assert [p.name for p in removed] == ["epoch_1_step_3.pth", "epoch_1_step_5.pth"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["epoch_2_step_10.pth", "epoch_3_step_20.pth"]


def test_auto_resume_skips_unreadable_and_non_training_checkpoints(tmp_path):
    full = {k: 0 for k in ckpt.REQUIRED_KEYS}
    ckpt.save_training_checkpoint(ckpt.checkpoint_path(tmp_path, 1, 10), full)
    ckpt.save_training_checkpoint(ckpt.checkpoint_path(tmp_path, 1, 20), {"state_dict": {}})
    ckpt.checkpoint_path(tmp_path, 1, 30).write_bytes(b"garbage")
    messages = []
    assert ckpt.find_resumable_checkpoint(tmp_path, log=messages.append).name == "epoch_1_step_10.pth"
    assert len(messages) == 2 and "epoch_1_step_30.pth" in messages[0]


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    path = ckpt.save_training_checkpoint(tmp_path / "rng.pth", {"rng": [ckpt.capture_rng_state()]})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng_state(torch.load(path, weights_only=True)["rng"][0])
    torch.testing.assert_close(torch.rand(3), expected[0])
    np.testing.assert_array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]
