"""LoRA adapters as peft folders in the module names of diffusers' `PixArtTransformer2DModel`, read and written
exactly; the released PixArt-LCM-LoRA is such a folder (SPEC section 1).

A folder is `adapter_config.json` (a peft LoraConfig) and `adapter_model.safetensors` (keys
`base_model.model.<diffusers module>.lora_A.weight`, `...lora_B.weight`, `...lora_magnitude_vector` for DoRA): a
diffusers user loads ours with `PeftModel.from_pretrained(transformer, folder)`. Module names map as the weights do
(`diffusers_interop.module_pairs`), except our packed projections: our one LoRA on `attn.qkv` is three on
`attn1.to_q`, `to_k`, `to_v`, our one on `cross_attn.kv_linear` two on `attn2.to_k`, `to_v`.

- ours -> diffusers: every part gets the packed LoRA's A (r x D), its own rows of B (and of DoRA's magnitude),
  the same rank and alpha: part i computes s B_i A x, exactly its rows of s B A x.
- diffusers -> ours: parts with identical A and one rank and alpha (ours, saved as above) give A and the stacked B
  back, bitwise. Parts trained separately give one LoRA of rank r_q + r_k + r_v: A the parts' A stacked, B
  block-diagonal with the parts' B (each times its scaling over the packed one's), zero rows for a part without
  an adapter; DoRA magnitudes stack, a part without an adapter keeping its rows' norms. The update is the same sum
  of products, exact up to float rounding; saved again, such an adapter has rank r_q + r_k + r_v per projection.
"""
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from diffusion.model.builder import is_multi_scale
from diffusion.model.lora import LoraSpec, adapter_state_dict, add_adapter, spec_of
from diffusion.utils.checkpoint import CheckpointError, read_checkpoint
from diffusion.utils.diffusers_interop import module_pairs, split_modules

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LEGACY_WEIGHTS = "adapter_model.bin"
_PEFT_PREFIX = "base_model.model."
_SAVED_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector(?:\.weight)?)$")
_PART = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "magnitude",
         "lora_magnitude_vector.weight": "magnitude"}
# LoraConfig fields that make an adapter compute more than a (DoRA-)scaled B @ A on Linear / Conv2d modules.
_UNSUPPORTED = ("modules_to_save", "lora_bias", "fan_in_fan_out", "use_qalora", "use_bdlora", "alora_invocation_tokens",
                "trainable_token_indices", "target_parameters", "layer_replication", "arrow_config", "kasa_config",
                "monteclora_config", "velora_config")


def diffusers_modules(depth, multi_scale):
    """Our module name -> the diffusers modules it is (several for a packed projection, in its output order)."""
    table = {ours: (theirs,) for ours, theirs in module_pairs(depth, multi_scale)}
    table.update(split_modules(depth))
    return table


# ---------------------------------------------------------------- ours <-> diffusers names

def adapter_to_diffusers(weights, spec):
    """(weights, spec) of an adapter on our model (saved key format) -> the same adapter in diffusers' names."""
    depth = 1 + max((int(m.split(".")[1]) for m in spec.modules if m.startswith("blocks.")), default=-1)
    table = diffusers_modules(depth, multi_scale=True)  # the MS names only ever occur in MS adapters
    out, ranks, alphas = {}, {}, {}
    for module in spec.modules:
        if module not in table:
            raise CheckpointError(f"adapter module {module!r} has no counterpart in diffusers' "
                                  "PixArtTransformer2DModel")
        parts = table[module]
        a, b = weights[f"{module}.lora_A.weight"], weights[f"{module}.lora_B.weight"]
        magnitude = weights.get(f"{module}.lora_magnitude_vector")
        rows = b.chunk(len(parts))
        magnitudes = magnitude.chunk(len(parts)) if magnitude is not None else [None] * len(parts)
        for part, b_rows, m_rows in zip(parts, rows, magnitudes):
            out[f"{part}.lora_A.weight"] = a.clone()
            out[f"{part}.lora_B.weight"] = b_rows.clone()
            if m_rows is not None:
                out[f"{part}.lora_magnitude_vector"] = m_rows.clone()
            ranks[part], alphas[part] = spec.ranks[module], spec.alphas[module]
    return out, LoraSpec(ranks, alphas, spec.dropout, spec.use_dora, spec.use_rslora)


