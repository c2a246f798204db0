"""The training loop shared by every flavour: set up, build, resume, loop, save.

Read `train()` top to bottom for the story of one run. What it is made of: a `TrainingFlavour` (what differs
between full training, LoRA, DreamBooth, ControlNet and LCM), a distributed strategy (DDP or FSDP,
`diffusion/train/distributed.py`), the `Learner` (the model and what trains or follows it), the `RunState` (where
the run is, saved in every checkpoint) and `train_step` (one optimizer step). Differences from the reference
(SPEC section 9): per-sample seeded randomness (ranks never repeat each other), an LR schedule stepped once per
optimizer step whatever the world size, atomic checkpoints that carry the RNG states and the data position so a
resumed run continues with exactly the batches that were next, appended logs, strict loads.

Nothing is lost (`diffusion/train/workdir.py`): the work dir is only read until every start-up check has passed
(config, lock, checkpoint, data, model, weights); then the run takes the work dir's lock and writes in its run dir
only. An exception after training started saves the last completed step as a normal checkpoint (see
`_after_failure` for what it holds) before it propagates, with notes saying where.
"""
import contextlib
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, gather_object

from diffusion import IDDPM
from diffusion.train import state as ckpt
from diffusion.train import workdir
from diffusion.train.checks import check_batch_fits_model, check_training_config
from diffusion.train.distributed import build_strategy
from diffusion.train.ema import EMA
from diffusion.train.flavour import TrainingFlavour, flavour_from_config
from diffusion.train.optim import build_lr_scheduler, build_optimizer, scaled_lr
from diffusion.utils.checkpoint import CheckpointError, load_state_dict_into, read_state_dict
from diffusion.utils.config import ConfigError
from diffusion.utils.fileio import writing
from diffusion.utils.logger import get_logger


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); a checkpoint was saved first."""


@dataclass
class TrainOptions:
    work_dir: str
    resume_from: str = None     # a checkpoint path, or "auto" for the newest complete one in work_dir
    load_from: str = None       # weights only (released .pth included); non-strict, reported
    report_to: str = "tensorboard"
    debug: bool = False         # log every step and load data in the main process
    allow_used_work_dir: bool = False  # start beside another run's checkpoints, in a run dir of its own (workdir.py)


@dataclass
class TrainResult:
    work_dir: Path
    global_step: int
    epoch: int
    last_checkpoint: Path = None
    losses: list = field(default_factory=list)   # (step, mean loss over ranks) at every logged step
    stopped_by_signal: bool = False
    run_dir: Path = None         # where this run wrote: work_dir, or work_dir/runs/<run_id> (workdir.py)
    run_id: str = None


@dataclass
class RunState:
    """Where the run is: everything the loop carries from step to step. `state_dict()` is what a checkpoint
    stores to continue exactly (top-level keys of the released layout); the other fields describe this call."""
    epoch: int = 0               # 0-based; checkpoint names and logs count from 1
    global_step: int = 0         # optimizer steps done, skipped non-finite ones included
    step_in_epoch: int = 0       # optimizer steps of `epoch` done: the position in the epoch's data order
    nonfinite_streak: int = 0    # consecutive skipped steps
    losses: list = field(default_factory=list)   # (step, mean loss over ranks) at every logged step of this call
    last_checkpoint: Path = None
    last_checkpoint_step: int = None
    stopped_by_signal: bool = False
    start_step: int = 0          # the step this call started from
    # What memory holds while a step or save is under way, for the emergency checkpoint (`_after_failure`):
    phase: str = None            # "gradients", "update" or "saving"; None between steps
    step_start: dict = None      # the RNG states and flavour state at the start of the step under way

    def state_dict(self):
        return {"epoch": self.epoch, "step": self.global_step, "step_in_epoch": self.step_in_epoch,
                "nonfinite_streak": self.nonfinite_streak}

    def load_state_dict(self, state):
        self.epoch, self.global_step = state["epoch"], state["step"]
        self.step_in_epoch, self.nonfinite_streak = state["step_in_epoch"], state["nonfinite_streak"]

    def saved_this_step(self):
        return self.last_checkpoint_step == self.global_step


@dataclass(frozen=True)
class RunPlan:
    """The run's length and batch in optimizer steps, fixed at start-up (max_steps, when set, is the length of
    the run: more or fewer epochs than num_epochs, the last one partial)."""
    accumulation: int
    effective_batch: int
    steps_per_epoch: int
    total_steps: int
    lr: float                    # the optimizer's lr after the auto_lr rule for `effective_batch`

    @classmethod
    def for_run(cls, cfg, world_size, micro_batches_per_epoch):
        accum = cfg.gradient_accumulation_steps
        effective_batch = cfg.train_batch_size * accum * world_size
        steps_per_epoch = micro_batches_per_epoch // accum  # the sampler yields `accum` micro-batches a step
        return cls(accum, effective_batch, steps_per_epoch, cfg.max_steps or cfg.num_epochs * steps_per_epoch,
                   scaled_lr(cfg.optimizer.lr, effective_batch, cfg.auto_lr))


@dataclass
class Learner:
    """The model as the strategy wrapped it and what trains or follows it."""
    flavour: TrainingFlavour
    diffusion: object            # the IDDPM schedule and loss terms
    model: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    ema: EMA                     # saved as `state_dict_ema`; the validation grids sample it
    averaged: dict               # the flavour's other EMA copies, name -> EMA
    frozen: dict                 # the flavour's frozen modules, name -> module

    def companions(self):
        """What the flavour's loss gets besides the model."""
        return {**self.frozen, **{name: ema.model for name, ema in self.averaged.items()}}


