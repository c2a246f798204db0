"""Convert between PixArt checkpoints and diffusers `PixArtTransformer2DModel` (key mapping: SPEC section 10).

diffusers has no `y_embedding` (it guides with T5("") instead) and no persistent `pos_embed`; when we write a
diffusers folder we keep the null caption beside the weights in `NULL_CAPTION_FILE`, so that converting
back gives the identical state dict.
"""
import json
from pathlib import Path

import torch

from diffusion.model.builder import is_multi_scale
from diffusion.model.nets import PixArt, PixArtMS
from diffusion.model.nets.PixArt_blocks import get_2d_sincos_pos_embed
from diffusion.release import T5_TOKENS, VAE_DOWNSAMPLE, released_lewei_scale
from diffusion.utils.checkpoint import CheckpointError, atomic_save

NULL_CAPTION_FILE = "pixart_null_caption.safetensors"
NULL_CAPTION_KEY = "y_embedder.y_embedding"

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


def diffusers_to_pixart(state_dict, y_embedding, input_size, lewei_scale, patch_size=None):
    """diffusers state dict -> PixArt state dict (released layout, with `pos_embed` and `y_embedding`)."""
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
    hidden = out["x_embedder.proj.weight"].shape[0]
    patch = patch_size or out["x_embedder.proj.weight"].shape[-1]
    base = input_size // patch
    out["pos_embed"] = get_2d_sincos_pos_embed(hidden, base, lewei_scale, base).float().unsqueeze(0)
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


def find_transformer_folder(path):
    """A transformer folder, or a pipeline folder's `transformer/` subfolder."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "transformer" / "config.json").is_file():
        return path / "transformer"
    raise FileNotFoundError(f"{path} is not a diffusers transformer folder (no config.json, no transformer/)")


def read_null_caption(path):
    """The null caption from NULL_CAPTION_FILE, or any checkpoint holding `y_embedder.y_embedding`."""
    from diffusion.utils.checkpoint import read_checkpoint, state_dict_of
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


def load_diffusers_transformer(path, null_caption=None):
    """Read a diffusers PixArt transformer folder -> (architecture, PixArt state dict).

    The null caption comes from `null_caption` (a tensor or a file for `read_null_caption`) or else from the
    folder's NULL_CAPTION_FILE; without either this raises, since it cannot be recovered from diffusers.
    """
    from diffusers import PixArtTransformer2DModel
    folder = find_transformer_folder(path)
    config = json.loads((folder / "config.json").read_text())
    if null_caption is None:
        if not (folder / NULL_CAPTION_FILE).is_file():
            raise CheckpointError(
                f"{folder} has no {NULL_CAPTION_FILE}: diffusers checkpoints carry no null caption "
                "(y_embedding). Give one from a PixArt checkpoint, or start a fresh random one explicitly.")
        null_caption = folder
    if not isinstance(null_caption, torch.Tensor):
        null_caption = read_null_caption(null_caption)
    arch = architecture_from_diffusers_config(config, model_max_length=null_caption.shape[0])
    if null_caption.shape[1] != arch["caption_channels"]:
        raise CheckpointError(f"null caption has {null_caption.shape[1]} channels, the model "
                              f"{arch['caption_channels']}")
    d_model = PixArtTransformer2DModel.from_pretrained(folder)
    d_sd = d_model.state_dict()
    arch["mlp_ratio"] = d_sd["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / arch["hidden_size"] \
        if arch["depth"] else 4.0
    state_dict = diffusers_to_pixart(d_sd, null_caption, arch["input_size"], arch["lewei_scale"], arch["patch_size"])
    return arch, state_dict