def adapter_from_diffusers(weights, spec, model, source="<adapter>"):
    """An adapter in diffusers' names -> (weights, spec) on our `model`, every tensor checked against the shapes of
    the model's modules (an adapter of another model fails here, naming the key and both shapes)."""
    depth, multi_scale = model.depth, is_multi_scale(model)
    table = diffusers_modules(depth, multi_scale)
    part_of = {part: (ours, i) for ours, parts in table.items() for i, part in enumerate(parts)}
    groups = {}
    for part in spec.modules:
        if part not in part_of:
            raise CheckpointError(
                f"{source}: {_PEFT_PREFIX}{part}.lora_A.weight adapts {part!r}, which a PixArtTransformer2DModel of "
                f"this model ({depth} blocks{', multi-scale' if multi_scale else ''}) does not have")
        ours, index = part_of[part]
        groups.setdefault(ours, {})[index] = part
    modules = dict(model.named_modules())
    out, ranks, alphas = {}, {}, {}
    for ours, parts in table.items():
        if ours not in groups:
            continue
        base = _base(modules[ours])
        found = {i: _checked_part(weights, spec, part, base, i, len(parts), source) for i, part in groups[ours].items()}
        tensors, ranks[ours], alphas[ours] = _pack(found, len(parts), base, spec.use_rslora)
        out.update({f"{ours}.{suffix}": t for suffix, t in tensors.items()})
    return out, LoraSpec(ranks, alphas, spec.dropout, spec.use_dora, spec.use_rslora)


def _base(module):
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def _checked_part(weights, spec, part, base, index, count, source):
    """A part's tensors, rank, alpha and scaling, once its shapes fit the base module's slice of outputs."""
    rank = spec.ranks[part]
    if isinstance(base, nn.Conv2d):
        out_features = base.out_channels
        expected = {"lora_A.weight": (rank, base.in_channels // base.groups, *base.kernel_size),
                    "lora_B.weight": (out_features, rank, 1, 1), "lora_magnitude_vector": (1, out_features, 1, 1)}
        width = f"{base.in_channels} input channels, {out_features} outputs"
    else:
        out_features = base.out_features // count
        expected = {"lora_A.weight": (rank, base.in_features), "lora_B.weight": (out_features, rank),
                    "lora_magnitude_vector": (out_features,)}
        width = f"{base.in_features} inputs, {out_features} outputs" + (f" (part {index + 1} of {count})" if count > 1
                                                                        else "")
    tensors = {}
    for suffix, shape in expected.items():
        key = f"{part}.{suffix}"
        if suffix == "lora_magnitude_vector" and not spec.use_dora:
            continue
        got = tuple(weights[key].shape)
        if got != shape:
            raise CheckpointError(
                f"{source}: {_PEFT_PREFIX}{key} has shape {got}; this model needs {shape} there (rank {rank} from "
                f"{ADAPTER_CONFIG}, {width} of {part})")
        tensors[suffix] = weights[key]
    return dict(tensors=tensors, rank=rank, alpha=spec.alphas[part], scaling=spec.scaling(part))


def _pack(found, count, base, rslora):
    """One LoRA on a packed projection from the LoRAs of its parts (module docstring): (tensors, rank, alpha)."""
    first = found[min(found)]
    if count == 1:
        return first["tensors"], first["rank"], first["alpha"]
    rows = base.out_features // count
    dora = "lora_magnitude_vector" in first["tensors"]
    shared = all(p["rank"] == first["rank"] and p["alpha"] == first["alpha"] and
                 torch.equal(p["tensors"]["lora_A.weight"], first["tensors"]["lora_A.weight"]) for p in found.values())
    b_first = first["tensors"]["lora_B.weight"]
    if shared:
        rank, alpha, a = first["rank"], first["alpha"], first["tensors"]["lora_A.weight"]
        b = torch.cat([found[i]["tensors"]["lora_B.weight"] if i in found else b_first.new_zeros(rows, rank)
                       for i in range(count)])
    else:
        rank = sum(p["rank"] for p in found.values())
        growth = rank / first["rank"]
        alpha = first["alpha"] * (math.sqrt(growth) if rslora else growth)  # keeps the first part's scaling
        scaling = alpha / (math.sqrt(rank) if rslora else rank)
        a = torch.cat([found[i]["tensors"]["lora_A.weight"] for i in sorted(found)])
        b = b_first.new_zeros(rows * count, rank)
        column = 0
        for i in sorted(found):
            part = found[i]
            block = part["tensors"]["lora_B.weight"]
            ratio = part["scaling"] / scaling
            b[i * rows:(i + 1) * rows, column:column + part["rank"]] = \
                block if math.isclose(ratio, 1.0, rel_tol=1e-12) else block * ratio
            column += part["rank"]
    tensors = {"lora_A.weight": a, "lora_B.weight": b}
    if dora:
        with torch.no_grad():
            tensors["lora_magnitude_vector"] = torch.cat([
                found[i]["tensors"]["lora_magnitude_vector"] if i in found else
                torch.linalg.norm(base.weight[i * rows:(i + 1) * rows], dim=1).to(b.dtype) for i in range(count)])
    return tensors, rank, alpha


# ---------------------------------------------------------------- folders

def read_peft_folder(folder):
    """(weights, spec) of a peft LoRA folder as saved, in the module names of the model it was made for; keys in
    our saved format (`<module>.lora_A.weight`, `...lora_B.weight`, `...lora_magnitude_vector`)."""
    from peft.utils.other import get_pattern_key
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} is not a peft adapter folder: it has no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_path} is not valid JSON: {err}") from err
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') "
                              "are supported")
    for key in _UNSUPPORTED:
        if config.get(key):
            raise CheckpointError(f"{config_path}: {key}={config[key]!r} is not supported (adapters here add a "
                                  "scaled B @ A, or DoRA's, to Linear and Conv2d modules)")
    weights_path = folder / ADAPTER_WEIGHTS
    if not weights_path.is_file() and (folder / _LEGACY_WEIGHTS).is_file():
        weights_path = folder / _LEGACY_WEIGHTS
    raw = read_checkpoint(weights_path)
    weights, modules = {}, {}
    for key, tensor in raw.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        match = _SAVED_KEY.match(name)
        if match is None:
            raise CheckpointError(f"{weights_path}: {key!r} is not a LoRA tensor (<module>.lora_A.weight, "
                                  "<module>.lora_B.weight or <module>.lora_magnitude_vector)")
        part = _PART[match["part"]]
        modules.setdefault(match["module"], set()).add(part)
        suffix = "lora_magnitude_vector" if part == "magnitude" else match["part"]
        weights[f"{match['module']}.{suffix}"] = tensor
    dora = bool(config.get("use_dora"))
    needed = {"lora_A", "lora_B", "magnitude"} if dora else {"lora_A", "lora_B"}
    for module, parts in modules.items():
        if parts != needed:
            raise CheckpointError(f"{weights_path}: module {module!r} has {sorted(parts)}; a "
                                  f"{'DoRA' if dora else 'LoRA'} adapter needs {sorted(needed)}")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    ranks, alphas = {}, {}
    for module in modules:
        rank_key, alpha_key = get_pattern_key(rank_pattern, module), get_pattern_key(alpha_pattern, module)
        ranks[module] = int(rank_pattern.get(rank_key, config["r"]))
        alphas[module] = float(alpha_pattern.get(alpha_key, config["lora_alpha"]))
        got = tuple(weights[f"{module}.lora_A.weight"].shape)
        if got[0] != ranks[module]:
            raise CheckpointError(f"{weights_path}: {_PEFT_PREFIX}{module}.lora_A.weight has shape {got}; "
                                  f"{ADAPTER_CONFIG} gives {module} rank {ranks[module]}, i.e. "
                                  f"{(ranks[module], *got[1:])}")
    spec = LoraSpec(ranks, alphas, float(config.get("lora_dropout") or 0.0), dora, bool(config.get("use_rslora")))
    return weights, spec