def seed_process(seed, rank):
    """Different streams per rank (the reference seeds every rank alike, so ranks repeat each other)."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg, options, flavour=None):
    """Run (or resume) a training run described by a loaded config; returns a TrainResult. `flavour` defaults to
    the config's (`flavour_from_config`: LCM when `lcm` is set, DreamBooth when `dreambooth` is, LoRA when `lora`
    is, ControlNet when `controlnet` is, else full training)."""
    flavour = flavour or flavour_from_config(cfg)
    work_dir = Path(options.work_dir)
    cfg = cfg.with_overrides({"work_dir": str(work_dir)})
    check_training_config(cfg)
    if flavour.fine_tunes_loaded_weights and not options.load_from:
        raise ConfigError(f"the {flavour.name!r} training flavour fine-tunes loaded weights, resumes included: give "
                          "--load-from CKPT (or the config's load_from)")

    # ------------------------------------------------------------ set up (the work dir is only read until it opens)
    strategy = build_strategy(cfg, options.report_to, work_dir)
    accelerator = strategy.accelerator
    rank, world = accelerator.process_index, accelerator.num_processes
    log, held = _startup_logger(accelerator)
    _on_main(accelerator, lambda: workdir.check_unlocked(work_dir))  # a live run's lock, before minutes of building
    resume_path, checkpoint = _find_checkpoint(options.resume_from, work_dir, flavour, log)
    lineage = ckpt.run_id_of(checkpoint) if checkpoint is not None else None
    placement = _on_main(accelerator, lambda: workdir.place_run(work_dir, resume_path, lineage,
                                                                options.allow_used_work_dir))
    seed_process(cfg.seed, rank)
    log.info(f"world size {world}, device {accelerator.device}, mixed precision {cfg.mixed_precision}, "
             f"work dir {work_dir}")

    # ------------------------------------------------------------ build
    data = flavour.build_data(cfg, rank=rank, world_size=world, num_workers=0 if options.debug else cfg.num_workers,
                              device=accelerator.device, load_from=options.load_from)
    model = flavour.build_model(cfg)
    check_batch_fits_model(data.dataset, model, cfg)
    if options.load_from:
        report = load_state_dict_into(model, read_state_dict(options.load_from), strict=False,
                                      source=options.load_from)
        log.info(report.summary())
    model = flavour.wrap_model(model, cfg)
    diffusion = IDDPM(str(cfg.train_sampling_steps), learn_sigma=cfg.learn_sigma, pred_sigma=cfg.pred_sigma,
                      snr=cfg.snr_loss, min_snr_gamma=cfg.min_snr_gamma)
    plan = RunPlan.for_run(cfg, world, len(data.batch_sampler))

    # ------------------------------------------------------------ resume (weights before wrapping)
    learner = build_learner(model, diffusion, flavour, strategy, cfg, plan, checkpoint, resume_path,
                            options.load_from)
    trained = sum(p.numel() for group in learner.optimizer.param_groups for p in group["params"])
    log.info(f"{sum(p.numel() for p in learner.ema.model.parameters()):,} parameters ({trained:,} trained, "
             f"{flavour.name} flavour); {len(data.dataset)} records; {_describe(plan, cfg)}")
    run = RunState()
    if checkpoint is not None:
        _resume(checkpoint, run, learner, strategy, cfg, plan, log)
        run.last_checkpoint, run.last_checkpoint_step = resume_path, run.global_step
        log.info(f"resumed from {resume_path}: epoch {run.epoch + 1}, step {run.global_step} "
                 f"({run.step_in_epoch} of this epoch's {plan.steps_per_epoch} steps done)")
    run.start_step = run.global_step
    del checkpoint  # its tensors are in the learner now

    # ------------------------------------------------------------ open the work dir, loop, save
    with _StopRequest() as stop:  # from here a signal stops the run at a step boundary and the lock is released
        lock = _open_run_dir(accelerator, placement, cfg, run.global_step, log, held)
        try:
            reporter = _Reporter(accelerator, log, options, cfg, plan, run.global_step)
            try:
                _loop(run, plan, data, learner, strategy, cfg, placement, reporter, stop, log)
                if not run.stopped_by_signal and not run.saved_this_step():
                    _save_checkpoint("end of training", run, strategy, learner, cfg, placement, log)
                reporter.close()
            except Exception as err:
                _after_failure(err, run, strategy, learner, cfg, placement, log)
                raise
        finally:
            if lock is not None:
                lock.release()
    log.info(f"finished at epoch {run.epoch + 1}, step {run.global_step}; last checkpoint {run.last_checkpoint}")
    return TrainResult(work_dir, run.global_step, run.epoch, run.last_checkpoint, run.losses, run.stopped_by_signal,
                       placement.path, placement.run_id)


def _loop(run, plan, data, learner, strategy, cfg, placement, reporter, stop, log):
    """Optimizer steps until the plan's last one or a signal, with the scheduled saves and validation grids."""
    accelerator = strategy.accelerator

    def save(reason):
        _save_checkpoint(reason, run, strategy, learner, cfg, placement, log)

    run.stopped_by_signal = _stop_requested(accelerator, stop)
    while run.global_step < plan.total_steps and not run.stopped_by_signal:
        if run.step_in_epoch >= plan.steps_per_epoch:
            run.epoch, run.step_in_epoch = run.epoch + 1, 0
        data.batch_sampler.set_epoch(run.epoch, start_batch=run.step_in_epoch * plan.accumulation)
        batches = iter(data.loader)
        while run.step_in_epoch < plan.steps_per_epoch and run.global_step < plan.total_steps:
            loss, grad_norm = train_step(batches, run, learner, strategy, cfg, data.vae, log)
            reporter.step_done(run, loss, grad_norm, learner.lr_scheduler)
            if run.nonfinite_streak >= cfg.max_nonfinite_steps:
                save("non-finite steps")
                raise _nonfinite_error(run)
            if cfg.eval_interval and run.global_step % cfg.eval_interval == 0 and data.visualizer is not None:
                reporter.visualize(data.visualizer, learner.ema.model, placement.path, run.global_step)
            reason = _scheduled_save(cfg, run, plan)
            if reason is not None:
                save(reason)
            if _stop_requested(accelerator, stop):
                if not run.saved_this_step():
                    save("stop requested by signal")
                run.stopped_by_signal = True
                break


