"""Sampling with LoRA adapters: scripts/inference.py --lora / --lora_scale / --lora_merge, load_pipeline, the demo's
adapter picker and scale slider (tiny model, T5 and VAE)."""
import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.model.lora import LoraSpec, add_adapter, resolve_targets
from diffusion.pipeline import load_pipeline, load_transformer
from diffusion.utils.config import load_config
from diffusion.utils.lora_interop import save_adapter
from scripts import inference
from tests.test_lora_interop import randomize_adapters

PROMPTS = ["a small red circle on a gray background", "a large blue circle on a gray background"]


@pytest.fixture(scope="module")
def adapters(tiny_pipeline):
    """Two random adapters of the tiny pipeline's model, as peft folders in diffusers' names."""
    root, config = tiny_pipeline
    folders = []
    for seed, rank in ((11, 4), (12, 2)):
        model = load_transformer(root / "model.pth", config=load_config(config))
        names = resolve_targets(model, ("self_attention", "cross_attention", "mlp"))
        add_adapter(model, LoraSpec({n: rank for n in names}, {n: float(rank) for n in names}))
        randomize_adapters(model, seed, scale=1.0)
        folders.append(save_adapter(model, root / f"adapter{seed}", overwrite=True))
    return folders


def sample(tiny_pipeline, **options):
    root, config = tiny_pipeline
    pipe = load_pipeline(root / "model.pth", config=load_config(config), **options)
    features, mask = pipe.text_encoder.get_text_embeddings(PROMPTS)
    return pipe, pipe.sample(features, mask, 64, 64, [1, 2], "dpm-solver", 3, cfg_scale=3.0)


def test_merged_adapters_give_the_unmerged_outputs_and_images(tiny_pipeline, adapters):
    loras = [(adapters[0], 0.8), (adapters[1], 1.5)]
    unmerged_pipe, unmerged = sample(tiny_pipeline, loras=loras)
    merged_pipe, merged = sample(tiny_pipeline, loras=loras, merge_loras=True)
    _, plain = sample(tiny_pipeline)
    assert set(unmerged_pipe.adapters) == {"lora0", "lora1"} and merged_pipe.adapters == {}
    features, mask = unmerged_pipe.text_encoder.get_text_embeddings(PROMPTS)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999.0, 500.5])
    with torch.no_grad():
        outputs = [p.model(x, t, features, mask) for p in (unmerged_pipe, merged_pipe)]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)
    # three solver steps and the decoder amplify the float rounding of merging a little
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)
    assert (unmerged - plain).abs().max() > 1e-2  # the adapters do act
    unmerged_pipe.use_adapters({})
    features, mask = unmerged_pipe.text_encoder.get_text_embeddings(PROMPTS)
    off = unmerged_pipe.sample(features, mask, 64, 64, [1, 2], "dpm-solver", 3, cfg_scale=3.0)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)  # switched off: the base model's images exactly


def run(tiny_pipeline, out, *extra):
    root, config = tiny_pipeline
    inference.main(["--config", str(config), "--model_path", str(root / "model.pth"), "--output-dir", str(out),
                    "--step", "3", "--device", "cpu", "--prompt", PROMPTS[0], *map(str, extra)])


def test_inference_cli_takes_several_adapters_with_scales_and_merges_them(tiny_pipeline, adapters, tmp_path):
    args = ["--lora", adapters[0], "--lora_scale", "0.8", "--lora", adapters[1], "--lora_scale", "1.5"]
    run(tiny_pipeline, tmp_path / "plain")
    run(tiny_pipeline, tmp_path / "unmerged", *args)
    run(tiny_pipeline, tmp_path / "merged", *args, "--lora_merge")
    name = "0000_a-small-red-circle-on-a-gray-background_s0.png"
    image = {k: np.asarray(Image.open(tmp_path / k / name), dtype=np.float32) for k in ("plain", "unmerged", "merged")}
    assert np.abs(image["merged"] - image["unmerged"]).max() <= 1  # one 8-bit level of float rounding
    assert np.abs(image["unmerged"] - image["plain"]).max() > 5
    meta = json.loads((tmp_path / "merged" / "metadata.jsonl").read_text())
    assert meta["loras"] == [{"path": str(adapters[0]), "scale": 0.8}, {"path": str(adapters[1]), "scale": 1.5}]
    assert meta["lora_merge"] is True


