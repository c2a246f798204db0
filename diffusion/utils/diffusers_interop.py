"""Convert between PixArt checkpoints and diffusers `PixArtTransformer2DModel` (key mapping: SPEC section 10).

diffusers has no `y_embedding` (it guides with T5("") instead) and no persistent `pos_embed`; when we write a
diffusers folder we keep the null caption beside the weights in `NULL_CAPTION_FILE`, so that converting
back gives the identical state dict. A diffusers folder (config.json + diffusion_pytorch_model*.safetensors,
sharded or not) is read without diffusers' loader, checked file by file, so a folder with missing weights or a
config of another model is a named error, never a silently random model.
"""
import json
from pathlib import Path

import torch

from diffusion.model.builder import is_multi_scale
from diffusion.model.nets import PixArt, PixArtMS
from diffusion.model.nets.PixArt_blocks import get_2d_sincos_pos_embed
from diffusion.release import T5_TOKENS, VAE_DOWNSAMPLE, released_lewei_scale
from diffusion.utils.checkpoint import CheckpointError, atomic_save, read_checkpoint

NULL_CAPTION_FILE = "pixart_null_caption.safetensors"
NULL_CAPTION_KEY = "y_embedder.y_embedding"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"  # sharded: weight_map key -> shard file
WEIGHTS_BIN_FILE = "diffusion_pytorch_model.bin"
PIPELINE_INDEX_FILE = "model_index.json"  # a diffusers pipeline folder (PixArtAlphaPipeline): one subfolder a part
# Transformer2DModel: what diffusers < 0.28 called the PixArt transformer (the released diffusers repos say so)
CLASS_NAMES = ("PixArtTransformer2DModel", "Transformer2DModel")
_REQUIRED_CONFIG_KEYS = ("sample_size", "num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                         "patch_size", "caption_channels")
_DIFFUSERS_PREFIXES = ("transformer_blocks.", "adaln_single.", "caption_projection.")
LCM_SCHEDULER = "LCMScheduler"  # the scheduler of a distilled pipeline folder (PixArt-LCM-XL-2-1024-MS)

_GLOBAL_MODULES = [  # ours -> diffusers, module prefixes (their .weight and .bias follow)
    ("x_embedder.proj", "pos_embed.proj"),
    ("y_embedder.y_proj.fc1", "caption_projection.linear_1"),
    ("y_embedder.y_proj.fc2", "caption_projection.linear_2"),
    ("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2"),
    ("t_block.1", "adaln_single.linear"),
    ("final_layer.linear", "proj_out"),
]
_MS_MODULES = [
    ("csize_embedder.mlp.0", "adaln_single.emb.resolution_embedder.linear_1"),
    ("csize_embedder.mlp.2", "adaln_single.emb.resolution_embedder.linear_2"),
    ("ar_embedder.mlp.0", "adaln_single.emb.aspect_ratio_embedder.linear_1"),
    ("ar_embedder.mlp.2", "adaln_single.emb.aspect_ratio_embedder.linear_2"),
]
_BLOCK_MODULES = [  # within blocks.i -> transformer_blocks.i
    ("attn.proj", "attn1.to_out.0"),
    ("cross_attn.q_linear", "attn2.to_q"),
    ("cross_attn.proj", "attn2.to_out.0"),
    ("mlp.fc1", "ff.net.0.proj"),
    ("mlp.fc2", "ff.net.2"),
]
# Packed projections split into equal chunks along the output dimension, in this order.
_BLOCK_SPLITS = [
    ("attn.qkv", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    ("cross_attn.kv_linear", ("attn2.to_k", "attn2.to_v")),
]


def _block_count(keys, prefix):
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    if ids != set(range(len(ids))):
        raise CheckpointError(f"block indices under {prefix!r} are not 0..N-1: {sorted(ids)}")
    return len(ids)


def module_pairs(depth, multi_scale):
    """(ours, diffusers) names of every module whose weight and bias map 1:1 (LoRA adapters map the same way)."""
    modules = _GLOBAL_MODULES + (_MS_MODULES if multi_scale else [])
    return modules + [(f"blocks.{i}.{a}", f"transformer_blocks.{i}.{b}") for i in range(depth) for a, b in _BLOCK_MODULES]


def split_modules(depth):
    """(ours, diffusers parts) of every packed projection: our output rows are the parts' outputs in this order."""
    return [(f"blocks.{i}.{a}", tuple(f"transformer_blocks.{i}.{b}" for b in parts))
            for i in range(depth) for a, parts in _BLOCK_SPLITS]


def _module_pairs(depth, multi_scale):
    """(ours, diffusers) parameter names for every 1:1 tensor."""
    pairs = [(f"{a}.{p}", f"{b}.{p}") for a, b in module_pairs(depth, multi_scale) for p in ("weight", "bias")]
    pairs += [(f"blocks.{i}.scale_shift_table", f"transformer_blocks.{i}.scale_shift_table") for i in range(depth)]
    pairs.append(("final_layer.scale_shift_table", "scale_shift_table"))
    return pairs


def _split_pairs(depth):
    return [(f"{a}.{p}", [f"{b}.{p}" for b in parts]) for a, parts in split_modules(depth) for p in ("weight", "bias")]


def _take(source, key, what):
    if key not in source:
        raise CheckpointError(f"{what} lacks the key {key!r}")
    return source.pop(key)


def pixart_to_diffusers(state_dict):
    """PixArt state dict -> (diffusers state dict, extras {'y_embedding': tensor or absent})."""
    src = dict(state_dict)
    extras = {}
    if NULL_CAPTION_KEY in src:
        extras["y_embedding"] = src.pop(NULL_CAPTION_KEY)
    src.pop("pos_embed", None)
    depth = _block_count(src, "blocks.")
    out = {}
    for ours, theirs in _module_pairs(depth, is_multi_scale(src)):
        out[theirs] = _take(src, ours, "PixArt state dict")
    for ours, parts in _split_pairs(depth):
        for name, chunk in zip(parts, _take(src, ours, "PixArt state dict").chunk(len(parts), dim=0)):
            out[name] = chunk.clone()
    if src:
        raise CheckpointError(f"PixArt state dict has keys with no diffusers counterpart: {sorted(src)}")
    return out, extras


def is_diffusers_state_dict(state_dict):
    """True when the keys are diffusers PixArtTransformer2DModel names rather than PixArt's."""
    return any(k.startswith(_DIFFUSERS_PREFIXES) for k in state_dict) and not any(k.startswith("blocks.")
                                                                                   for k in state_dict)


def diffusers_to_pixart(state_dict, y_embedding=None, input_size=None, lewei_scale=None, patch_size=None):
    """diffusers state dict -> PixArt state dict (released layout). `pos_embed` is added when `input_size` and
    `lewei_scale` are given and `y_embedding` when it is (a model regenerates the first and initialises the
    second when they are absent)."""
    src = dict(state_dict)
    depth = _block_count(src, "transformer_blocks.")
    multi_scale = any(k.startswith(f"{theirs}.") for _, theirs in _MS_MODULES for k in src)  # diffusers' names
    out = {}
    for ours, theirs in _module_pairs(depth, multi_scale):
        out[ours] = _take(src, theirs, "diffusers state dict")
    for ours, parts in _split_pairs(depth):
        out[ours] = torch.cat([_take(src, name, "diffusers state dict") for name in parts], dim=0)
    if src:
        raise CheckpointError(f"diffusers state dict has keys with no PixArt counterpart: {sorted(src)}")
    if input_size is not None:
        hidden = out["x_embedder.proj.weight"].shape[0]
        patch = patch_size or out["x_embedder.proj.weight"].shape[-1]
        base = input_size // patch
        out["pos_embed"] = get_2d_sincos_pos_embed(hidden, base, lewei_scale, base).float().unsqueeze(0)
    if y_embedding is not None:
        out[NULL_CAPTION_KEY] = y_embedding
    return out


def architecture_of(model):
    """The constructor arguments that define a PixArt/PixArtMS model's tensors and behaviour."""
    return dict(
        multi_scale=is_multi_scale(model),
        input_size=model.input_size, patch_size=model.patch_size, in_channels=model.in_channels,
        hidden_size=model.hidden_size, depth=model.depth, num_heads=model.num_heads,
        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.hidden_size if model.depth else 4.0,
        pred_sigma=model.pred_sigma, caption_channels=model.caption_channels,
        model_max_length=model.model_max_length, lewei_scale=model.lewei_scale,
    )


def diffusers_config(arch):
    """`PixArtTransformer2DModel` config for an architecture from `architecture_of`."""
    if arch["mlp_ratio"] != 4.0:
        raise ValueError(f"diffusers' PixArt feed-forward is 4x wide; mlp_ratio {arch['mlp_ratio']} cannot convert")
    return dict(
        sample_size=arch["input_size"], num_layers=arch["depth"], num_attention_heads=arch["num_heads"],
        attention_head_dim=arch["hidden_size"] // arch["num_heads"], in_channels=arch["in_channels"],
        out_channels=arch["in_channels"] * (2 if arch["pred_sigma"] else 1), patch_size=arch["patch_size"],
        attention_bias=True, cross_attention_dim=arch["hidden_size"], activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=arch["caption_channels"], interpolation_scale=arch["lewei_scale"],
        use_additional_conditions=arch["multi_scale"],
    )


def architecture_from_diffusers_config(config, model_max_length=T5_TOKENS):
    """Inverse of `diffusers_config`; refuses configs that are not PixArt-alpha transformers."""
    expected = dict(norm_type="ada_norm_single", activation_fn="gelu-approximate", norm_elementwise_affine=False,
                    attention_bias=True)
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ValueError(f"diffusers config {key}={config.get(key)!r} is not PixArt-alpha's {value!r}")
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    if config.get("cross_attention_dim", hidden) != hidden:
        raise ValueError(f"cross_attention_dim {config['cross_attention_dim']} must equal the width {hidden}")
    sample_size = config["sample_size"]
    in_channels = config["in_channels"]
    out_channels = config.get("out_channels") or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"out_channels {out_channels} must be in_channels {in_channels} or twice it")
    multi_scale = config.get("use_additional_conditions")
    if multi_scale is None:  # diffusers' own default: the 1024 px model (sample size 128) is the multi-scale one
        multi_scale = sample_size == 128
    scale = config.get("interpolation_scale")
    return dict(
        multi_scale=bool(multi_scale), input_size=sample_size, patch_size=config["patch_size"],
        in_channels=in_channels, hidden_size=hidden, depth=config["num_layers"],
        num_heads=config["num_attention_heads"], mlp_ratio=4.0, pred_sigma=out_channels == 2 * in_channels,
        caption_channels=config["caption_channels"], model_max_length=model_max_length,
        lewei_scale=float(scale if scale is not None else released_lewei_scale(sample_size * VAE_DOWNSAMPLE)),
    )


def build_pixart(arch, **kwargs):
    """A PixArt/PixArtMS for an architecture dict (extra kwargs such as fp32_attention pass through)."""
    arch = dict(arch)
    cls = PixArtMS if arch.pop("multi_scale") else PixArt
    return cls(learn_sigma=arch["pred_sigma"], **arch, **kwargs)


def build_diffusers_model(arch, state_dict):
    """A diffusers PixArtTransformer2DModel holding `state_dict` (strictly loaded, no random init)."""
    from diffusers import PixArtTransformer2DModel
    with torch.device("meta"):
        model = PixArtTransformer2DModel.from_config(diffusers_config(arch))
    model.load_state_dict(state_dict, strict=True, assign=True)
    # The non-persistent sin-cos buffer was created on the meta device; rebuild it on the CPU.
    embed = model.pos_embed
    grid = embed.height
    pos = get_2d_sincos_pos_embed(arch["hidden_size"], grid, embed.interpolation_scale, embed.base_size)
    embed.register_buffer("pos_embed", pos.float().unsqueeze(0), persistent=False)
    return model


def save_diffusers_transformer(state_dict, arch, out_dir, dtype=None):
    """Write a PixArt state dict as a diffusers `PixArtTransformer2DModel` folder (+ the null caption)."""
    d_sd, extras = pixart_to_diffusers(state_dict)
    if dtype is not None:
        d_sd = {k: v.to(dtype) for k, v in d_sd.items()}
    model = build_diffusers_model(arch, d_sd)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if "y_embedding" in extras:
        atomic_save({"y_embedding": extras["y_embedding"].to(dtype or extras["y_embedding"].dtype)},
                    out_dir / NULL_CAPTION_FILE)
    return out_dir


def pipeline_part(path, part):
    """`path/part` when `path` is a diffusers pipeline folder (it has model_index.json) holding that part
    ('transformer', 'text_encoder', 'tokenizer', 'vae', 'scheduler'), else None."""
    if path is None:
        return None
    path = Path(path)
    if (path / PIPELINE_INDEX_FILE).is_file() and (path / part).is_dir() and any((path / part).iterdir()):
        return path / part
    return None


def find_transformer_folder(path):
    """A transformer folder, or a pipeline folder's `transformer/` subfolder."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "transformer" / CONFIG_FILE).is_file():
        return path / "transformer"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such diffusers folder")
    raise CheckpointError(f"{path} is a folder without {CONFIG_FILE} or transformer/{CONFIG_FILE}: expected a "
                          "diffusers PixArtTransformer2DModel folder (config.json + diffusion_pytorch_model"
                          ".safetensors) or a pipeline folder holding one in transformer/")


def read_diffusers_config(folder):
    """The checked config.json of a diffusers PixArt transformer folder, as a dict."""
    path = Path(folder) / CONFIG_FILE
    expected = "expected the config of a diffusers PixArtTransformer2DModel"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}): "
                              f"{expected}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}): {expected}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not an object: {expected}")
    name = config.get("_class_name")
    if name is None and "model_type" in config:
        raise CheckpointError(f"{path} is the config of a transformers {config['model_type']!r} model: {expected}")
    if name is not None and name not in CLASS_NAMES:
        raise CheckpointError(f"{path} describes a diffusers {name}: {expected}")
    missing = [key for key in _REQUIRED_CONFIG_KEYS if key not in config]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: {expected}")
    try:
        architecture_from_diffusers_config(config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    return config


def _weight_files(folder):
    """The weight files of a diffusers folder: one file, or the shards its index lists."""
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{index} is not a diffusers shard index ({type(err).__name__}: {err}): expected "
                                  "JSON with a 'weight_map' of tensor name -> shard file") from None
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards {missing} listed in {WEIGHTS_INDEX_FILE} are missing")
        return [folder / name for name in shards], set(weight_map)
    for name in (WEIGHTS_FILE, WEIGHTS_BIN_FILE):
        if (folder / name).is_file():
            return [folder / name], None
    variants = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.safetensors"))
    if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return [folder / variants[0]], None
    found = f"; it holds {variants}: keep one" if variants else ""
    raise CheckpointError(f"{folder} has {CONFIG_FILE} but no weights: expected {WEIGHTS_FILE} (or "
                          f"{WEIGHTS_INDEX_FILE} with its shards){found}")


def read_diffusers_weights(folder):
    """The diffusers state dict of a transformer folder (all shards), read without executing code."""
    folder = Path(folder)
    files, listed = _weight_files(folder)
    state_dict = {}
    for path in files:
        state_dict.update(read_checkpoint(path))
    if listed is not None and listed - set(state_dict):
        raise CheckpointError(f"{folder}: tensors listed in {WEIGHTS_INDEX_FILE} are in no shard: "
                              f"{sorted(listed - set(state_dict))[:10]}")
    return state_dict


def null_caption_beside(path):
    """The null caption of the NULL_CAPTION_FILE in folder `path` (or beside file `path`), or None."""
    path = Path(path)
    candidate = (path if path.is_dir() else path.parent) / NULL_CAPTION_FILE
    return read_null_caption(candidate) if candidate.is_file() else None


def read_null_caption(path):
    """The null caption from NULL_CAPTION_FILE, or any checkpoint holding `y_embedder.y_embedding`."""
    from diffusion.utils.checkpoint import state_dict_of
    path = Path(path)
    if path.is_dir():
        path = path / NULL_CAPTION_FILE
    obj = read_checkpoint(path)
    if "y_embedding" in obj and isinstance(obj["y_embedding"], torch.Tensor):
        return obj["y_embedding"]
    state_dict = state_dict_of(obj, path)
    if NULL_CAPTION_KEY not in state_dict:
        raise CheckpointError(f"{path} holds no null caption ('y_embedding' or '{NULL_CAPTION_KEY}')")
    return state_dict[NULL_CAPTION_KEY]


def pixart_state_dict_of_diffusers(state_dict, source):
    """A diffusers-named state dict read from `source` (a file or folder) in PixArt's names, with the null
    caption kept beside it when there is one (else without: a non-strict load initialises it). No `pos_embed`:
    models regenerate it."""
    try:
        return diffusers_to_pixart(state_dict, y_embedding=null_caption_beside(source))
    except CheckpointError as err:
        shard = " (one shard of a sharded checkpoint? give its folder)" if (
            "lacks the key" in str(err) and Path(source).is_file()) else ""
        raise CheckpointError(f"{source}: {err}{shard}") from None


def read_diffusers_as_pixart(path):
    """The PixArt state dict of a diffusers transformer (or pipeline) folder; see `pixart_state_dict_of_diffusers`."""
    folder = find_transformer_folder(path)
    read_diffusers_config(folder)
    return pixart_state_dict_of_diffusers(read_diffusers_weights(folder), folder)


def is_lcm_pipeline(path):
    """Whether `path` is a diffusers pipeline folder (or its transformer/ folder) whose scheduler is an
    LCMScheduler, as the released PixArt-LCM-XL-2-1024-MS: a distilled model, sampled without guidance."""
    path = Path(path)
    for pipeline in (path, path.parent) if path.name == "transformer" else (path,):
        try:
            index = json.loads((pipeline / "model_index.json").read_text(encoding="utf-8"))
            if list(index.get("scheduler") or [])[-1:] == [LCM_SCHEDULER]:
                return True
        except (OSError, ValueError, AttributeError, TypeError):
            pass
        try:
            scheduler = json.loads((pipeline / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            if scheduler.get("_class_name") == LCM_SCHEDULER:
                return True
        except (OSError, ValueError, AttributeError):
            pass
    return False


def read_folder_null_caption(folder, null_caption=None, zero_for_lcm=None):
    """`null_caption` (a tensor, or a file for `read_null_caption`), else the folder's NULL_CAPTION_FILE; raises
    when there is neither, since diffusers checkpoints carry none. `zero_for_lcm`: the diffusers config of a folder
    `is_lcm_pipeline` accepts; it then gets a zero null caption of the released length instead of the error (a
    distilled model samples without guidance; guided sampling refuses a zero null caption)."""
    if null_caption is None:
        if not (Path(folder) / NULL_CAPTION_FILE).is_file() and zero_for_lcm is not None:
            return torch.zeros(T5_TOKENS, zero_for_lcm["caption_channels"])
        if not (Path(folder) / NULL_CAPTION_FILE).is_file():
            raise CheckpointError(
                f"{folder} has no {NULL_CAPTION_FILE}: diffusers checkpoints carry no null caption "
                "(y_embedding). Give one from a PixArt checkpoint, or start a fresh random one explicitly.")
        null_caption = folder
    return null_caption if isinstance(null_caption, torch.Tensor) else read_null_caption(null_caption)


def load_diffusers_transformer(path, null_caption=None, lcm_without_null_caption=False):
    """Read a diffusers PixArt transformer folder -> (architecture, PixArt state dict).

    The null caption comes from `null_caption` (a tensor or a file for `read_null_caption`) or else from the
    folder's NULL_CAPTION_FILE; without either this raises, since it cannot be recovered from diffusers, unless
    `lcm_without_null_caption` and the folder is a distilled LCM pipeline (`is_lcm_pipeline`): a zero null caption.
    """
    folder = find_transformer_folder(path)
    config = read_diffusers_config(folder)
    lcm = config if lcm_without_null_caption and is_lcm_pipeline(path) else None
    null_caption = read_folder_null_caption(folder, null_caption, zero_for_lcm=lcm)
    arch = architecture_from_diffusers_config(config, model_max_length=null_caption.shape[0])
    if null_caption.shape[1] != arch["caption_channels"]:
        raise CheckpointError(f"null caption has {null_caption.shape[1]} channels, the model "
                              f"{arch['caption_channels']}")
    d_sd = read_diffusers_weights(folder)
    key = "transformer_blocks.0.ff.net.0.proj.weight"
    if arch["depth"] and key in d_sd:
        arch["mlp_ratio"] = d_sd[key].shape[0] / arch["hidden_size"]
    try:
        state_dict = diffusers_to_pixart(d_sd, null_caption, arch["input_size"], arch["lewei_scale"],
                                         arch["patch_size"])
    except CheckpointError as err:
        raise CheckpointError(f"{folder}: {err}") from None
    return arch, state_dict


def describe_diffusers_transformer(path, lcm_without_null_caption=False):
    """A meta-device PixArt/PixArtMS of a diffusers folder's architecture (no weights read; the null caption
    file gives the caption length; see `load_diffusers_transformer` for `lcm_without_null_caption`)."""
    folder = find_transformer_folder(path)
    config = read_diffusers_config(folder)
    _weight_files(folder)  # a folder without its weights fails here, before anything loads
    lcm = config if lcm_without_null_caption and is_lcm_pipeline(path) else None
    null_caption = read_folder_null_caption(folder, zero_for_lcm=lcm)
    with torch.device("meta"):
        return build_pixart(architecture_from_diffusers_config(config, model_max_length=null_caption.shape[0]))
