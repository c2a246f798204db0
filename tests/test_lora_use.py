"""Sampling with LoRA adapters: scripts/inference.py --lora / --lora_scale / --lora_merge, load_pipeline, the demo's
adapter picker and scale slider (tiny model, T5 and VAE)."""
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
