"""LoRA fine-tuning as a training flavour: peft adapters on the loaded model, only they train.

Selected by the config's `lora` dict (`flavour_from_config`). The base weights come from `--load-from` (or the
config's `load_from`) at every start, resumes included; they get no gradient and no optimizer state, and a
checkpoint holds the adapter (live and EMA), the optimizer state of the adapter and the fingerprint of the base it
was trained on, so a resume on other base weights is refused. `tools/export_lora.py` turns a checkpoint into a peft
folder in diffusers' names; `tools/merge_lora.py` folds an adapter into a full checkpoint.
"""
from diffusion.model.lora import (
    LoraSettings,
    LoraSpec,
    adapter_state_dict,
    add_adapter,
    fingerprint,
    is_adapter_key,
    load_adapter_weights,
    resolve_targets,
)
from diffusion.train.flavour import TrainingFlavour
from diffusion.utils.checkpoint import CheckpointError

ADAPTER = "default"  # the adapter's name inside the model (peft's default)


class LoRAFlavour(TrainingFlavour):
    """Trains one LoRA adapter (`LoraSettings`: rank, alpha, dropout, target_modules, use_dora, use_rslora) on
    the frozen loaded model, with the IDDPM loss of full training."""

    name = "lora"
    fine_tunes_loaded_weights = True

    def __init__(self, settings):
        self.settings = LoraSettings.from_config(settings)  # fails at start-up, naming the key
        self.spec = None
        self.base_fingerprint = None

    def wrap_model(self, model, cfg):
        self.base_fingerprint = fingerprint(model.state_dict())
        self.spec = LoraSpec.for_modules(resolve_targets(model, self.settings.target_modules), self.settings)
        return add_adapter(model, self.spec, ADAPTER)

    def trainable_parameters(self, model):
        """The adapter only, whatever else may require a gradient."""
        return [p for name, p in model.named_parameters() if is_adapter_key(name)]

    def weights_to_save(self, state_dict):
        return adapter_state_dict(state_dict, ADAPTER)

    def load_weights(self, model, state_dict, source):
        load_adapter_weights(model, state_dict, ADAPTER, source=source)

    def extra_state(self):
        """The adapter's shape (what `tools/export_lora.py` writes into adapter_config.json) and the base's
        fingerprint."""
        return {"adapter": self.spec.to_dict(), "base_fingerprint": self.base_fingerprint}

    def load_extra_state(self, state):
        saved = LoraSpec.from_dict(state["adapter"])
        if saved.to_dict() != self.spec.to_dict():
            raise CheckpointError(f"the checkpoint's adapter ({_describe(saved)}) differs from the config's lora "
                                  f"({_describe(self.spec)}); resume with the config it was trained with")
        if state["base_fingerprint"] != self.base_fingerprint:
            raise CheckpointError("the checkpoint's adapter was trained on other base weights (fingerprint "
                                  f"{state['base_fingerprint'][:12]}, this run's {self.base_fingerprint[:12]}); "
                                  "resume with the --load-from (or load_from) the run started with")


def _describe(spec):
    ranks = sorted(set(spec.ranks.values()))
    return f"{len(spec.modules)} modules, rank {ranks[0] if len(ranks) == 1 else ranks}, dora {spec.use_dora}"


ADAPTER_FLAVOURS = ("lora", "dreambooth-lora", "lcm-lora")  # the flavours whose checkpoints hold an adapter


def holds_adapter(checkpoint):
    """Whether a training checkpoint holds a LoRA adapter rather than a model (LoRA, DreamBooth-LoRA, LCM-LoRA)."""
    return checkpoint.get("flavour", {}).get("name") in ADAPTER_FLAVOURS


def adapter_from_checkpoint(path, use_ema=True):
    """(weights, spec) in our module names of the adapter a LoRA training checkpoint holds (LoRA, DreamBooth-LoRA
    or LCM-LoRA runs): its EMA weights, or the live ones with use_ema=False."""
    from diffusion.utils.checkpoint import read_checkpoint
    obj = read_checkpoint(path)
    flavour = obj.get("flavour", {})
    if not holds_adapter(obj):
        raise CheckpointError(f"{path} is not a LoRA training checkpoint (it was written by the "
                              f"{flavour.get('name', 'full')!r} flavour); give a LoRA run's checkpoint or a peft "
                              "adapter folder")
    key = "state_dict_ema" if use_ema else "state_dict"
    return dict(obj[key]), LoraSpec.from_dict(flavour["state"]["adapter"])
