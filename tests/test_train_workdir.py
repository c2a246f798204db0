"""Nothing is ever lost: a run owns its work dir (lock, its own run dir, checks before any write), a failure saves
the last completed step, a resume follows the new schedule, and disk-full / read-only fail in one named line."""
import errno
import hashlib
import importlib.util
import math
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from diffusion.data import paths
from diffusion.train import state as ckpt
from diffusion.train import workdir
from diffusion.train.flavour import TrainingFlavour
from diffusion.utils import fileio
from diffusion.utils.checkpoint import CheckpointError, read_checkpoint
from diffusion.utils.config import ConfigError
from diffusion.utils.fileio import WriteError
from tests.conftest import REPO
from tests.train_kit import TRAIN_SCRIPT, assert_states_equal, final_state, make_feature_dataset, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

WorkDirError = workdir.WorkDirError


def files(folder):
    """relative path -> sha256 of every file under `folder` ("dir" for a folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def names(run_dir):
    return [p.name for p in ckpt.list_checkpoints(run_dir)]


def load_train_script():
    spec = importlib.util.spec_from_file_location("train_script", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def script_error(train_config, work, *args):
    """Run scripts/train.py in this process (so monkeypatches apply); the one-line message it exits with."""
    with pytest.raises(SystemExit) as info:
        load_train_script().main([str(train_config), "--work-dir", str(work), "--report-to", "none", *args])
    message = info.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("error: "), message
    return message


# ---------------------------------------------------------------- a run owns its work dir

def test_a_fresh_run_in_a_used_work_dir_is_refused_and_changes_nothing(train_config, tmp_path):
    work = tmp_path / "run"
    run(train_config, work, {"max_steps": 2})
    before = files(work)
    with pytest.raises(WorkDirError) as info:
        run(train_config, work, {"max_steps": 4})
    message = str(info.value)
    assert "holds checkpoints of another run" in message and "epoch_1_step_2.pth" in message
    assert "--resume-from auto" in message and "new --work-dir" in message and "--allow-used-work-dir" in message
    assert files(work) == before  # config.py, the log and the checkpoint untouched, no lock left


def test_a_new_run_beside_another_gets_its_own_run_dir_and_prunes_only_its_own(train_config, tmp_path):
    work = tmp_path / "run"
    first = run(train_config, work, {"max_steps": 3, "save_model_steps": 1})
    before = files(work)
    second = run(train_config, work, {"max_steps": 4, "save_model_steps": 1, "keep_last_n": 1},
                 allow_used_work_dir=True)
    assert second.run_dir == work / "runs" / second.run_id and second.run_id != first.run_id
    assert {k: v for k, v in files(work).items() if k in before} == before  # old files neither changed nor moved
    assert names(work) == ["epoch_1_step_1.pth", "epoch_1_step_2.pth", "epoch_1_step_3.pth"]  # not pruned
    assert names(second.run_dir) == ["epoch_1_step_4.pth"]  # its own older ones pruned
    assert (second.run_dir / "config.py").is_file() and (second.run_dir / "train_log.log").is_file()
    assert read_checkpoint(first.last_checkpoint)["run"]["id"] == first.run_id
    assert read_checkpoint(second.last_checkpoint)["run"]["id"] == second.run_id


def test_resume_auto_continues_the_most_recently_started_run(train_config, tmp_path):
    work = tmp_path / "run"
    run(train_config, work, {"max_steps": 3})
    newer = run(train_config, work, {"max_steps": 1}, allow_used_work_dir=True)
    resumed = run(train_config, work, {"max_steps": 2}, resume_from="auto")
    assert (resumed.run_dir, resumed.run_id) == (newer.run_dir, newer.run_id)
    assert names(newer.run_dir) == ["epoch_1_step_1.pth", "epoch_1_step_2.pth"]
    assert names(work) == ["epoch_1_step_3.pth"]


def test_resuming_an_older_checkpoint_of_a_run_is_refused_or_branches_into_its_own_run_dir(train_config, tmp_path):
    work = tmp_path / "run"
    first = run(train_config, work, {"max_steps": 3, "save_model_steps": 1})
    before = files(work)
    older = work / "checkpoints" / "epoch_1_step_1.pth"
    with pytest.raises(WorkDirError, match="is not the newest checkpoint of its run.*epoch_1_step_3.pth"):
        run(train_config, work, {"max_steps": 3}, resume_from=str(older))
    assert files(work) == before
    branch = run(train_config, work, {"max_steps": 3}, resume_from=str(older), allow_used_work_dir=True)
    assert branch.run_dir.parent == work / "runs" and names(branch.run_dir) == ["epoch_1_step_3.pth"]
    assert read_checkpoint(branch.last_checkpoint)["run"] == {"id": branch.run_id, "parent": str(older)}
    assert {k: v for k, v in files(work).items() if k in before} == before and branch.run_id != first.run_id


def test_a_checkpoint_without_a_run_id_still_resumes_and_its_lineage_gets_one(train_config, tmp_path):
    work = tmp_path / "run"
    old = run(train_config, work, {"max_steps": 2}).last_checkpoint
    payload = read_checkpoint(old)
    del payload["run"]  # as written before run ids
    torch.save(payload, old)
    resumed = run(train_config, work, {"max_steps": 3}, resume_from="auto")
    assert resumed.run_dir == work and resumed.global_step == 3
    assert read_checkpoint(resumed.last_checkpoint)["run"]["id"] == resumed.run_id


def test_prune_refuses_a_negative_count_and_never_removes_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_training_checkpoint(ckpt.checkpoint_path(tmp_path, 1, step), {"step": step})
    with pytest.raises(ValueError, match="keep_last_n is -1"):
        ckpt.prune_checkpoints(tmp_path, -1)
    assert names(tmp_path) == ["epoch_1_step_1.pth", "epoch_1_step_2.pth", "epoch_1_step_3.pth", "epoch_1_step_4.pth"]
    removed = ckpt.prune_checkpoints(tmp_path, 1, newest=ckpt.checkpoint_path(tmp_path, 1, 2))
    assert [p.name for p in removed] == ["epoch_1_step_1.pth"]  # only what sorts before the one just written
    assert names(tmp_path) == ["epoch_1_step_2.pth", "epoch_1_step_3.pth", "epoch_1_step_4.pth"]


# ---------------------------------------------------------------- nothing changes before the checks pass

def test_a_start_that_fails_its_checks_changes_nothing_in_the_work_dir(train_config, tmp_path):
    work = tmp_path / "run"
    run(train_config, work, {"max_steps": 2})
    (work / "checkpoints" / ".epoch_1_step_9.pth.abcd1234.tmp").write_bytes(b"partial")
    before = files(work)
    with pytest.raises(CheckpointError, match="tensor shapes differ"):  # a width that does not fit the checkpoint
        run(train_config, work, {"max_steps": 4, "model_kwargs.hidden_size": 48}, resume_from="auto")
    assert files(work) == before  # config.py not rewritten, log not appended, temp file kept (no lock taken)
    fresh = tmp_path / "fresh"
    with pytest.raises((ConfigError, FileNotFoundError, ValueError), match="/no/such/folder"):
        run(train_config, fresh, {"data_root": "/no/such/folder"})
    assert not fresh.exists()


def test_a_resume_with_another_config_keeps_the_first_config_file(train_config, tmp_path):
    work = tmp_path / "run"
    run(train_config, work, {"max_steps": 2})
    first = (work / "config.py").read_text()
    run(train_config, work, {"max_steps": 3}, resume_from="auto")
    run(train_config, work, {"max_steps": 3}, resume_from="auto")  # nothing to train: no further config file
    assert (work / "config.py").read_text() == first and "max_steps = 2" in first
    assert "max_steps = 3" in (work / "config_step_2.py").read_text()
    assert sorted(p.name for p in work.glob("config*.py")) == ["config.py", "config_step_2.py"]


def test_stale_temp_files_of_killed_saves_are_removed_at_the_next_start(train_config, tmp_path):
    work = tmp_path / "run"
    run(train_config, work, {"max_steps": 2})
    other_run = work / "runs" / "20240101-000000-abcdef"  # another run dir of the work dir
    other_run.mkdir(parents=True)
    stale = [work / "checkpoints" / ".epoch_1_step_3.pth.abcd1234.tmp", other_run / ".config.py.zz99yy88.tmp"]
    for path in stale:
        path.write_bytes(b"partial " * 1000)
    unrelated = work / "checkpoints" / "notes.tmp"
    unrelated.write_text("mine")
    run(train_config, work, {"max_steps": 3}, resume_from="auto")
    assert not any(path.exists() for path in stale) and unrelated.is_file()
    log = (work / "train_log.log").read_text()
    assert all(f"removed {path}" in log for path in stale)


# ---------------------------------------------------------------- the lock

HOLDER = f"""
import pathlib, runpy, sys, time
sys.path.insert(0, {str(REPO)!r})
held, release = map(pathlib.Path, sys.argv[1:3])
del sys.argv[1:3]
import diffusion.train.core as core
real, calls = core.train_step, [0]
def train_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:  # after step 2's checkpoint: hold the work dir until told to go on
        held.touch()
        while not release.exists():
            time.sleep(0.05)
    return real(*args, **kwargs)