def build_learner(model, diffusion, flavour, strategy, cfg, plan, checkpoint=None, source=None, load_from=None):
    """Resume the weights (before wrapping, so FSDP shards the resumed ones), copy the EMAs from them, then let the
    strategy wrap the model and build the optimizer over the flavour's trainable parameters. `load_from`: the
    run's --load-from weights, for the flavour's frozen modules (LCM's teacher)."""
    device = strategy.accelerator.device
    if checkpoint is not None:
        flavour.load_weights(model, checkpoint["state_dict"], source=source)
    ema = EMA(model, cfg.ema_rate)
    averaged = {name: EMA(model, rate) for name, rate in flavour.averaged_copies(cfg).items()}
    if checkpoint is not None:
        flavour.load_weights(ema.model, checkpoint["state_dict_ema"], source=f"{source} (state_dict_ema)")
        saved = checkpoint.get("flavour", {}).get("averaged", {})
        for name, copy in averaged.items():
            if name not in saved:
                raise CheckpointError(f"{source} lacks the {flavour.name!r} flavour's averaged copy {name!r}")
            flavour.load_weights(copy.model, saved[name], source=f"{source} (averaged copy {name!r})")
    for copy in (ema, *averaged.values()):
        copy.model.to(device)
    model, optimizer = strategy.prepare(model, lambda module, fused: build_optimizer(
        flavour.trainable_parameters(module), cfg.optimizer, plan.lr, fused=fused))
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_schedule, cfg.lr_schedule_args.get("num_warmup_steps", 0),
                                      plan.total_steps)
    return Learner(flavour, diffusion, model, optimizer, lr_scheduler, ema, averaged,
                   flavour.frozen_modules(cfg, device, load_from))


