"""The training loop on a tiny model and a tiny precomputed-feature dataset (CPU)."""
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffusion.data import paths
from diffusion.train import state as ckpt
from diffusion.train.core import TrainingError, TrainOptions, train
from diffusion.train.flavour import TrainingFlavour
from diffusion.utils.checkpoint import CheckpointError, read_checkpoint
from diffusion.utils.config import ConfigError, load_config
from tests.conftest import REPO, tiny_model
from tests.train_kit import TRAIN_SCRIPT, assert_states_equal, final_state, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


# ---------------------------------------------------------------- the loop works

def test_loss_goes_down_on_a_short_run(train_config, tmp_path):
    result = run(train_config, tmp_path / "run", {"max_steps": 40})
    losses = [loss for _, loss in result.losses]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    state = final_state(result)
    assert state["step"] == 40 and set(ckpt.REQUIRED_KEYS) <= set(state)
    assert (tmp_path / "run" / "train_log.log").read_text().count("loss") >= 40
    assert (tmp_path / "run" / "config.py").is_file()


def test_max_steps_sets_the_run_length_beyond_num_epochs(train_config, tmp_path, dataset_root):
    records = len(json.loads(paths.annotation_path(dataset_root, "data_info.json").read_text()))
    steps_per_epoch = records // 4
    result = run(train_config, tmp_path / "run", {"num_epochs": 1, "max_steps": steps_per_epoch + 3})
    assert len(result.losses) == steps_per_epoch + 3 and final_state(result)["epoch"] >= 1


def test_log_is_appended_not_truncated_on_resume(train_config, tmp_path):
    run(train_config, tmp_path / "run", {"max_steps": 2})
    first = (tmp_path / "run" / "train_log.log").read_text()
    run(train_config, tmp_path / "run", {"max_steps": 4}, resume_from="auto")
    second = (tmp_path / "run" / "train_log.log").read_text()
    assert second.startswith(first) and "resumed from" in second


def test_gradient_accumulation_matches_the_full_batch(train_config, tmp_path):
    full = run(train_config, tmp_path / "full", {"max_steps": 4, "train_batch_size": 8})
    accumulated = run(train_config, tmp_path / "accum", {"max_steps": 4, "train_batch_size": 4,
                                                         "gradient_accumulation_steps": 2})
    assert_states_equal(final_state(full), final_state(accumulated), atol=1e-5)


def test_bf16_mixed_precision_trains_on_cpu(train_config, tmp_path):
    result = run(train_config, tmp_path / "run", {"max_steps": 3, "mixed_precision": "bf16"})
    state = final_state(result)
    assert all(v.dtype == torch.float32 for v in state["state_dict_ema"].values())  # EMA stays fp32
    assert all(np.isfinite(loss) for _, loss in result.losses)


class NaNLossOn(TrainingFlavour):
    """Full training whose loss is NaN for every batch holding one of `records` (all batches if None)."""

    def __init__(self, records=None):
        self.records = records

    def loss(self, model, diffusion, batch, *args, **kwargs):
        loss, terms = super().loss(model, diffusion, batch, *args, **kwargs)
        if self.records is None or set(self.records) & set(batch[3]["index"].tolist()):
            loss = loss * float("nan")
        return loss, terms