core.train_step = train_step
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_second_run_while_one_trains_is_refused_naming_the_first(train_config, tmp_path):
    work, held, release = tmp_path / "run", tmp_path / "held", tmp_path / "release"
    holder = tmp_path / "holder.py"
    holder.write_text(HOLDER)
    first = subprocess.Popen([sys.executable, str(holder), str(held), str(release), str(TRAIN_SCRIPT),
                              str(train_config), "--work-dir", str(work), "--report-to", "none",
                              "--cfg-options", "max_steps=4", "save_model_steps=2"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not held.exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-3000:]
            time.sleep(0.1)
        before = files(work)
        assert "train.lock" in before and "checkpoints/epoch_1_step_2.pth" in before
        second = subprocess.run([sys.executable, str(TRAIN_SCRIPT), str(train_config), "--work-dir", str(work),
                                 "--report-to", "none", "--cfg-options", "max_steps=4"],
                                cwd=REPO, capture_output=True, text=True, timeout=240)
        assert second.returncode != 0
        last_line = second.stderr.strip().splitlines()[-1]
        assert f"is in use by a training run: pid {first.pid} on host {socket.gethostname()} since" in last_line
        with pytest.raises(WorkDirError, match=f"pid {first.pid}"):  # a resume is refused alike
            run(train_config, work, {"max_steps": 4}, resume_from="auto")
        assert files(work) == before
    finally:
        release.touch()
        _, err = first.communicate(timeout=240)
    assert first.returncode == 0, err[-3000:]
    assert names(work) == ["epoch_1_step_2.pth", "epoch_1_step_4.pth"] and not (work / "train.lock").exists()


def write_lock(work, pid, host):
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.lock").write_text(f'{{"pid": {pid}, "host": "{host}", "started": "2024-01-02T03:04:05+00:00"}}')


def test_a_stale_lock_of_a_process_that_is_gone_is_taken_over_with_a_warning(train_config, tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    work = tmp_path / "run"
    write_lock(work, pid, socket.gethostname())
    result = run(train_config, work, {"max_steps": 1})
    assert result.global_step == 1 and not (work / "train.lock").exists()
    log = (work / "train_log.log").read_text()
    assert f"taking over the stale lock {work / 'train.lock'}: it names pid {pid} on host" in log


def test_a_lock_from_another_host_is_refused_with_how_to_remove_it(train_config, tmp_path):
    work = tmp_path / "run"
    write_lock(work, 4242, "gpu-node-7")
    before = files(work)
    message = script_error(train_config, work)
    assert "in use by a training run: pid 4242 on host gpu-node-7 since 2024-01-02T03:04:05+00:00" in message
    assert f"delete {work / 'train.lock'}" in message
    assert files(work) == before


# ---------------------------------------------------------------- a failure saves the last completed step

class RecordingIndices(TrainingFlavour):
    """Full training that notes the records of every micro-batch."""

    def __init__(self):
        self.micro_batches = []

    def loss(self, model, diffusion, batch, *args, **kwargs):
        self.micro_batches.append(batch[3]["index"].tolist())
        return super().loss(model, diffusion, batch, *args, **kwargs)


def test_a_corrupt_record_mid_step_saves_the_last_completed_step_and_the_resume_is_exact(train_config, tmp_path):
    data = make_feature_dataset(tmp_path / "data" / "tiny")
    split = {"data_root": str(data.parent), "train_batch_size": 2, "gradient_accumulation_steps": 2,
             "max_steps": 4}
    recorder = RecordingIndices()
    straight = run(train_config, tmp_path / "straight", split, flavour=recorder)
    # a record of step 3's second micro-batch (not record 0, which the start-up check reads): step 3 fails half-way
    record = next(r for r in recorder.micro_batches[2 * 2 + 1] if r != 0)
    feature = paths.vae_feature_path(data, f"shapes/img_{record:03d}.png", 64)
    intact = feature.read_bytes()
    feature.write_bytes(intact[:50])
    work = tmp_path / "run"
    message = script_error(train_config, work, "--cfg-options",
                           *[f"{key}={value}" for key, value in split.items()])
    emergency = work / "checkpoints" / "epoch_1_step_2.pth"
    assert f"record {record}" in message and str(feature) in message
    assert f"emergency checkpoint of step 2: {emergency} (continue with --resume-from auto)" in message
    assert names(work) == ["epoch_1_step_2.pth"] and not (work / "train.lock").exists()
    feature.write_bytes(intact)
    resumed = run(train_config, work, split, resume_from="auto")
    assert_states_equal(final_state(straight), final_state(resumed))  # bitwise: nothing of step 3 was saved


class FailingLoss(TrainingFlavour):
    def __init__(self, at_call):
        self.calls, self.at_call = 0, at_call

    def loss(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at_call:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return super().loss(*args, **kwargs)


def test_a_failure_while_the_update_is_applied_saves_nothing_half_applied(train_config, tmp_path, monkeypatch):
    work = tmp_path / "run"
    real_step, calls = torch.optim.AdamW.step, []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("optimizer kernel failed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", failing_step)
    with pytest.raises(RuntimeError, match="optimizer kernel failed") as info:
        run(train_config, work, {"max_steps": 6, "save_model_steps": 1})
    notes = " ".join(info.value.__notes__)
    assert "while step 3's update was being applied" in notes and "epoch_1_step_2.pth" in notes
    assert names(work) == ["epoch_1_step_1.pth", "epoch_1_step_2.pth"] and not (work / "train.lock").exists()


def full_disk_for(monkeypatch, name_part):
    """Writes to atomic-write temp files whose name holds `name_part` fail with ENOSPC after a few bytes."""
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        return FullDisk(f) if name_part in os.readlink(f"/proc/self/fd/{fd}") else f

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)


def test_when_the_emergency_save_fails_too_both_errors_are_reported(train_config, tmp_path, monkeypatch):
    work = tmp_path / "run"
    full_disk_for(monkeypatch, ".epoch_1_step_2.pth.")
    with pytest.raises(RuntimeError, match="illegal memory access") as info:
        run(train_config, work, {"max_steps": 6}, flavour=FailingLoss(at_call=3))
    notes = " ".join(info.value.__notes__)
    assert "the emergency checkpoint of step 2 could not be written either (no space left on device while " \
           f"writing {work / 'checkpoints' / 'epoch_1_step_2.pth'}" in notes
    assert names(work) == [] and not list((work / "checkpoints").iterdir())  # no temp file left


# ---------------------------------------------------------------- a resume follows this run's schedule

def test_the_first_resumed_step_uses_the_new_schedules_learning_rate(train_config, tmp_path, monkeypatch):
    cosine = {"lr_schedule": "cosine", "lr_schedule_args.num_warmup_steps": 2}
    work = tmp_path / "run"
    run(train_config, work, {**cosine, "max_steps": 4})  # ends with lr 0: the end of its cosine
    real_step, lrs = torch.optim.AdamW.step, []

    def recording_step(self, *args, **kwargs):
        lrs.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    run(train_config, work, {**cosine, "max_steps": 8}, resume_from="auto")
    expected = [1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 2) / (8 - 2))) for step in range(4, 8)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=0) and lrs[0] == pytest.approx(0.75e-3)