def train_step(batches, run, learner, strategy, cfg, vae, log):
    """One optimizer step over `gradient_accumulation_steps` micro-batches: the flavour's loss, backward,
    clipping, the optimizer step (skipped when the gradients are not finite), then the LR schedule and every EMA.
    Advances `run`; returns this process's mean loss (a tensor) and the gradient norm. `run.phase` says how far it
    got: until the update, memory still holds the previous step (its gradients are only ever zeroed, not saved)."""
    accelerator, model, accum = strategy.accelerator, learner.model, cfg.gradient_accumulation_steps
    run.step_start = {"rng": ckpt.capture_rng_state(), "flavour": learner.flavour.extra_state()}
    run.phase = "gradients"
    model.train()
    losses, indices = [], []
    for micro in range(accum):
        batch = next(batches)
        indices += batch[3]["index"].tolist()
        # gradients are averaged across processes on the last micro-batch only
        with (accelerator.no_sync(model) if micro < accum - 1 else contextlib.nullcontext()):
            loss, _ = learner.flavour.loss(model, learner.diffusion, batch, run.epoch, cfg, accelerator.device, vae,
                                           companions=learner.companions())
            accelerator.backward(loss / accum)
        losses.append(loss.detach())
    loss = torch.stack(losses).mean()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.gradient_clip or float("inf"))
    run.phase = "update"  # from here until the counters advance, memory holds no consistent step
    stepped = _optimizer_step(accelerator, learner.optimizer, grad_norm)
    learner.optimizer.zero_grad(set_to_none=True)
    if stepped:
        learner.lr_scheduler.step()
        for ema in (learner.ema, *learner.averaged.values()):
            strategy.update_ema(model, ema)
        run.nonfinite_streak = 0
    else:
        run.nonfinite_streak += 1
        bad = sorted(gather_object(indices))
        log.warning(f"step {run.global_step + 1}: non-finite loss or gradients (loss {loss.item():.4g}, grad norm "
                    f"{float(grad_norm):.4g}); step skipped; records in the batch: {bad}")
    run.global_step += 1
    run.step_in_epoch += 1
    run.phase = None
    return loss, grad_norm


# ---------------------------------------------------------------- checkpoints

def _save_checkpoint(reason, run, strategy, learner, cfg, placement, log):
    run.phase = "saving"
    run.last_checkpoint = _save(run, strategy, learner, cfg, placement)
    run.last_checkpoint_step, run.phase = run.global_step, None
    log.info(f"saved checkpoint {run.last_checkpoint} ({reason})")