def test_a_non_finite_step_is_skipped_and_reported_with_its_records(train_config, tmp_path):
    result = run(train_config, tmp_path / "run", {"max_steps": 6}, flavour=NaNLossOn(records=[5]))
    assert result.global_step == 6
    log = (tmp_path / "run" / "train_log.log").read_text()
    assert log.count("non-finite loss or gradients") == 1
    listed = re.search(r"step skipped; records in the batch: \[([\d, ]+)\]", log).group(1)
    assert 5 in [int(i) for i in listed.split(",")] and len(listed.split(",")) == 4
    state = final_state(result)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_too_many_non_finite_steps_stop_the_run_after_saving(train_config, tmp_path):
    with pytest.raises(TrainingError, match="3 consecutive steps had a non-finite loss"):
        run(train_config, tmp_path / "run", {"max_steps": 10, "max_nonfinite_steps": 3}, flavour=NaNLossOn())
    saved = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in saved] == ["epoch_1_step_3.pth"]
    weights = read_checkpoint(saved[0])["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values())


# ---------------------------------------------------------------- exact resume

@pytest.mark.parametrize("stop_at", [6, 9], ids=["epoch-boundary", "mid-epoch"])
def test_resume_matches_an_uninterrupted_run(train_config, tmp_path, stop_at):
    """24 records / batch 4 = 6 steps an epoch: stop at an epoch boundary and in the middle of an epoch."""
    straight = run(train_config, tmp_path / "straight", {"max_steps": 12})
    run(train_config, tmp_path / "resumed", {"max_steps": stop_at})
    resumed = run(train_config, tmp_path / "resumed", {"max_steps": 12}, resume_from="auto")
    assert resumed.global_step == 12
    assert_states_equal(final_state(straight), final_state(resumed))  # bitwise on the CPU


def test_resume_with_another_split_of_the_same_effective_batch_continues_the_data_order(train_config, tmp_path):
    straight = run(train_config, tmp_path / "straight", {"max_steps": 9})
    run(train_config, tmp_path / "resumed", {"max_steps": 4})
    resumed = run(train_config, tmp_path / "resumed", {"max_steps": 9, "train_batch_size": 2,
                                                       "gradient_accumulation_steps": 2}, resume_from="auto")
    assert_states_equal(final_state(straight), final_state(resumed), atol=1e-5)


class WithTargetNetwork(TrainingFlavour):
    """Full training plus what LCM adds: a target network (an EMA of the model at its own rate) that the loss
    receives, and state of its own carried by checkpoints (here a count of the losses computed)."""

    name = "with-target"

    def __init__(self):
        self.losses_computed = 0

    def averaged_copies(self, cfg):
        return {"target": 0.5}

    def loss(self, model, diffusion, batch, *args, companions=None, **kwargs):
        assert set(companions) == {"target"}
        self.losses_computed += 1
        return super().loss(model, diffusion, batch, *args, companions=companions, **kwargs)

    def extra_state(self):
        return {"losses_computed": self.losses_computed}

    def load_extra_state(self, state):
        self.losses_computed = state["losses_computed"]


def test_a_flavours_averaged_copy_and_own_state_are_saved_and_resumed_exactly(train_config, tmp_path):
    straight = run(train_config, tmp_path / "straight", {"max_steps": 6}, flavour=WithTargetNetwork())
    run(train_config, tmp_path / "resumed", {"max_steps": 3}, flavour=WithTargetNetwork())
    resumed = run(train_config, tmp_path / "resumed", {"max_steps": 6}, flavour=WithTargetNetwork(),
                  resume_from="auto")
    a, b = final_state(straight), final_state(resumed)
    assert_states_equal(a, b)
    assert a["flavour"]["state"] == b["flavour"]["state"] == {"losses_computed": 6}
    target = a["flavour"]["averaged"]["target"]
    for name, value in target.items():
        torch.testing.assert_close(value, b["flavour"]["averaged"]["target"][name], rtol=0, atol=0)
    assert not torch.equal(target["blocks.0.attn.qkv.weight"], a["state_dict_ema"]["blocks.0.attn.qkv.weight"])


def test_resume_under_another_flavour_is_refused(train_config, tmp_path):
    run(train_config, tmp_path / "run", {"max_steps": 1}, flavour=WithTargetNetwork())
    with pytest.raises(CheckpointError, match="written by the 'with-target' training flavour; this run is 'full'"):
        run(train_config, tmp_path / "run", {"max_steps": 2}, resume_from="auto")


def test_resume_auto_without_checkpoint_starts_fresh(train_config, tmp_path):
    result = run(train_config, tmp_path / "run", {"max_steps": 1}, resume_from="auto")
    assert result.global_step == 1


def test_keep_last_n_prunes_old_checkpoints(train_config, tmp_path):
    run(train_config, tmp_path / "run", {"max_steps": 5, "save_model_steps": 1, "keep_last_n": 2})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["epoch_1_step_4.pth", "epoch_1_step_5.pth"]


# ---------------------------------------------------------------- starting points and bad configs

def test_load_from_a_released_format_checkpoint_reports_non_matching_keys(train_config, tmp_path, caplog):
    torch.manual_seed(3)
    source = tiny_model()
    state = source.state_dict()
    state["controlnet_head.weight"] = torch.zeros(2)  # a key this model does not have
    torch.save({"state_dict": state}, tmp_path / "released.pth")
    result = run(train_config, tmp_path / "run", {"max_steps": 1, "optimizer.lr": 1e-12},
                 load_from=str(tmp_path / "released.pth"))
    trained = final_state(result)["state_dict"]
    torch.testing.assert_close(trained["blocks.0.attn.qkv.weight"], source.state_dict()["blocks.0.attn.qkv.weight"],
                               rtol=0, atol=1e-6)
    log = (tmp_path / "run" / "train_log.log").read_text()
    assert "unexpected (ignored) [controlnet_head.weight]" in log


@pytest.mark.parametrize("overrides, message", [
    ({"train_batch_size": 0}, "'train_batch_size' is 0; expected at least 1"),
    ({"data_root": "/no/such/folder"}, "/no/such/folder"),
    ({"image_size": 72}, "'image_size' is 72; expected a multiple of 16"),
    ({"image_size": 128}, "train_vae_128/noflip/shapes/img_000.npy: VAE feature file is missing"),
    ({"mixed_precision": "fp8"}, "'mixed_precision' is 'fp8'"),
    ({"multi_scale": True}, "'multi_scale' is True; expected False for the single-scale model"),
])
def test_impossible_configs_fail_at_start_up_with_named_errors(train_config, tmp_path, overrides, message):
    start = time.perf_counter()
    with pytest.raises((ConfigError, FileNotFoundError, ValueError)) as info:
        run(train_config, tmp_path / "run", overrides)
    assert message in str(info.value)
    assert time.perf_counter() - start < 30


def run_script(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=env)


def test_misspelled_config_key_fails_with_a_suggestion(train_config, tmp_path):
    result = run_script(train_config, "--work-dir", tmp_path / "run", "--report-to", "none",
                        "--cfg-options", "train_batchsize=2")
    assert result.returncode != 0
    assert "unknown config key 'train_batchsize'" in result.stderr and "train_batch_size" in result.stderr


def test_help_documents_the_flags():
    result = run_script("--help")
    for flag in ("--work-dir", "--resume-from", "--load-from", "--report-to", "--debug", "--cfg-options",
                 "torch.distributed.launch", "torchrun", "accelerate launch"):
        assert flag in result.stdout, flag


# ---------------------------------------------------------------- several processes

def test_two_processes_match_one_process_with_twice_the_batch(train_config, tmp_path):
    common = ["--report-to", "none", "--cfg-options", "max_steps=5"]
    one = run_script(train_config, "--work-dir", tmp_path / "one", *common, "train_batch_size=8")
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                          str(TRAIN_SCRIPT), str(train_config), "--work-dir", str(tmp_path / "two"), *common,
                          "train_batch_size=4"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = read_checkpoint(ckpt.list_checkpoints(tmp_path / "one")[-1])
    b = read_checkpoint(ckpt.list_checkpoints(tmp_path / "two")[-1])
    assert a["step"] == b["step"] == 5 and b["world_size"] == 2
    # Same samples, noise and updates; only the order of floating-point sums differs (DDP averages two
    # half-batch gradients), which moves weights by float32 rounding, well under 1e-5.
    assert_states_equal(a, b, atol=1e-5)


KILLER = """
import pathlib, runpy, sys, time, torch
real_save, calls, hanging = torch.save, [0], pathlib.Path(sys.argv.pop(1))
def slow_save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] >= 2:  # the second checkpoint write stops half way and hangs
        f.write(b"partial checkpoint")
        f.flush()
        hanging.touch()  # tells the test that the write is stuck (the first .tmp it could see is the first write's)
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = slow_save
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(train_config, tmp_path):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    work = tmp_path / "run"
    hanging = tmp_path / "hanging"
    proc = subprocess.Popen([sys.executable, str(killer), str(hanging), str(TRAIN_SCRIPT), str(train_config),
                             "--work-dir", str(work), "--report-to", "none",
                             "--cfg-options", "max_steps=6", "save_model_steps=3"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not hanging.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.2)
    assert hanging.exists(), "the second checkpoint write never started"
    assert list((work / "checkpoints").glob(".*.tmp")), "the hanging write left no temporary file"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in ckpt.list_checkpoints(work)] == ["epoch_1_step_3.pth"]
    assert ckpt.find_resumable_checkpoint(work).name == "epoch_1_step_3.pth"
    result = run(train_config, work, {"max_steps": 6}, resume_from="auto")
    assert result.global_step == 6
    assert "resumed from" in (work / "train_log.log").read_text()


def test_sigterm_saves_a_checkpoint_before_exit(train_config, tmp_path):
    work = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TRAIN_SCRIPT), str(train_config), "--work-dir", str(work),
                             "--report-to", "none", "--cfg-options", "max_steps=100000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    log = work / "train_log.log"
    while time.time() < deadline and not (log.is_file() and "step 3/" in log.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step" in out
    saved = ckpt.list_checkpoints(work)
    assert len(saved) == 1 and read_checkpoint(saved[0])["step"] >= 3


# ---------------------------------------------------------------- GPU only (skipped without CUDA)

def torchrun(*args, nproc=1, port=29541):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                           f"--master_port={port}", str(TRAIN_SCRIPT), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.gpu
def test_fsdp_bf16_training_resumes_on_cuda(train_config, tmp_path):
    options = ["--report-to", "none", "--cfg-options", "use_fsdp=True", "mixed_precision=bf16"]
    first = torchrun(train_config, "--work-dir", tmp_path / "run", *options, "max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(train_config, "--work-dir", tmp_path / "run", "--resume-from", "auto", *options, "max_steps=6")
    assert second.returncode == 0, second.stderr[-3000:]
    state = read_checkpoint(ckpt.list_checkpoints(tmp_path / "run")[-1])
    assert state["step"] == 6
    model = tiny_model()
    model.load_state_dict(state["state_dict"])  # a full (unsharded) state dict
    model.load_state_dict(state["state_dict_ema"])
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


@pytest.mark.gpu
def test_fp16_training_with_loss_scaling_on_cuda(train_config, tmp_path):
    result = run(train_config, tmp_path / "run", {"max_steps": 4, "mixed_precision": "fp16"})
    state = final_state(result)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_validation_grids_and_tensorboard_events_are_written(train_config, tmp_path, tiny_pipeline):
    root, _ = tiny_pipeline
    overrides = {"max_steps": 2, "eval_interval": 2, "validation_prompts": ["a red circle", "a blue circle"],
                 "t5_pretrained": str(root / "t5"), "vae_pretrained": str(root / "vae"), "validation_steps": 2}
    cfg = load_config(train_config, overrides)
    train(cfg, TrainOptions(work_dir=str(tmp_path / "run"), report_to="tensorboard"))
    grid = tmp_path / "run" / "vis" / "step_2.png"
    assert grid.is_file()
    from PIL import Image
    assert Image.open(grid).size == (2 * 64 + 3 * 2, 64 + 2 * 2)  # two 64 px images with 2 px padding
    assert list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert "validation samples:" in (tmp_path / "run" / "train_log.log").read_text()