def write_peft_folder(folder, weights, spec, overwrite=False):
    """Write an adapter (in the names of the model it is for) as a peft folder; a temporary folder renamed into place,
    so a failure leaves no half-written adapter."""
    from safetensors.torch import save
    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        spec.peft_config(inference_mode=True).save_pretrained(str(tmp))
        data = save({_PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in weights.items()},
                    metadata={"format": "pt"})
        (tmp / ADAPTER_WEIGHTS).write_bytes(data)
        tmp.chmod(0o755)  # mkdtemp makes it private; adapters are meant to be shared
        if folder.exists():
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def save_adapter(model, folder, name="default", overwrite=False):
    """Write adapter `name` of our model as a peft folder in diffusers' module names."""
    weights = {k: v.detach() for k, v in adapter_state_dict(model.state_dict(), name).items()}
    return write_peft_folder(folder, *adapter_to_diffusers(weights, spec_of(model, name)), overwrite=overwrite)


def load_adapter(model, folder, name="default"):
    """Add a peft folder's adapter to our model as adapter `name` and return its LoraSpec (our names). The folder's
    names are diffusers' (any PixArtTransformer2DModel adapter: ours, LCM-LoRA, ...) or, for a folder saved from our
    model by peft itself, ours."""
    weights, spec = read_peft_folder(folder)
    ours = dict(model.named_modules())
    if not all(m in ours for m in spec.modules):
        weights, spec = adapter_from_diffusers(weights, spec, model, source=str(folder))
    add_adapter(model, spec, name, weights, source=str(folder))
    return spec
