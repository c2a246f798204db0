"""ControlNet-Transformer (PIXART-delta): released layout, the control math, loading and controlled sampling."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.model.builder import build_controlnet, is_multi_scale
from diffusion.model.nets import ControlPixArtHalf, ControlPixArtMSHalf, PixArt, PixArtMS
from diffusion.model.nets.PixArt_blocks import get_2d_sincos_pos_embed
from diffusion.model.nets.pixart_controlnet import ControlNetError
from diffusion.pipeline import Pipeline
from diffusion.utils.checkpoint import CheckpointError
from tests.conftest import SHARED_REF, TINY, randomize, tiny_inputs

CONTROL_MANIFESTS = sorted(SHARED_REF.glob("manifest_Control*.json"))
BASES = {"PixArt": PixArt, "PixArtMS": PixArtMS}
WRAPPERS = {"ControlPixArtHalf": ControlPixArtHalf, "ControlPixArtMSHalf": ControlPixArtMSHalf}
DEPTH, COPIES = 4, 2


def tiny_base(cls=PixArt, seed=0):
    torch.manual_seed(seed)
    return randomize(cls(**{**TINY, "depth": DEPTH}), seed=seed).eval()


def tiny_controlnet(cls=PixArt, seed=0, random_projections=True):
    """A ControlNet over a random tiny base; with `random_projections` every control weight is random too."""
    model = build_controlnet(tiny_base(cls, seed), copy_blocks_num=COPIES).eval()
    if random_projections:
        randomize(model.controlnet, seed=seed + 100)
    return model


def control_latent(batch, height=8, width=8, seed=5):
    return torch.randn(batch, 4, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- the released layout
def test_both_released_controlnet_manifests_are_present():
    assert [p.stem for p in CONTROL_MANIFESTS] == ["manifest_ControlPixArtHalf_XL_2_512",
                                                   "manifest_ControlPixArtMSHalf_XL_2_1024"]


def meta_controlnet(manifest):
    with torch.device("meta"):  # no XL weights are allocated
        base = BASES[manifest["base_class"]](**manifest["base_constructor_kwargs"])
        return WRAPPERS[manifest["wrapper_class"]](base, **manifest["control_constructor_kwargs"])


@pytest.mark.parametrize("path", CONTROL_MANIFESTS, ids=lambda p: p.stem)
def test_controlnet_has_exactly_the_released_keys_shapes_kinds_and_counts(path):
    manifest = json.loads(path.read_text())
    model = meta_controlnet(manifest)
    params, buffers, state = dict(model.named_parameters()), dict(model.named_buffers()), model.state_dict()
    assert list(state) == list(manifest["state_dict"])
    for key, entry in manifest["state_dict"].items():
        assert list(state[key].shape) == entry["shape"], key
        assert str(state[key].dtype).replace("torch.", "") == entry["dtype"], key
        assert (key in params) == (entry["kind"] == "parameter"), key
        assert (key in buffers) == (entry["kind"] == "buffer"), key
    assert sum(p.numel() for p in model.parameters()) == manifest["num_parameters"]
    assert sum(p.numel() for p in model.controlnet.parameters()) == manifest["num_parameters_controlnet"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == manifest["num_parameters_trainable"]
    assert sum(t.numel() for t in state.values()) == manifest["num_state_dict_elements"]
    assert is_multi_scale(model) == (manifest["base_class"] == "PixArtMS")


@pytest.mark.parametrize("copies", [0, DEPTH, DEPTH + 1])
def test_copy_blocks_num_outside_1_to_depth_minus_1_is_refused(copies):
    with pytest.raises(ControlNetError, match=rf"copy_blocks_num must be an integer in 1\.\.{DEPTH - 1}"):
        ControlPixArtHalf(tiny_base(), copy_blocks_num=copies)


def test_each_wrapper_takes_only_its_kind_of_base_model():
    with pytest.raises(ControlNetError, match="use ControlPixArtMSHalf"):
        ControlPixArtHalf(tiny_base(PixArtMS), copy_blocks_num=COPIES)
    with pytest.raises(ControlNetError, match="use ControlPixArtHalf"):
        ControlPixArtMSHalf(tiny_base(PixArt), copy_blocks_num=COPIES)


def test_copies_start_as_the_base_blocks_with_zero_projections_and_only_they_train():
    model = tiny_controlnet(random_projections=False)
    for j, branch in enumerate(model.controlnet):
        for (name, a), (_, b) in zip(branch.copied_block.state_dict().items(),
                                     model.base_model.blocks[j].state_dict().items()):
            assert torch.equal(a, b), (j, name)
        assert not branch.after_proj.weight.any() and not branch.after_proj.bias.any()
    assert not model.controlnet[0].before_proj.weight.any()
    assert all(p.requires_grad for p in model.controlnet.parameters())
    assert not any(p.requires_grad for p in model.base_model.parameters())


# ---------------------------------------------------------------- the forward
def ms_inputs(batch=3, height=8, width=8):
    x, t, y, mask, data_info = tiny_inputs(batch, height, width)
    return x, t, y, mask, data_info


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_c_none_is_the_plain_base_forward_bit_for_bit(cls):
    model = tiny_controlnet(cls)
    x, t, y, mask, data_info = tiny_inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask, data_info), model.base_model(x, t, y, mask, data_info))


@pytest.mark.parametrize("cls", [PixArt, PixArtMS])
def test_zero_initialised_projections_reproduce_the_base_model(cls):
    model = tiny_controlnet(cls, random_projections=False)
    x, t, y, mask, data_info = tiny_inputs()
    with torch.no_grad():
        controlled = model(x, t, y, mask, data_info, c=control_latent(3))
        assert torch.equal(controlled, model.base_model(x, t, y, mask, data_info))


def test_conditioning_scale_zero_is_the_base_model():
    model = tiny_controlnet()
    x, t, y, mask, data_info = tiny_inputs()
    with torch.no_grad():
        base = model.base_model(x, t, y, mask, data_info)
        torch.testing.assert_close(model(x, t, y, mask, data_info, c=control_latent(3), conditioning_scale=0.0),
                                   base, rtol=0, atol=0)
        assert (model(x, t, y, mask, data_info, c=control_latent(3)) - base).abs().max() > 1e-3


def reference_forward(model, x, timestep, y, mask, data_info, c, scale=1.0):
    """The stated math, written out from the base model's parts: x = B_0(x); h = C_0(x + before_proj(c_tok)),
    h = C_j(h); x = B_{j+1}(x + scale * after_proj_j(h)); the remaining base blocks; the final layer."""
    base = model.base_model
    B, _, H, W = x.shape
    p, D = base.patch_size, base.hidden_size
    h, w = H // p, W // p
    pos = get_2d_sincos_pos_embed(D, (h, w), base.lewei_scale, base.base_size).float()[None]
    tokens = base.x_embedder.proj(x).flatten(2).transpose(1, 2) + pos
    c_tokens = base.x_embedder.proj(c).flatten(2).transpose(1, 2) + pos
    t = base.t_embedder(timestep)
    if isinstance(base, PixArtMS):
        t = t + torch.cat([base.csize_embedder(data_info["img_hw"], B),
                           base.ar_embedder(data_info["aspect_ratio"], B)], dim=1)
    t0 = base.t_block(t)
    captions = base.y_embedder.y_proj(y)
    key_mask = mask.bool()
    blocks = [lambda z, blk=blk: blk(z, captions, t0, key_mask) for blk in base.blocks]
    copies = [lambda z, blk=br.copied_block: blk(z, captions, t0, key_mask) for br in model.controlnet]
    tokens = blocks[0](tokens)
    hidden = model.controlnet[0].before_proj(c_tokens) + tokens
    for j in range(model.copy_blocks_num):
        hidden = copies[j](hidden)
        tokens = blocks[j + 1](tokens + scale * model.controlnet[j].after_proj(hidden))
    for k in range(model.copy_blocks_num + 1, len(blocks)):
        tokens = blocks[k](tokens)
    out = base.final_layer(tokens, t).reshape(B, h, w, p, p, base.out_channels)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(B, base.out_channels, H, W)


@pytest.mark.parametrize("cls, hw", [(PixArt, (8, 8)), (PixArtMS, (8, 12))], ids=["PixArt", "PixArtMS-8x12"])
def test_forward_is_the_stated_control_math(cls, hw):
    model = tiny_controlnet(cls)
    x, t, y, mask, data_info = tiny_inputs(3, *hw)
    c = control_latent(3, *hw)
    with torch.no_grad():
        for scale in (1.0, 0.6):
            torch.testing.assert_close(model(x, t, y, mask, data_info, c=c, conditioning_scale=scale),
                                       reference_forward(model, x, t, y, mask, data_info, c, scale),
                                       rtol=1e-5, atol=1e-5)


def test_a_control_of_batch_1_is_shared_by_every_sample():
    model = tiny_controlnet()
    x, t, y, mask, data_info = tiny_inputs()
    c = control_latent(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, mask, c=c), model(x, t, y, mask, c=c.expand(3, -1, -1, -1)),
                                   rtol=0, atol=1e-6)


def test_a_control_of_another_shape_is_refused_with_both_shapes():
    model = tiny_controlnet()
    x, t, y, mask, _ = tiny_inputs()
    with pytest.raises(ControlNetError, match=r"must be \(1 or 3, 4, 8, 8\) like the latents, got \(2, 4, 8, 8\)"):
        model(x, t, y, mask, c=control_latent(2))


def test_encoded_captions_give_the_same_controlled_forward():
    model = tiny_controlnet()
    x, t, y, mask, _ = tiny_inputs()
    c = control_latent(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, model.encode_captions(y, mask), c=c), model(x, t, y, mask, c=c),
                                   rtol=1e-5, atol=1e-5)


def test_forward_with_cfg_is_guided_by_the_control():
    model = tiny_controlnet()
    x, t, y, mask, _ = tiny_inputs(2)
    null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
    c = control_latent(2)
    with torch.no_grad():
        out = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0, c=c, mask=mask)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), mask, c=torch.cat([c, c]))
        cond, uncond = both[:, :4].chunk(2)
        torch.testing.assert_close(out[:2, :4], uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
        plain = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), 3.0, mask=mask)
        assert (out - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- weights
def test_released_layout_round_trips_strictly():
    source, target = tiny_controlnet(seed=0), tiny_controlnet(seed=1)
    report = target.load_weights(source.state_dict(), source="control.pth")
    assert report.missing == [] and report.unexpected == [] and report.derived == []
    for (name, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_plain_pixart_checkpoint_fills_the_base_model_and_the_copies_start_from_it():
    plain = tiny_base(seed=3)
    model = tiny_controlnet(seed=0)  # random copies and projections, to be replaced
    report = model.load_weights(plain.state_dict(), source="PixArt.pth")
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.base_model.state_dict()[name], tensor), name
    for j, branch in enumerate(model.controlnet):
        for name, tensor in plain.blocks[j].state_dict().items():
            assert torch.equal(branch.copied_block.state_dict()[name], tensor), (j, name)
        assert not branch.after_proj.weight.any()
    assert report.derived == [k for k in model.state_dict() if k.startswith("controlnet.")]
    assert "derived from the loaded weights" in report.summary()


def test_the_reference_call_load_state_dict_with_a_plain_checkpoint_fills_the_base_model():
    plain = tiny_base(seed=3)
    model = tiny_controlnet(seed=0)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.base_model.blocks[DEPTH - 1].mlp.fc2.weight, plain.blocks[DEPTH - 1].mlp.fc2.weight)
    assert torch.equal(model.controlnet[1].copied_block.attn.qkv.weight, plain.blocks[1].attn.qkv.weight)


def test_a_checkpoint_of_the_wrong_layout_fails_naming_keys():
    model = tiny_controlnet()
    partial = {k: v for k, v in model.state_dict().items() if "after_proj" not in k}
    with pytest.raises(CheckpointError, match=r"missing keys \[controlnet\.0\.after_proj\.bias"):
        model.load_weights(partial, source="broken.pth")
    plain = tiny_base().state_dict()
    renamed = {k.replace("blocks.", "blocks.0.base_block.", 1) if k.startswith("blocks.") else k: v
               for k, v in plain.items()}  # the reference's renaming of a plain checkpoint
    with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.0\.attn"):
        model.load_weights(renamed, source="renamed.pth")
    mixed = dict(plain, **{"controlnet.0.after_proj.bias": torch.zeros(TINY["hidden_size"])})
    with pytest.raises(CheckpointError, match="mixes the ControlNet layout"):
        model.load_weights(mixed, source="mixed.pth")


# ---------------------------------------------------------------- sampling
class LatentsOut:
    """A stand-in VAE whose decode returns the latents, so samples compare as latents."""
    dtype = torch.float32

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def decode(self, z):
        return type("Decoded", (), {"sample": z})()


def sample(model, y, mask, c, seeds, sampler, steps, cfg_scale=3.0, **extra):
    # float64: what is compared is the control path, not batch-size-dependent float32 rounding that the random
    # tiny model amplifies over the steps
    pipe = Pipeline(model, LatentsOut(), scale_factor=1.0, dtype=torch.float64)
    inputs = {} if c is None else dict(c=c, **extra)
    return pipe.sample(y, mask, 64, 64, seeds, sampler, steps, cfg_scale=cfg_scale, extra_inputs=inputs)


@pytest.mark.parametrize("sampler, steps", [("dpm-solver", 3), ("sa-solver", 3), ("iddpm", 4), ("lcm", 2)])
def test_controlled_sampling_of_several_prompts_equals_each_prompt_alone(sampler, steps):
    model = tiny_controlnet()
    _, _, y, mask, _ = tiny_inputs(3)
    c = control_latent(3)
    together = sample(model, y, mask, c, [1, 2, 3], sampler, steps)
    for i in range(3):
        alone = sample(model, y[i:i + 1], mask[i:i + 1], c[i:i + 1], [i + 1], sampler, steps)
        torch.testing.assert_close(together[i:i + 1], alone, rtol=0, atol=1e-4)


@pytest.mark.parametrize("sampler, steps", [("iddpm", 4), ("dpm-solver", 3)])
def test_sampling_with_a_control_differs_from_sampling_without_it(sampler, steps):
    model = tiny_controlnet()
    _, _, y, mask, _ = tiny_inputs(2)
    controlled = sample(model, y, mask, control_latent(2), [1, 2], sampler, steps)
    plain = sample(model, y, mask, None, [1, 2], sampler, steps)
    assert (controlled - plain).abs().max() > 1e-3
    unscaled = sample(model, y, mask, control_latent(2), [1, 2], sampler, steps, conditioning_scale=0.0)
    torch.testing.assert_close(unscaled, plain, rtol=0, atol=1e-5)


def test_one_control_latent_is_shared_by_every_prompt_in_sampling():
    model = tiny_controlnet(PixArtMS)
    _, _, y, mask, _ = tiny_inputs(2)
    c = control_latent(1)
    shared = sample(model, y, mask, c, [1, 2], "dpm-solver", 3)
    torch.testing.assert_close(shared, sample(model, y, mask, c.expand(2, -1, -1, -1), [1, 2], "dpm-solver", 3),
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"extra input 'c' is \(3, 4, 8, 8\); expected batch 2"):
        sample(model, y, mask, control_latent(3), [1, 2], "dpm-solver", 3)


def test_the_official_dpms_entry_point_doubles_the_control_for_several_prompts():
    from diffusion.dpm_solver import DPMS
    model = tiny_controlnet()
    x, _, y, mask, _ = tiny_inputs(2)
    null = model.y_embedder.y_embedding[None]
    c = control_latent(2)
    with torch.no_grad():
        controlled = DPMS(model.forward_with_dpmsolver, y, null, 3.0, dict(mask=mask, c=c)).sample(x, steps=3)
        alone = DPMS(model.forward_with_dpmsolver, y[1:], null, 3.0, dict(mask=mask[1:], c=c[1:])).sample(x[1:], steps=3)
        plain = DPMS(model.forward_with_dpmsolver, y, null, 3.0, dict(mask=mask)).sample(x, steps=3)
    torch.testing.assert_close(controlled[1:], alone, rtol=0, atol=1e-3)
    assert (controlled - plain).abs().max() > 1e-3


# ---------------------------------------------------------------- conditions
def square_photo(size=64, box=(16, 16, 48, 48)):
    from PIL import Image, ImageDraw
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle(box, fill="white")
    return image


def test_canny_condition_marks_the_outline_of_a_shape_and_nothing_else():
    from diffusion.data.conditions import make_condition
    condition = make_condition(square_photo(), 64, 64, "canny")
    assert condition.shape == (1, 3, 64, 64)
    assert set(condition.unique().tolist()) == {-1.0, 1.0}
    edges = condition[0, 0] > 0
    assert edges[16, 20:44].all() or edges[15, 20:44].all() or edges[17, 20:44].all()  # the top side
    assert not edges[24:40, 24:40].any() and not edges[:8].any()  # inside and far outside: no edge


def test_a_ready_condition_image_is_used_as_it_is_and_other_sizes_are_resized_with_a_notice():
    from diffusion.data.conditions import ConditionResizedWarning, make_condition
    image = square_photo()
    condition = make_condition(image, 64, 64, "image")
    torch.testing.assert_close(condition[0, 0, 16, 16], torch.tensor(1.0))
    torch.testing.assert_close(condition[0, 0, 0, 0], torch.tensor(-1.0))
    with pytest.warns(ConditionResizedWarning, match="64x64 .*resized.* 32x16"):
        assert make_condition(image, 16, 32, "image").shape == (1, 3, 16, 32)


def test_hed_without_its_checkpoint_is_a_named_error_saying_which_file(tmp_path):
    from diffusion.model.hed import HEDCheckpointNotFound, load_hed
    with pytest.raises(HEDCheckpointNotFound, match="ControlNetHED.pth of lllyasviel/Annotators"):
        load_hed(tmp_path / "ControlNetHED.pth")


def test_hed_loads_the_annotator_layout_strictly_and_gives_soft_edges(tmp_path):
    from diffusion.data.conditions import make_condition
    from diffusion.model.hed import ControlNetHED_Apache2, load_hed
    from diffusion.utils.checkpoint import CheckpointError
    torch.manual_seed(0)
    network = ControlNetHED_Apache2()
    assert [k for k in network.state_dict()][:5] == ["norm", "block1.convs.0.weight", "block1.convs.0.bias",
                                                     "block1.convs.1.weight", "block1.convs.1.bias"]
    torch.save(network.state_dict(), tmp_path / "ControlNetHED.pth")
    hed = load_hed(tmp_path / "ControlNetHED.pth")
    condition = make_condition(square_photo(32, (8, 8, 24, 24)), 32, 32, "hed", hed=hed)
    assert condition.shape == (1, 3, 32, 32) and condition.min() >= -1 and condition.max() <= 1
    from diffusion.model.hed import HEDdetector
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = torch.cat([torch.nn.functional.interpolate(p, size=(32, 32), mode="bilinear")
                            for p in network(pixels * 255)], dim=1).mean(dim=1, keepdim=True)
        torch.testing.assert_close(HEDdetector(checkpoint=tmp_path / "ControlNetHED.pth")(pixels),
                                   1 / (1 + torch.exp(-logits)), rtol=1e-5, atol=1e-5)
    torch.save({k: v for k, v in network.state_dict().items() if k != "norm"}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \[norm\]"):
        load_hed(tmp_path / "bad.pth")


def test_control_latent_is_the_scaled_vae_encoding_of_the_condition():
    from diffusion.data.conditions import control_latent, make_condition
    from tests.data_fixtures import tiny_vae
    vae = tiny_vae()
    condition = make_condition(square_photo(), 64, 64, "canny")
    c = control_latent(vae, condition, 0.18215)
    with torch.no_grad():
        mean = vae.encode(condition).latent_dist.mean
    assert c.shape == (1, 4, 8, 8)
    torch.testing.assert_close(c, mean * 0.18215)
    drawn = [control_latent(vae, condition, 0.18215, sample_posterior=True, generator=torch.Generator().manual_seed(1))
             for _ in range(2)]
    torch.testing.assert_close(drawn[0], drawn[1])


# ---------------------------------------------------------------- loading a ControlNet checkpoint and the CLI
@pytest.fixture(scope="module")
def control_checkpoint(tiny_pipeline, tmp_path_factory):
    """A tiny ControlNet checkpoint (2-block base, 1 copy, every weight random) and a config for its base model,
    with the tiny T5 and VAE of `tiny_pipeline`."""
    from diffusion.model.builder import build_model_from_config
    from diffusion.utils.checkpoint import save_weights
    from diffusion.utils.config import load_config
    root, config = tiny_pipeline
    path = tmp_path_factory.mktemp("control") / "control_config.py"
    path.write_text(config.read_text().replace("depth=1", "depth=2"))
    torch.manual_seed(0)
    model = randomize(build_controlnet(build_model_from_config(load_config(path)), copy_blocks_num=1), scale=0.05)
    save_weights(model.state_dict(), path.parent / "control.pth")
    return path.parent / "control.pth", path, model


def test_load_transformer_reads_a_controlnet_checkpoint_into_its_wrapper(control_checkpoint):
    from diffusion.pipeline import load_transformer
    from diffusion.utils.config import load_config
    path, config, saved = control_checkpoint
    model = load_transformer(path, config=load_config(config))
    assert type(model) is ControlPixArtHalf and model.copy_blocks_num == 1
    for (name, a), (_, b) in zip(saved.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name


def run_cli(checkpoint, config, out, *extra):
    from scripts import inference
    inference.main(["--config", str(config), "--model_path", str(checkpoint), "--output-dir", str(out),
                    "--step", "3", "--device", "cpu", "--prompt", "a small red circle on a gray background",
                    *map(str, extra)])


def test_cli_control_image_steers_the_sample_and_is_recorded(control_checkpoint, tmp_path):
    path, config, _ = control_checkpoint
    square_photo().save(tmp_path / "photo.png")
    run_cli(path, config, tmp_path / "on", "--control_image", tmp_path / "photo.png")
    run_cli(path, config, tmp_path / "off", "--control_image", tmp_path / "photo.png", "--conditioning_scale", 0)
    [meta] = [json.loads(line) for line in (tmp_path / "on" / "metadata.jsonl").read_text().splitlines()]
    assert (meta["control_image"], meta["condition"], meta["conditioning_scale"]) == (
        str(tmp_path / "photo.png"), "canny", 1.0)
    images = [np.asarray(Image.open(next((tmp_path / d).glob("*.png")))) for d in ("on", "off")]
    assert images[0].shape == (64, 64, 3) and (images[0] != images[1]).any()


def test_cli_refuses_control_options_it_cannot_use_by_name(tiny_pipeline, control_checkpoint, tmp_path):
    path, config, _ = control_checkpoint
    square_photo().save(tmp_path / "photo.png")
    with pytest.raises(SystemExit, match="--condition and --conditioning_scale steer a ControlNet"):
        run_cli(path, config, tmp_path, "--conditioning_scale", 0.5)
    with pytest.raises(SystemExit, match=r"--control_image .*missing.png: no such file"):
        run_cli(path, config, tmp_path, "--control_image", tmp_path / "missing.png")
    with pytest.raises(SystemExit, match="ControlNetHED.pth of lllyasviel/Annotators"):
        run_cli(path, config, tmp_path, "--control_image", tmp_path / "photo.png", "--condition", "hed",
                "--hed_checkpoint", tmp_path / "ControlNetHED.pth")
    root, plain_config = tiny_pipeline
    with pytest.raises(SystemExit, match="--control_image needs a ControlNet checkpoint"):
        run_cli(root / "model.pth", plain_config, tmp_path, "--control_image", tmp_path / "photo.png")


def test_a_compiled_base_gets_compiled_copies_with_the_same_keys_and_outputs():
    eager = tiny_controlnet()
    torch.manual_seed(0)
    compiled = build_controlnet(PixArt(**{**TINY, "depth": DEPTH}, compile=True), copy_blocks_num=COPIES).eval()
    compiled.load_weights(eager.state_dict())
    assert all(branch.copied_block._compiled_call_impl is not None for branch in compiled.controlnet)
    x, t, y, mask, _ = tiny_inputs()
    with torch.no_grad():  # on the CPU compiled blocks run eagerly: the same numbers
        assert torch.equal(compiled(x, t, y, mask, c=control_latent(3)), eager(x, t, y, mask, c=control_latent(3)))


def test_the_demo_of_a_controlnet_takes_a_control_image_and_shows_the_condition(control_checkpoint):
    import gradio as gr

    from diffusion.demo import build_demo
    from diffusion.pipeline import load_pipeline
    from diffusion.utils.config import load_config
    path, config, _ = control_checkpoint
    pipe = load_pipeline(path, config=load_config(config))
    demo = build_demo(pipe, pipe.text_encoder)
    generate = next(f.fn for f in demo.fns.values() if f.fn.__name__ == "generate")
    args = ("a small red circle on a gray background", "", "(no style)", "DPM-Solver", 5, 4.5, 0, False, "64 x 64", 1)
    quiet = lambda *a, **k: None  # noqa: E731  (gradio's progress outside a request)
    pictures, _, status, preview = generate(*args, "(none)", 1.0, square_photo(96), "Canny", 1.0, progress=quiet)
    assert "controlled by Canny edges at scale 1" in status and "resized" in status
    assert preview.size == (64, 64) and pictures[0].size == (64, 64)
    unscaled, _, _, _ = generate(*args, "(none)", 1.0, square_photo(96), "Canny", 0.0, progress=quiet)
    assert (np.asarray(pictures[0]) != np.asarray(unscaled[0])).any()
    with pytest.raises(gr.Error, match="Unknown condition 'HED'"):
        generate(*args, "(none)", 1.0, square_photo(), "HED", 1.0, progress=quiet)
