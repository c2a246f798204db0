"""The training loop shared by every flavour: set up, build, (resume), loop, log, save.

Read `train()` top to bottom for the story of one run. Differences from the reference (SPEC section 9):
per-sample seeded randomness (ranks never repeat each other), an LR schedule stepped once per optimizer
step whatever the world size, atomic checkpoints that carry the RNG states and the data position so a
resumed run continues with exactly the batches that were next, appended logs, strict loads.
"""
import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import gather_object

from diffusion import IDDPM
from diffusion.train.data import build_train_data
from diffusion.train import state as ckpt
from diffusion.train.ema import EMA
from diffusion.train.flavour import TrainingFlavour
from diffusion.train.optim import build_lr_scheduler, build_optimizer, scaled_lr
from diffusion.train.validate import check_batch_fits_model, check_training_config
from diffusion.utils.checkpoint import load_state_dict_into, read_state_dict
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


@dataclass
class TrainResult:
    work_dir: Path
    global_step: int
    epoch: int
    last_checkpoint: Path = None
    losses: list = field(default_factory=list)   # (step, mean loss over ranks) at every logged step
    stopped_by_signal: bool = False


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


def seed_process(seed, rank):
    """Different streams per rank (the reference seeds every rank alike, so ranks repeat each other)."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def train(cfg, options, flavour=None):
    """Run (or resume) a training run described by a loaded config; returns a TrainResult."""
    from accelerate import Accelerator

    flavour = flavour or TrainingFlavour()
    work_dir = Path(options.work_dir)
    cfg = cfg.with_overrides({"work_dir": str(work_dir)})
    check_training_config(cfg)

    # ------------------------------------------------------------ set up
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if options.report_to == "none" else options.report_to,
        project_dir=str(work_dir),
        fsdp_plugin=_fsdp_plugin() if cfg.use_fsdp else None,
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    log = get_logger("pixart.train", work_dir / "train_log.log", accelerator.is_main_process)
    if accelerator.is_main_process:
        cfg.dump(work_dir / "config.py")
    seed_process(cfg.seed, rank)
    log.info(f"world size {world}, device {accelerator.device}, mixed precision {cfg.mixed_precision}, "
             f"work dir {work_dir}")

    # ------------------------------------------------------------ build
    data = build_train_data(cfg, rank=rank, world_size=world, num_workers=0 if options.debug else cfg.num_workers,
                            device=accelerator.device)
    model = flavour.build_model(cfg)
    check_batch_fits_model(data.dataset, model, cfg)
    if options.load_from:
        report = load_state_dict_into(model, read_state_dict(options.load_from), strict=False,
                                      source=options.load_from)
        log.info(report.summary())
    diffusion = IDDPM(str(cfg.train_sampling_steps), learn_sigma=cfg.learn_sigma, pred_sigma=cfg.pred_sigma,
                      snr=cfg.snr_loss, min_snr_gamma=cfg.min_snr_gamma)
    accum = cfg.gradient_accumulation_steps
    effective_batch = cfg.train_batch_size * accum * world
    steps_per_epoch = len(data.batch_sampler) // accum  # the sampler yields `accum` micro-batches a step
    # max_steps, when set, is the length of the run (more or fewer epochs than num_epochs, the last one partial)
    total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch

    # ------------------------------------------------------------ resume (weights before wrapping)
    global_step, epoch, step_in_epoch, nonfinite_streak = 0, 0, 0, 0
    resume_path = _resolve_resume(options.resume_from, work_dir, log)
    state = ckpt.load_training_checkpoint(resume_path) if resume_path is not None else None
    if state is not None:
        load_state_dict_into(model, state["state_dict"], source=resume_path)
    ema = EMA(model, cfg.ema_rate)
    if state is not None:
        ema.load_state_dict(state["state_dict_ema"])
    ema.model.to(accelerator.device)

    # ------------------------------------------------------------ wrap, optimizer, schedule
    lr = scaled_lr(cfg.optimizer.lr, effective_batch, cfg.auto_lr)
    fused = not cfg.use_fsdp  # fused AdamW: on the CPU too, ~40x faster than the per-tensor loop there
    if cfg.use_fsdp:  # FSDP wraps the model first; the optimizer then sees the sharded parameters
        model = accelerator.prepare(model)
        optimizer = accelerator.prepare(build_optimizer(flavour.trainable_parameters(model), cfg.optimizer, lr))
    else:
        optimizer = build_optimizer(flavour.trainable_parameters(model), cfg.optimizer, lr, fused=fused)
        model, optimizer = accelerator.prepare(model, optimizer)
    lr_scheduler = build_lr_scheduler(optimizer, cfg.lr_schedule, cfg.lr_schedule_args.get("num_warmup_steps", 0),
                                      total_steps)
    log.info(f"{sum(p.numel() for p in ema.model.parameters()):,} parameters; {len(data.dataset)} records; "
             f"{steps_per_epoch} optimizer steps per epoch, {total_steps} in all; effective batch "
             f"{effective_batch}; lr {cfg.optimizer.lr:g} -> {lr:g} (auto_lr {dict(cfg.auto_lr) if cfg.auto_lr else 'off'})")
    if state is not None:
        _load_optimizer_state(accelerator, model, optimizer, state["optimizer"], cfg)
        lr_scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state["scaler"])
        global_step, epoch, nonfinite_streak = state["step"], state["epoch"], state["nonfinite_streak"]
        step_in_epoch = _resume_position(state, cfg, world, accum, log)
        _restore_rng(state, rank, world, cfg.seed, global_step, log)
        log.info(f"resumed from {resume_path}: epoch {epoch + 1}, step {global_step} "
                 f"({step_in_epoch} of this epoch's {steps_per_epoch} steps done)")
    if options.report_to != "none":
        accelerator.init_trackers("pixart", config={"config_file": str(cfg.filename), "world_size": world})

    # ------------------------------------------------------------ loop
    result = TrainResult(work_dir=work_dir, global_step=global_step, epoch=epoch)
    log_interval = 1 if options.debug else cfg.log_interval
    progress = _progress_bar(accelerator, total_steps, global_step)
    window_start, window_images = time.perf_counter(), 0

    def save(reason):
        path = _save(accelerator, model, ema, optimizer, lr_scheduler, flavour, cfg, work_dir,
                     epoch, global_step, step_in_epoch, nonfinite_streak)
        log.info(f"saved checkpoint {path} ({reason})")
        result.last_checkpoint = path
        return path

    with _StopRequest() as stop:
        while global_step < total_steps:
            if step_in_epoch >= steps_per_epoch:
                epoch, step_in_epoch = epoch + 1, 0
            data.batch_sampler.set_epoch(epoch, start_batch=step_in_epoch * accum)
            batches = iter(data.loader)
            while step_in_epoch < steps_per_epoch and global_step < total_steps:
                model.train()
                losses, indices = [], []
                for micro in range(accum):
                    batch = next(batches)
                    indices += batch[3]["index"].tolist()
                    sync = micro == accum - 1
                    with (accelerator.no_sync(model) if not sync else contextlib.nullcontext()):
                        loss, _ = flavour.loss(model, diffusion, batch, epoch, cfg, accelerator.device, data.vae)
                        accelerator.backward(loss / accum)
                    losses.append(loss.detach())
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.gradient_clip or float("inf"))
                stepped = _optimizer_step(accelerator, optimizer, grad_norm)
                optimizer.zero_grad(set_to_none=True)
                if stepped:
                    lr_scheduler.step()
                    _ema_update(accelerator, model, ema, cfg)
                    nonfinite_streak = 0
                else:
                    nonfinite_streak += 1
                    bad = sorted(gather_object(indices))
                    log.warning(f"step {global_step + 1}: non-finite loss or gradients (loss "
                                f"{torch.stack(losses).mean().item():.4g}, grad norm {float(grad_norm):.4g}); "
                                f"step skipped; records in the batch: {bad}")
                global_step += 1
                step_in_epoch += 1
                window_images += effective_batch
                progress.update(1)

                if global_step % log_interval == 0 or global_step == total_steps:
                    mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
                    elapsed = time.perf_counter() - window_start
                    speed = window_images / max(elapsed, 1e-9)
                    window_start, window_images = time.perf_counter(), 0
                    current_lr = lr_scheduler.get_last_lr()[0]
                    result.losses.append((global_step, mean_loss))
                    progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{current_lr:.2e}", img_s=f"{speed:.1f}")
                    log.info(f"epoch {epoch + 1} step {global_step}/{total_steps} loss {mean_loss:.4f} "
                             f"grad_norm {float(grad_norm):.3f} lr {current_lr:.3e} {speed:.1f} img/s")
                    if options.report_to != "none":
                        accelerator.log({"loss": mean_loss, "lr": current_lr, "grad_norm": float(grad_norm),
                                         "images_per_second": speed}, step=global_step)
                if nonfinite_streak >= cfg.max_nonfinite_steps:
                    save("non-finite steps")
                    raise TrainingError(
                        f"{nonfinite_streak} consecutive steps had a non-finite loss or gradients (last at step "
                        f"{global_step}); stopped after saving {result.last_checkpoint}. Lower the learning rate, "
                        "check the data records logged above, or use mixed_precision='bf16'")
                if cfg.eval_interval and global_step % cfg.eval_interval == 0 and data.visualizer is not None:
                    _visualize(accelerator, data.visualizer, ema.model, work_dir, global_step, log, options)
                epoch_done = step_in_epoch == steps_per_epoch
                if cfg.save_model_steps and global_step % cfg.save_model_steps == 0:
                    save(f"every {cfg.save_model_steps} steps")
                elif epoch_done and cfg.save_model_epochs and (epoch + 1) % cfg.save_model_epochs == 0:
                    save(f"every {cfg.save_model_epochs} epochs")
                if _stop_requested(accelerator, stop):
                    if result.last_checkpoint is None or ckpt.checkpoint_step(result.last_checkpoint) != global_step:
                        save("stop requested by signal")
                    result.stopped_by_signal = True
                    break
            if result.stopped_by_signal:
                break

    if not result.stopped_by_signal and (result.last_checkpoint is None or
                                         ckpt.checkpoint_step(result.last_checkpoint) != global_step):
        save("end of training")
    progress.close()
    if options.report_to != "none":
        accelerator.end_training()
    result.global_step, result.epoch = global_step, epoch
    log.info(f"finished at epoch {epoch + 1}, step {global_step}; last checkpoint {result.last_checkpoint}")
    return result


# ---------------------------------------------------------------- helpers

def _fsdp_plugin():
    """Shard the transformer blocks of PixArt and PixArtMS (each block is one FSDP unit)."""
    from accelerate import FullyShardedDataParallelPlugin
    from diffusion.model.nets.PixArt_blocks import PixArtBlock
    return FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=[PixArtBlock.__name__],
                                          auto_wrap_policy="transformer_based_wrap", use_orig_params=True)


def _resolve_resume(resume_from, work_dir, log):
    if resume_from is None:
        return None
    if resume_from == "auto":
        path = ckpt.find_resumable_checkpoint(work_dir, log=log.warning)
        if path is None:
            log.info(f"--resume-from auto: no checkpoint in {work_dir / ckpt.CHECKPOINT_DIR}; starting fresh")
        return path
    if not Path(resume_from).is_file():
        raise FileNotFoundError(f"--resume-from {resume_from}: no such checkpoint file")
    return Path(resume_from)


def _optimizer_step(accelerator, optimizer, grad_norm):
    """Step unless the gradients are non-finite; fp16's scaler decides (and lowers its scale) itself."""
    if accelerator.scaler is not None:
        optimizer.step()
        return not accelerator.optimizer_step_was_skipped
    if not math.isfinite(float(grad_norm)):
        return False
    optimizer.step()
    return True