def _save(run, strategy, learner, cfg, placement):
    """Write the checkpoint of the current step (main process; every rank takes part) and return its path."""
    accelerator = strategy.accelerator
    rng_states = gather_object([ckpt.capture_rng_state()])
    model_state = learner.flavour.weights_to_save(strategy.model_state_dict(learner.model))
    optim_state = strategy.optimizer_state_dict(learner.model, learner.optimizer)
    path = ckpt.checkpoint_path(placement.path, run.epoch + 1, run.global_step)
    if accelerator.is_main_process:
        _write_checkpoint(path, run, accelerator, learner, cfg, placement, model_state, optim_state, rng_states,
                          learner.flavour.extra_state())
    accelerator.wait_for_everyone()
    return path


def _write_checkpoint(path, run, accelerator, learner, cfg, placement, model_state, optim_state, rng_states,
                      flavour_state):
    """Write a checkpoint atomically (main process), then prune this run dir's older ones (`keep_last_n`)."""
    payload = {
        "state_dict": _to_cpu(model_state),
        "state_dict_ema": _to_cpu(learner.flavour.weights_to_save(learner.ema.state_dict())),
        "optimizer": optim_state,
        "scheduler": learner.lr_scheduler.state_dict(),
        "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
        **run.state_dict(),
        "world_size": accelerator.num_processes,  # with the two below: the split the data position counts in
        "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "rng": rng_states,
        "config": cfg.pretty_text,
        "flavour": {"name": learner.flavour.name,
                    "averaged": {name: _to_cpu(learner.flavour.weights_to_save(ema.state_dict()))
                                 for name, ema in learner.averaged.items()},
                    "state": flavour_state},
        "run": {"id": placement.run_id, "parent": placement.parent},
    }
    ckpt.save_training_checkpoint(path, payload)
    ckpt.prune_checkpoints(placement.path, cfg.keep_last_n, newest=path)


def _after_failure(err, run, strategy, learner, cfg, placement, log):
    """After an exception in the loop: save the last completed step as a normal checkpoint (main process), and add
    notes to `err` saying where it is (or why there is none); the caller re-raises `err`.

    What the emergency checkpoint holds: the weights, EMAs, optimizer, LR schedule, grad scaler, data position and
    flavour state after the last completed optimizer step, and the RNG states of the step boundary (those at the start
    of the failed step). A step that failed before its update (loading a batch, the loss, backward, clipping) left
    only gradients behind, which are never saved. A failure while the update was being applied (optimizer step,
    schedule, EMAs) leaves memory half-way between two steps: then nothing is saved, and the note names the last
    checkpoint. The other ranks and FSDP's sharded state cannot take part after a failure, so under DDP the main
    process saves alone (its own RNG state: a resume re-seeds the others), and under FSDP with several processes
    nothing is saved."""
    if isinstance(err, TrainingError):  # raised after saving; its message says where
        return
    step, last = run.global_step, run.last_checkpoint or "none"
    accelerator = strategy.accelerator
    if run.phase == "update":
        note = (f"the failure hit while step {step + 1}'s update was being applied, so memory holds no consistent "
                f"step and no emergency checkpoint was written; the last checkpoint is {last}")
    elif run.phase == "saving":
        path = ckpt.checkpoint_path(placement.path, run.epoch + 1, step)
        note = (f"step {step} is saved in {path} (continue with --resume-from auto)" if path.is_file() else
                f"the checkpoint of step {step} was not written; the last checkpoint is {last}")
    elif run.saved_this_step():
        note = f"step {step} is saved in {last} (continue with --resume-from auto)"
    elif step == run.start_step:
        note = f"no step completed since the start at step {step}, so no checkpoint was written"
    elif cfg.use_fsdp and accelerator.num_processes > 1:
        note = f"no emergency checkpoint under FSDP (its shards need every process); the last checkpoint is {last}"
    elif not accelerator.is_main_process:
        return
    else:
        try:
            rng = run.step_start["rng"] if run.phase == "gradients" else ckpt.capture_rng_state()
            flavour_state = run.step_start["flavour"] if run.phase == "gradients" else learner.flavour.extra_state()
            path = ckpt.checkpoint_path(placement.path, run.epoch + 1, step)
            _write_checkpoint(path, run, accelerator, learner, cfg, placement,
                              learner.flavour.weights_to_save(strategy.model_state_dict(learner.model)),
                              strategy.optimizer_state_dict(learner.model, learner.optimizer), [rng], flavour_state)
            run.last_checkpoint, run.last_checkpoint_step = path, step
            note = f"emergency checkpoint of step {step}: {path} (continue with --resume-from auto)"
        except Exception as save_err:
            note = (f"the emergency checkpoint of step {step} could not be written either ({save_err}); the last "
                    f"checkpoint is {last}")
    log.error(f"training stopped after step {step}: {type(err).__name__}: {err}; {note}")
    _traceback_to_log_file(log, err)
    err.add_note(note)
    if placement.log_file.is_file():
        err.add_note(f"traceback in {placement.log_file}")