@pytest.mark.parametrize("extra, message", [
    (["--lora", "A", "--lora", "B", "--lora_scale", "0.5"], "1 --lora_scale for 2 --lora"),
    (["--lora", "/no/such/adapter"], "LoRA adapter /no/such/adapter: no such folder or checkpoint"),
])
def test_bad_lora_arguments_are_named(tiny_pipeline, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(tiny_pipeline, tmp_path, *extra)


def test_the_demo_picks_an_adapter_and_its_scale(tiny_pipeline, adapters):
    pytest.importorskip("gradio")
    from diffusion.demo import NO_ADAPTER, build_demo
    root, config = tiny_pipeline
    pipe = load_pipeline(root / "model.pth", config=load_config(config), loras=[(adapters[0], 1.0)])
    demo = build_demo(pipe, pipe.text_encoder)
    generate = next(block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "generate")
    no_progress = lambda *args, **kwargs: None  # noqa: E731

    def images(adapter, scale):
        pictures, _, status = generate(PROMPTS[0], "", "(no style)", "DPM-Solver", 5, 3.0, 7, False, "64 x 64", 1,
                                       adapter, scale, progress=no_progress)
        return np.asarray(pictures[0], dtype=np.float32), status

    with_adapter, status = images(adapters[0].name, 0.5)
    assert status.endswith(f"with LoRA {adapters[0].name} x 0.5.")
    without, status = images(NO_ADAPTER, 1.0)
    assert "LoRA" not in status and np.abs(with_adapter - without).max() > 5
    assert np.array_equal(images(adapters[0].name, 0.0)[0], without)  # scale 0 is the base model


def test_a_lora_checkpoint_given_as_the_model_is_pointed_to_lora(tiny_pipeline, tmp_path):
    root, config = tiny_pipeline
    torch.save({"state_dict": {"blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 96)}, "flavour": {"name": "lora"}},
               tmp_path / "run.pth")
    with pytest.raises(SystemExit, match="is a LoRA training checkpoint: .* as a LoRA adapter \\(--lora\\)"):
        inference.main(["--config", str(config), "--model_path", str(tmp_path / "run.pth"), "--prompt", "a red circle"])


# ---------------------------------------------------------------- LoRA on a ControlNet

def test_a_lora_on_a_controlnet_adapts_its_base_model_and_leaves_the_copies_alone(tmp_path):
    from diffusion.model.lora import lora_layers, use_adapters
    from diffusion.model.nets import ControlPixArtHalf, PixArt
    from diffusion.pipeline import load_loras
    from tests.conftest import randomize, tiny_inputs, tiny_model
    base = tiny_model(PixArt)  # 2 blocks
    trained = copy.deepcopy(base)  # the adapter is trained on the plain base, saved in diffusers' names
    names = resolve_targets(trained, ("self_attention", "cross_attention", "mlp"))
    add_adapter(trained, LoraSpec({n: 4 for n in names}, {n: 4.0 for n in names}))
    randomize_adapters(trained, 7, scale=1.0)
    folder = save_adapter(trained, tmp_path / "adapter")
    control = ControlPixArtHalf(copy.deepcopy(base), copy_blocks_num=1).eval()
    randomize(control.controlnet, seed=8)  # nonzero projections: the control acts
    plain = copy.deepcopy(control)
    lora_base = copy.deepcopy(base)
    assert load_loras(control, [(folder, 0.7)]) == {"lora0": str(folder)}
    load_loras(lora_base, [(folder, 0.7)])
    assert {name.split(".")[0] for name, _ in lora_layers(control)} == {"base_model"}
    x, t, y, mask, _ = tiny_inputs()
    c = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        # without a control, the ControlNet with the LoRA is the base model with the LoRA
        torch.testing.assert_close(control(x, t, y, mask), lora_base(x, t, y, mask), rtol=0, atol=1e-6)
        controlled = control(x, t, y, mask, c=c)
        assert (controlled - plain(x, t, y, mask, c=c)).abs().max() > 1e-3  # the adapter acts under control too
        assert (controlled - control(x, t, y, mask)).abs().max() > 1e-3  # and so does the control
        use_adapters(control, {})
        torch.testing.assert_close(control(x, t, y, mask, c=c), plain(x, t, y, mask, c=c), rtol=0, atol=0)


def test_a_controlnet_pipeline_samples_with_a_lora_merged_or_not(tiny_pipeline, tmp_path):
    from diffusion.data.conditions import control_latent_of_image
    from diffusion.data.toy_shapes import Scene, Shape, render_scene
    from diffusion.model.nets import ControlPixArtHalf, PixArt
    from diffusion.utils.checkpoint import save_weights
    from tests.conftest import randomize
    root, config = tiny_pipeline
    base = randomize(PixArt(input_size=8, hidden_size=96, depth=2, num_heads=4, caption_channels=32,
                            model_max_length=48), scale=0.02)
    names = resolve_targets(base, ("self_attention", "cross_attention", "mlp"))
    adapted = add_adapter(copy.deepcopy(base), LoraSpec({n: 2 for n in names}, {n: 2.0 for n in names}))
    folder = save_adapter(randomize_adapters(adapted, 3, scale=1.0), tmp_path / "adapter")
    save_weights(randomize(ControlPixArtHalf(base, copy_blocks_num=1), seed=4, scale=0.02).state_dict(),
                 tmp_path / "controlnet.pth")
    cfg = load_config(config, {"model_kwargs": dict(depth=2, hidden_size=96, num_heads=4, patch_size=2)})
    scene = render_scene(Scene("gray", (Shape("red", "circle", "large", "left"),)), 64)
    images = {}
    for name, options in (("plain", {}), ("lora", {"loras": [(folder, 1.0)]}),
                          ("merged", {"loras": [(folder, 1.0)], "merge_loras": True})):
        pipe = load_pipeline(tmp_path / "controlnet.pth", config=cfg, **options)
        c = control_latent_of_image(scene, pipe.vae, 64, 64, pipe.scale_factor)
        features, mask = pipe.text_encoder.get_text_embeddings(PROMPTS)
        images[name] = pipe.sample(features, mask, 64, 64, [1, 2], "dpm-solver", 3, cfg_scale=3.0,
                                   extra_inputs=dict(c=c, conditioning_scale=1.0))
    torch.testing.assert_close(images["merged"], images["lora"], rtol=0, atol=1e-4)
    assert (images["lora"] - images["plain"]).abs().max() > 1e-2