def _stop_requested(accelerator, stop):
    """All ranks stop together if any rank got a signal."""
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _save(accelerator, model, ema, optimizer, lr_scheduler, flavour, cfg, work_dir, epoch, global_step,
          step_in_epoch, nonfinite_streak):
    rng_states = gather_object([ckpt.capture_rng_state()])
    if cfg.use_fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        model_state = accelerator.get_state_dict(model)
        optim_state = FSDP.optim_state_dict(model, optimizer.optimizer)
    else:
        model_state = flavour.state_dict(accelerator.unwrap_model(model))
        optim_state = optimizer.state_dict()
    path = ckpt.checkpoint_path(work_dir, epoch + 1, global_step)
    if accelerator.is_main_process:
        payload = {
            "state_dict": {k: v.detach().cpu() for k, v in model_state.items()},
            "state_dict_ema": {k: v.detach().cpu() for k, v in ema.state_dict().items()},
            "optimizer": optim_state,
            "scheduler": lr_scheduler.state_dict(),
            "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            "epoch": epoch,
            "step": global_step,
            "step_in_epoch": step_in_epoch,
            "nonfinite_streak": nonfinite_streak,
            "world_size": accelerator.num_processes,
            "train_batch_size": cfg.train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "rng": rng_states,
            "config": cfg.pretty_text,
        }
        ckpt.save_training_checkpoint(path, payload)
        ckpt.prune_checkpoints(work_dir, cfg.keep_last_n)
    accelerator.wait_for_everyone()
    return path


def _ema_update(accelerator, model, ema, cfg):
    if cfg.use_fsdp:  # the EMA is a full fp32 copy; gather the sharded weights for the update
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, writeback=False):
            ema.update(model.module if hasattr(model, "module") else model)
    else:
        ema.update(accelerator.unwrap_model(model))


def _load_optimizer_state(accelerator, model, optimizer, optim_state, cfg):
    if cfg.use_fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        optim_state = FSDP.optim_state_dict_to_load(model, optimizer.optimizer, optim_state)
    optimizer.load_state_dict(optim_state)


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


def _progress_bar(accelerator, total, initial):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not accelerator.is_main_process, desc="train",
                dynamic_ncols=True, unit="step")


def _visualize(accelerator, visualizer, ema_model, work_dir, global_step, log, options):
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    path = visualizer(ema_model, work_dir / "vis" / f"step_{global_step}.png")
    log.info(f"validation samples: {path}")
    if options.report_to == "tensorboard":
        import numpy as np
        from PIL import Image
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_image("validation", np.asarray(Image.open(path)), global_step, dataformats="HWC")
    accelerator.wait_for_everyone()
