"""LoRA adapters (peft) on a PixArt model: which modules they adapt, adding them, their tensors, scales, merging.

Adapters live in the model as peft LoRA layers under our module names; the state dict then holds
`blocks.0.attn.qkv.base_layer.weight` and `blocks.0.attn.qkv.lora_A.<adapter>.weight`. An adapter's tensors outside
the model (checkpoints, `adapter_state_dict`) use peft's saved key format, without the adapter name:
`blocks.0.attn.qkv.lora_A.weight`, `...lora_B.weight`, `...lora_magnitude_vector` (DoRA). Our packed projections
(self-attention qkv, cross-attention kv) carry one LoRA each; `diffusion/utils/lora_interop.py` maps adapters to
and from the per-projection modules of diffusers' PixArtTransformer2DModel exactly.
"""
import difflib
import hashlib
import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from diffusion.utils.checkpoint import REGENERATED_KEYS, CheckpointError
from diffusion.utils.config import ConfigError

# Named groups of `lora.target_modules`, as module names (a name matches itself and every module ending in ".name").
TARGET_GROUPS = {
    "self_attention": ("attn.qkv", "attn.proj"),
    "cross_attention": ("cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
    "t_block": ("t_block.1",),  # the shared adaLN-single projection
    "caption_projection": ("y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2"),
    # the released PixArt-LCM-LoRA's targets, diffusers' to_q/k/v, to_out.0, ff.net.*, proj (the patch conv too),
    # linear (adaLN-single), linear_1/2 (timestep, caption and size embedders) and proj_out, in our names
    "lcm_lora": ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "mlp.fc1",
                 "mlp.fc2", "x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1",
                 "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2", "csize_embedder.mlp.0", "csize_embedder.mlp.2",
                 "ar_embedder.mlp.0", "ar_embedder.mlp.2", "final_layer.linear"),
}
DEFAULT_TARGETS = ("self_attention", "cross_attention", "mlp")
ADAPTER_PARTS = ("lora_A", "lora_B", "lora_magnitude_vector")
# A model state-dict key of an adapter tensor: module, part, adapter name.
_MODEL_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)\.(?P<adapter>[^.]+)\.weight$")
_SAVED_SUFFIX = {"lora_A": ".lora_A.weight", "lora_B": ".lora_B.weight",
                 "lora_magnitude_vector": ".lora_magnitude_vector"}