# ---------------------------------------------------------------- disk full, read-only: one named line

def test_disk_full_while_saving_a_checkpoint_is_one_line_and_keeps_the_previous_ones(train_config, tmp_path,
                                                                                   monkeypatch):
    work = tmp_path / "run"
    run(train_config, work, {"max_steps": 2})
    before = files(work / "checkpoints")
    full_disk_for(monkeypatch, ".epoch_1_step_4.pth.")
    message = script_error(train_config, work, "--resume-from", "auto", "--cfg-options", "max_steps=4")
    target = work / "checkpoints" / "epoch_1_step_4.pth"
    assert message.startswith(f"error: no space left on device while writing {target}")
    assert f"the last checkpoint is {work / 'checkpoints' / 'epoch_1_step_2.pth'}" in message
    assert files(work / "checkpoints") == before and not (work / "train.lock").exists()


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"),
                                         (errno.EACCES, "permission denied")])
def test_a_read_only_work_dir_is_one_line_naming_it(train_config, tmp_path, monkeypatch, code, words):
    work = tmp_path / "run"
    work.mkdir()
    real_open = os.open

    def refusing_open(path, *args, **kwargs):
        if str(path).startswith(str(work)):
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    message = script_error(train_config, work)
    assert message == f"error: {words}: cannot write {work / 'train.lock'}"
    assert list(work.iterdir()) == []


def test_write_errors_name_the_path_and_leave_no_temp_file(tmp_path, monkeypatch):
    full_disk_for(monkeypatch, ".weights.pth.")
    with pytest.raises(WriteError) as info:
        fileio.atomic_write(tmp_path / "weights.pth", lambda f: torch.save({"w": torch.zeros(1000)}, f))
    assert info.value.errno == errno.ENOSPC and str(info.value).startswith(
        f"no space left on device while writing {tmp_path / 'weights.pth'}")
    assert list(tmp_path.iterdir()) == []


def test_help_documents_allow_used_work_dir(capsys):
    with pytest.raises(SystemExit):
        load_train_script().parse_args(["--help"])
    assert "--allow-used-work-dir" in capsys.readouterr().out
