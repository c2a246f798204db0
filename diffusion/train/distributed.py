"""How the model is spread over the processes: DDP (one full replica each; also the single-process case) or FSDP
(transformer blocks sharded). A strategy owns the run's Accelerator and everything that differs between the two:
the plugin, wrapping the model and building its optimizer, gathering model and optimizer state for a checkpoint,
loading optimizer state on resume and updating an EMA from the (sharded) weights."""
import torch
from accelerate import Accelerator


def build_strategy(cfg, report_to, work_dir):
    """The strategy the config asks for (`use_fsdp`), with its Accelerator."""
    kind = FSDPStrategy if cfg.use_fsdp else DDPStrategy
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
        log_with=None if report_to == "none" else report_to,
        project_dir=str(work_dir),
        fsdp_plugin=kind.plugin(),
    )
    return kind(accelerator)


class DDPStrategy:
    """One full model replica per process; DDP averages the gradients (one process: no wrapper at all)."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @staticmethod
    def plugin():
        """accelerate's `fsdp_plugin` argument."""
        return None

    def prepare(self, model, make_optimizer):
        """(wrapped model, optimizer); `make_optimizer(module, fused)` builds the optimizer over `module`."""
        # fused AdamW: on the CPU too, ~40x faster than the per-tensor loop there
        optimizer = make_optimizer(model, fused=True)
        return self.accelerator.prepare(model, optimizer)

    def model_state_dict(self, model):
        """The full (unsharded) state dict of the wrapped model; every rank calls it."""
        return self.accelerator.unwrap_model(model).state_dict()

    def optimizer_state_dict(self, model, optimizer):
        """The optimizer state as one process would hold it; every rank calls it."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model, optimizer, state_dict):
        optimizer.load_state_dict(state_dict)

    def update_ema(self, model, ema):
        ema.update(self.accelerator.unwrap_model(model))


class FSDPStrategy(DDPStrategy):
    """Every PixArt / PixArtMS transformer block one FSDP unit, sharded across the processes (GPUs only)."""

    @staticmethod
    def plugin():
        from accelerate import FullyShardedDataParallelPlugin
        from diffusion.model.nets.PixArt_blocks import PixArtBlock
        return FullyShardedDataParallelPlugin(transformer_cls_names_to_wrap=[PixArtBlock.__name__],
                                              auto_wrap_policy="transformer_based_wrap", use_orig_params=True)

    def prepare(self, model, make_optimizer):
        # FSDP wraps the model first; the optimizer then sees the sharded parameters
        model = self.accelerator.prepare(model)
        return model, self.accelerator.prepare(make_optimizer(model, fused=False))

    def model_state_dict(self, model):
        return self.accelerator.get_state_dict(model)

    def optimizer_state_dict(self, model, optimizer):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        return FSDP.optim_state_dict(model, optimizer.optimizer)

    def load_optimizer_state_dict(self, model, optimizer, state_dict):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        optimizer.load_state_dict(FSDP.optim_state_dict_to_load(model, optimizer.optimizer, state_dict))

    def update_ema(self, model, ema):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        # the EMA is a full fp32 copy; gather the sharded weights for the update
        with FSDP.summon_full_params(model, writeback=False):
            ema.update(model.module if hasattr(model, "module") else model)