@dataclass(frozen=True)
class LoraSettings:
    """The config's `lora` dict (base config: None = off), validated; `from_config` names what is wrong."""
    rank: int = 16
    alpha: float = None          # the update is scaled by alpha / rank (alpha / sqrt(rank) with use_rslora); None: rank
    dropout: float = 0.0         # dropout on the adapter's input, in training
    target_modules: tuple = DEFAULT_TARGETS   # group names of TARGET_GROUPS and/or module names
    use_dora: bool = False       # weight-decomposed LoRA (DoRA)
    use_rslora: bool = False     # rank-stabilised scaling alpha / sqrt(rank)

    @classmethod
    def from_config(cls, value):
        if isinstance(value, LoraSettings):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key 'lora' is {value!r}; expected None (off) or a dict such as "
                              "dict(rank=16, alpha=16, dropout=0.0, target_modules=None, use_dora=False)")
        names = [f.name for f in fields(cls)]
        for key in value:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"the keys are {names}"
                raise ConfigError(f"unknown config key 'lora.{key}'; {hint}")
        settings = {k: v for k, v in value.items() if v is not None}
        settings.setdefault("alpha", settings.get("rank", cls.rank))
        if "target_modules" in settings:
            targets = settings["target_modules"]
            if isinstance(targets, str) or not isinstance(targets, (list, tuple)) or not targets or \
                    not all(isinstance(t, str) for t in targets):
                raise ConfigError(f"config key 'lora.target_modules' is {targets!r}; expected None (the default "
                                  f"{list(DEFAULT_TARGETS)}) or a non-empty list of group names {list(TARGET_GROUPS)} "
                                  "and/or module names such as 'attn.qkv'")
            settings["target_modules"] = tuple(targets)
        self = cls(**settings)
        _require(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1, "rank", self.rank,
                 "an integer >= 1")
        _require(_is_number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        _require(_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        for flag in ("use_dora", "use_rslora"):
            _require(isinstance(getattr(self, flag), bool), flag, getattr(self, flag), "True or False")
        return self


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(condition, key, value, expected):
    if not condition:
        raise ConfigError(f"config key 'lora.{key}' is {value!r}; expected {expected}")


def resolve_targets(model, targets):
    """Full names of the Linear / Conv2d modules that `targets` (group names, module names) select, in model order."""
    modules = dict(model.named_modules())
    chosen = set()
    for target in targets:
        names = TARGET_GROUPS.get(target, (target,))
        found = [m for m in modules if any(m == n or m.endswith("." + n) for n in names)]
        if not found:
            raise ConfigError(f"lora.target_modules entry {target!r} matches no module of {type(model).__name__}; "
                              f"give a group name {list(TARGET_GROUPS)} or module names such as 'attn.qkv', "
                              "'cross_attn.kv_linear', 't_block.1', 'final_layer.linear'")
        for name in found:
            if not isinstance(modules[name], (nn.Linear, nn.Conv2d)):
                raise ConfigError(f"lora.target_modules entry {target!r} selects {name!r}, a "
                                  f"{type(modules[name]).__name__}; LoRA adapts Linear and Conv2d modules")
        chosen.update(found)
    return [m for m in modules if m in chosen]


@dataclass
class LoraSpec:
    """An adapter's shape and scaling, tensors aside: the rank and alpha of every adapted module (full module
    names, ours or diffusers'), and the flags that apply to all of them."""
    ranks: dict
    alphas: dict
    dropout: float = 0.0
    use_dora: bool = False
    use_rslora: bool = False
    modules: list = field(init=False)

    def __post_init__(self):
        if set(self.ranks) != set(self.alphas):
            raise ValueError("an adapter needs a rank and an alpha for every module")
        self.modules = list(self.ranks)

    @classmethod
    def for_modules(cls, names, settings):
        return cls({n: settings.rank for n in names}, {n: float(settings.alpha) for n in names},
                   float(settings.dropout), settings.use_dora, settings.use_rslora)

    def scaling(self, module):
        """The factor on module's B @ A (peft: alpha / r, or alpha / sqrt(r) with rslora)."""
        rank = self.ranks[module]
        return self.alphas[module] / (math.sqrt(rank) if self.use_rslora else rank)

    def to_dict(self):
        """Plain values (checkpoints load them with weights_only=True)."""
        return {"ranks": dict(self.ranks), "alphas": dict(self.alphas), "dropout": self.dropout,
                "use_dora": self.use_dora, "use_rslora": self.use_rslora}

    @classmethod
    def from_dict(cls, d):
        return cls(dict(d["ranks"]), dict(d["alphas"]), d["dropout"], d["use_dora"], d["use_rslora"])

    def peft_config(self, **extra):
        """A peft LoraConfig naming every module exactly: the most common rank and alpha as `r` and `lora_alpha`,
        the others in `rank_pattern` / `alpha_pattern` (peft matches a key against the end of a module name)."""
        from peft import LoraConfig
        rank = Counter(self.ranks.values()).most_common(1)[0][0]
        alpha = Counter(self.alphas.values()).most_common(1)[0][0]
        return LoraConfig(target_modules=list(self.modules), r=rank, lora_alpha=alpha,
                          rank_pattern={m: r for m, r in self.ranks.items() if r != rank},
                          alpha_pattern={m: a for m, a in self.alphas.items() if a != alpha},
                          lora_dropout=self.dropout, use_dora=self.use_dora, use_rslora=self.use_rslora, **extra)


# ---------------------------------------------------------------- adapters in the model

def lora_layers(model):
    """(name, layer) of every peft LoRA layer in the model."""
    from peft.tuners.lora import LoraLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def adapter_names(model):
    """Names of the adapters the model holds, in the order they were added."""
    names = {}
    for _, layer in lora_layers(model):
        names.update(dict.fromkeys(layer.lora_A.keys()))
    return list(names)


def add_adapter(model, spec, name="default", weights=None, source="<adapter>"):
    """Add adapter `name` with `spec` to `model` in place (peft LoRA layers on its modules, every base weight
    frozen) and return the model. `weights` (saved key format) replace peft's initialisation (A random, B zero);
    they must fit exactly (`load_adapter_weights`)."""
    from peft import inject_adapter_in_model
    if name in adapter_names(model):
        raise ValueError(f"the model already holds an adapter named {name!r}")
    modules = dict(model.named_modules())
    missing = [m for m in spec.modules if not isinstance(_base(modules.get(m)), (nn.Linear, nn.Conv2d))]
    if missing:
        raise ValueError(f"{source}: adapter modules {missing[:5]} are not Linear / Conv2d modules of the model")
    active = {n: layer.active_adapters for n, layer in lora_layers(model)}
    with warnings.catch_warnings():
        # peft warns whenever a model gets its second adapter; several adapters are what we want
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(spec.peft_config(), model, adapter_name=name)
    for layer_name, layer in lora_layers(model):  # peft makes the new adapter the only active one
        layer.set_adapter(list(dict.fromkeys([*active.get(layer_name, []), name])))
    if weights is not None:
        load_adapter_weights(model, weights, name, source)
    return model


def _base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def adapter_state_dict(state_dict, name="default"):
    """Adapter `name`'s tensors of a model state dict, in peft's saved key format."""
    out = {}
    for key, value in state_dict.items():
        match = _MODEL_KEY.match(key)
        if match and match["adapter"] == name:
            out[match["module"] + _SAVED_SUFFIX[match["part"]]] = value
    return out


def is_adapter_key(key):
    """Whether a model state-dict / parameter key belongs to an adapter (of any name)."""
    return _MODEL_KEY.match(key) is not None


def load_adapter_weights(model, weights, name="default", source="<adapter>"):
    """Copy adapter tensors (saved key format) into adapter `name` of the model: the same keys and shapes, or a
    CheckpointError naming each key that differs and both shapes."""
    targets = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        match = _MODEL_KEY.match(key)
        if match and match["adapter"] == name:
            targets[match["module"] + _SAVED_SUFFIX[match["part"]]] = tensor
    missing = sorted(set(targets) - set(weights))
    unexpected = sorted(set(weights) - set(targets))
    if missing or unexpected:
        lines = [f"{source} does not fit adapter {name!r} of the model:"]
        if missing:
            lines.append(f"  missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)})")
        if unexpected:
            lines.append(f"  unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} "
                         f"({len(unexpected)})")
        raise CheckpointError("\n".join(lines))
    wrong = [f"{k}: {source} has {tuple(weights[k].shape)}, the model's adapter {tuple(t.shape)}"
             for k, t in targets.items() if weights[k].shape != t.shape]
    if wrong:
        raise CheckpointError(f"{source}: adapter tensor shapes differ from the model's:\n  " + "\n  ".join(wrong))
    with torch.no_grad():
        for key, tensor in targets.items():
            tensor.copy_(weights[key])


def spec_of(model, name="default"):
    """The LoraSpec of adapter `name` as the model holds it."""
    ranks, alphas, dropout, dora, rslora = {}, {}, 0.0, False, False
    for module, layer in lora_layers(model):
        if name in layer.lora_A:
            ranks[module], alphas[module] = layer.r[name], float(layer.lora_alpha[name])
            drop = layer.lora_dropout[name]
            dropout = drop.p if isinstance(drop, nn.Dropout) else 0.0
            dora, rslora = bool(layer.use_dora.get(name, False)), bool(layer.use_rslora.get(name, False))
    if not ranks:
        raise ValueError(f"the model holds no adapter named {name!r} (it has {adapter_names(model)})")
    return LoraSpec(ranks, alphas, dropout, dora, rslora)


def use_adapters(model, scales):
    """Make exactly the adapters in `scales` (name -> scale; {} for none) act, each update times its scale, frozen
    (for sampling). Scale 1 is the adapter as trained."""
    known = adapter_names(model)
    unknown = [n for n in scales if n not in known]
    if unknown:
        raise ValueError(f"the model holds no adapter named {unknown[0]!r} (it has {known})")
    for _, layer in lora_layers(model):
        layer.set_adapter(list(scales), inference_mode=True)
        for adapter, scale in scales.items():
            layer.set_scale(adapter, float(scale))


def merge_adapters(model):
    """Fold the active adapters, at their scales, into the base weights and take every LoRA layer out: the plain
    model again, as fast as one without adapters (inactive adapters are dropped)."""
    for name, layer in lora_layers(model):
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if active:
            layer.merge(safe_merge=True, adapter_names=active)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):  # set by peft when the adapters were added
        del model.peft_config
    return model


def base_state_dict(model):
    """The base model's tensors under their plain names: the model's state dict as before adapters were added."""
    return {key.replace(".base_layer.", "."): value for key, value in model.state_dict().items()
            if not is_adapter_key(key)}


def fingerprint(state_dict):
    """SHA-256 over the names, dtypes, shapes and bytes of a state dict's tensors (the regenerated `pos_embed`
    left out): equal fingerprints mean bitwise equal weights."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        if key in REGENERATED_KEYS:
            continue
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