def _traceback_to_log_file(log, err):
    """The traceback goes to the log file only: the console gets the one-line cause."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "traceback of the failure", None,
                            (type(err), err, err.__traceback__))
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _to_cpu(state_dict):
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def _find_checkpoint(resume_from, work_dir, flavour, log):
    """(path, payload) of the checkpoint to resume from, or (None, None) to start fresh."""
    if resume_from is None:
        return None, None
    if resume_from == "auto":
        path, checkpoint = workdir.read_newest_checkpoint(work_dir, log=log.warning)
        if path is None:
            log.info(f"--resume-from auto: no checkpoint in {work_dir}; starting fresh")
            return None, None
    elif not Path(resume_from).is_file():
        raise FileNotFoundError(f"--resume-from {resume_from}: no such checkpoint file")
    else:
        path = Path(resume_from)
        checkpoint = ckpt.load_training_checkpoint(path)
    saved_flavour = checkpoint.get("flavour", {}).get("name", "full")  # checkpoints before flavours: full training
    if saved_flavour != flavour.name:
        raise CheckpointError(f"{path} was written by the {saved_flavour!r} training flavour; this run is "
                              f"{flavour.name!r}: resume it with its own flavour, or start from its weights with "
                              "--load-from")
    return path, checkpoint


def _resume(checkpoint, run, learner, strategy, cfg, plan, log):
    """The rest of a checkpoint once its weights are in: optimizer, LR schedule, grad scaler, flavour state, the
    run state (its data position converted to this run's batch split) and the RNG streams."""
    accelerator = strategy.accelerator
    strategy.load_optimizer_state_dict(learner.model, learner.optimizer, checkpoint["optimizer"])
    learner.lr_scheduler.load_state_dict(checkpoint["scheduler"])
    _apply_this_runs_schedule(learner.optimizer, learner.lr_scheduler, plan.lr, log)
    if checkpoint.get("scaler") is not None and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(checkpoint["scaler"])
    learner.flavour.load_extra_state(checkpoint.get("flavour", {}).get("state", {}))
    run.load_state_dict(checkpoint)
    run.step_in_epoch = _resume_position(checkpoint, cfg, accelerator.num_processes, plan.accumulation, log)
    _restore_rng(checkpoint, accelerator.process_index, accelerator.num_processes, cfg.seed, run.global_step, log)


def _apply_this_runs_schedule(optimizer, lr_scheduler, lr, log):
    """Set the next step's learning rate from this run's schedule at the resumed step: the optimizer state holds the
    old schedule's (0 at the end of a cosine schedule resumed with a larger max_steps), and the scheduler would only
    apply the new one after its next step. Same config: the same float the uninterrupted run has."""
    lr_scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    step = lr_scheduler.last_epoch
    lrs = [base * factor(step) for factor, base in zip(lr_scheduler.lr_lambdas, lr_scheduler.base_lrs)]
    old = [group["lr"] for group in optimizer.param_groups]
    for group, value in zip(optimizer.param_groups, lrs):
        group["lr"], group["initial_lr"] = value, lr
    lr_scheduler._last_lr = lrs  # what get_last_lr() reports until the next scheduler step
    if old != lrs:
        log.info(f"learning rate for step {step + 1} from this run's schedule: {lrs[0]:.4g} (the checkpoint's "
                 f"optimizer had {old[0]:.4g})")


def _resume_position(state, cfg, world, accum, log):
    """Optimizer steps of the current epoch already done. The data order depends on the effective batch only
    (see the batch sampler), so another world size / batch / accumulation split of the same effective batch
    resumes exactly; another effective batch skips as many samples as were seen (rounded down to a step)."""
    done = state["step_in_epoch"]
    old = math.prod(state.get(k) or 1 for k in ("world_size", "train_batch_size", "gradient_accumulation_steps"))
    new = world * cfg.train_batch_size * accum
    if old == new:
        return done
    position = done * old // new
    log.warning(f"checkpoint written with an effective batch of {old}, resuming with {new}: the epoch's data "
                f"order differs; skipping {position} steps of this epoch ({done * old} samples were seen)")
    return position


def _restore_rng(state, rank, world, seed, global_step, log):
    if state.get("world_size") == world and len(state.get("rng", [])) == world:
        ckpt.restore_rng_state(state["rng"][rank])
        return
    # Another world size: per-sample draws are unaffected (they depend on seed, epoch and record only).
    log.warning(f"checkpoint was written by {state.get('world_size')} processes, this run has {world}: "
                "process RNG streams are re-seeded; data order and per-sample noise are unaffected")
    seed_process(seed + 1000003 * global_step, rank)


def _scheduled_save(cfg, run, plan):
    """Why the config wants a checkpoint after this step, or None."""
    if cfg.save_model_steps and run.global_step % cfg.save_model_steps == 0:
        return f"every {cfg.save_model_steps} steps"
    epoch_done = run.step_in_epoch == plan.steps_per_epoch
    if epoch_done and cfg.save_model_epochs and (run.epoch + 1) % cfg.save_model_epochs == 0:
        return f"every {cfg.save_model_epochs} epochs"
    return None


# ---------------------------------------------------------------- the step's pieces, stopping, reporting

def _optimizer_step(accelerator, optimizer, grad_norm):
    """Step unless the gradients are non-finite; fp16's scaler decides (and lowers its scale) itself."""
    if accelerator.scaler is not None:
        optimizer.step()
        return not accelerator.optimizer_step_was_skipped
    if not math.isfinite(float(grad_norm)):
        return False
    optimizer.step()
    return True


def _nonfinite_error(run):
    return TrainingError(
        f"{run.nonfinite_streak} consecutive steps had a non-finite loss or gradients (last at step "
        f"{run.global_step}); stopped after saving {run.last_checkpoint}. Lower the learning rate, "
        "check the data records logged above, or use mixed_precision='bf16'")


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and stops."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop now
            signal.signal(signum, self._previous[signum])
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stop_requested(accelerator, stop):
    """All ranks stop together if any rank got a signal."""
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _on_main(accelerator, fn):
    """`fn()` on the main process only, its result handed to every rank; an error there stops every rank."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except Exception as err:
            error = err
    if accelerator.num_processes > 1:
        message = None if error is None else f"{type(error).__name__}: {error}"
        result, message = broadcast_object_list([result, message])
        if error is None and message is not None:
            raise workdir.WorkDirError(f"the main process stopped at start-up: {message}")
    if error is not None:
        raise error
    return result


class _HeldLines(logging.Handler):
    """Start-up lines, held for the run's log file: nothing is written before the start-up checks pass."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _startup_logger(accelerator):
    log = get_logger("pixart.train", None, accelerator.is_main_process)
    held = _HeldLines()
    log.addHandler(held)
    return log, held


def _open_run_dir(accelerator, placement, cfg, start_step, log, held):
    """Main process: take the work dir's lock, check that its checkpoints are still those the run was placed by,
    remove stale temp files, create the run dir, write the config (never over an earlier one), open the log with
    the start-up lines. The other ranks follow (or stop with the main one). Returns the lock (None off the main)."""
    lock = None

    def open_on_main():
        nonlocal lock
        lock = workdir.WorkDirLock.acquire(placement.work_dir, placement.run_id, log.warning)
        try:
            workdir.check_unchanged(placement)
            workdir.remove_stale_temp_files(placement.work_dir, log.info)
            with writing(placement.path):
                placement.path.mkdir(parents=True, exist_ok=True)
            config = workdir.write_config(placement.path, cfg.pretty_text, start_step)
            with writing(placement.log_file):
                get_logger("pixart.train", placement.log_file, True)  # the same logger, now with the file
            file_handler = next(h for h in log.handlers if isinstance(h, logging.FileHandler))
            for record in held.records:
                file_handler.handle(record)
        except BaseException:
            lock.release()
            raise
        branch = f" (branched from {placement.parent})" if placement.parent else ""
        log.info(f"run {placement.run_id}{branch} writes in {placement.path}; merged config in {config}; "
                 f"holding {lock.path}")

    _on_main(accelerator, open_on_main)
    # the run dir is known only now: TensorBoard's events go there too
    accelerator.project_configuration.project_dir = str(placement.path)
    accelerator.project_configuration.logging_dir = str(placement.path)
    return lock


def _describe(plan, cfg):
    return (f"{plan.steps_per_epoch} optimizer steps per epoch, {plan.total_steps} in all; effective batch "
            f"{plan.effective_batch}; lr {cfg.optimizer.lr:g} -> {plan.lr:g} "
            f"(auto_lr {dict(cfg.auto_lr) if cfg.auto_lr else 'off'})")


class _Reporter:
    """What a person watching the run sees: the progress bar, a log line and tracker scalars every
    `log_interval` steps (images/s over the steps since the last one) and the validation grids."""

    def __init__(self, accelerator, log, options, cfg, plan, initial_step):
        from tqdm.auto import tqdm
        self.accelerator, self.log, self.report_to = accelerator, log, options.report_to
        self.interval = 1 if options.debug else cfg.log_interval
        self.plan = plan
        if self.report_to != "none":
            accelerator.init_trackers("pixart", config={"config_file": str(cfg.filename),
                                                        "world_size": accelerator.num_processes})
        self.bar = tqdm(total=plan.total_steps, initial=initial_step, disable=not accelerator.is_main_process,
                        desc="train", dynamic_ncols=True, unit="step")
        self.window_start, self.window_images = time.perf_counter(), 0

    def step_done(self, run, loss, grad_norm, lr_scheduler):
        """Count the step; on a logged step, average the loss over ranks and append it to `run.losses`."""
        self.window_images += self.plan.effective_batch
        self.bar.update(1)
        step = run.global_step
        if step % self.interval != 0 and step != self.plan.total_steps:
            return
        mean_loss = self.accelerator.reduce(loss, reduction="mean").item()
        elapsed = time.perf_counter() - self.window_start
        speed = self.window_images / max(elapsed, 1e-9)
        self.window_start, self.window_images = time.perf_counter(), 0
        lr = lr_scheduler.get_last_lr()[0]
        run.losses.append((step, mean_loss))
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        self.log.info(f"epoch {run.epoch + 1} step {step}/{self.plan.total_steps} loss {mean_loss:.4f} "
                      f"grad_norm {float(grad_norm):.3f} lr {lr:.3e} {speed:.1f} img/s")
        if self.report_to != "none":
            self.accelerator.log({"loss": mean_loss, "lr": lr, "grad_norm": float(grad_norm),
                                  "images_per_second": speed}, step=step)

    def visualize(self, visualizer, ema_model, work_dir, step):
        """Sample the validation grid with the EMA weights (main process; the others wait)."""
        if self.accelerator.is_main_process:
            path = visualizer(ema_model, work_dir / "vis" / f"step_{step}.png")
            self.log.info(f"validation samples: {path}")
            if self.report_to == "tensorboard":
                from PIL import Image
                writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_image("validation", np.asarray(Image.open(path)), step, dataformats="HWC")
        self.accelerator.wait_for_everyone()

    def close(self):
        self.bar.close()
        if self.report_to != "none":
            self.accelerator.end_training()
