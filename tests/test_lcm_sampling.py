"""Sampling distilled (LCM) models: the CLI and the demo default to the lcm sampler (4 steps, no guidance) on
distilled checkpoints, the released PixArt-LCM-XL-2-1024-MS layout (a diffusers pipeline folder, no null caption)
and a PixArt-LCM-LoRA peft adapter over it load through the existing loaders (tiny models)."""
import json

import numpy as np
import pytest
import torch

from diffusion.pipeline import is_distilled, load_pipeline, load_transformer
from diffusion.train.lcm import is_distilled_checkpoint
from diffusion.utils.checkpoint import read_state_dict, save_weights
from diffusion.utils.config import load_config
from diffusion.utils.diffusers_interop import NULL_CAPTION_FILE, is_lcm_pipeline
from scripts import inference
from tests.conftest import tiny_inputs
from tests.test_inference import diffusers_copy
from tests.test_lora_interop import LCM_LORA_TARGETS, diffusers_adapter

PROMPT = "a small red circle on a gray background"


def training_checkpoint(tiny_pipeline, path, flavour):
    """The tiny model saved as a training run of `flavour` would save it (weights, EMA, flavour)."""
    weights = read_state_dict(tiny_pipeline[0] / "model.pth")
    torch.save({"state_dict": weights, "state_dict_ema": weights, "step": 1,
                "flavour": {"name": flavour, "averaged": {}, "state": {}}}, path)
    return path


def lcm_pipeline_folder(tiny_pipeline, folder):
    """The released PixArt-LCM-XL-2-1024-MS layout: a pipeline folder whose scheduler is an LCMScheduler and whose
    transformer/ carries no null caption."""
    diffusers_copy(tiny_pipeline, folder / "transformer")
    (folder / "transformer" / NULL_CAPTION_FILE).unlink()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "scheduler": ["diffusers", "LCMScheduler"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"]}))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "LCMScheduler"}))
    return folder


def cli(tiny_pipeline, model_path, out, *extra, config=True):
    root, config_path = tiny_pipeline
    encoders = ["--t5_path", str(root / "t5"), "--vae_path", str(root / "vae")]
    inference.main([*(["--config", str(config_path)] if config else encoders), "--model_path", str(model_path),
                    "--output-dir", str(out), "--device", "cpu", "--prompt", PROMPT, *map(str, extra)])
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_only_lcm_training_checkpoints_and_lcm_pipeline_folders_count_as_distilled(tiny_pipeline, tmp_path):
    assert is_distilled_checkpoint(training_checkpoint(tiny_pipeline, tmp_path / "lcm.pth", "lcm"))
    lcm_lora = training_checkpoint(tiny_pipeline, tmp_path / "lcm_lora.pth", "lcm-lora")
    assert is_distilled_checkpoint(lcm_lora)
    assert not is_distilled_checkpoint(training_checkpoint(tiny_pipeline, tmp_path / "lora.pth", "lora"))
    assert not is_distilled_checkpoint(tiny_pipeline[0] / "model.pth")  # a released-layout file
    assert is_distilled(tiny_pipeline[0] / "model.pth", loras=[lcm_lora])  # an LCM-LoRA run's adapter as --lora
    folder = lcm_pipeline_folder(tiny_pipeline, tmp_path / "PixArt-LCM")
    assert is_lcm_pipeline(folder) and is_lcm_pipeline(folder / "transformer") and is_distilled(folder)
    assert not is_lcm_pipeline(diffusers_copy(tiny_pipeline, tmp_path / "plain"))


def test_the_cli_samples_a_distilled_checkpoint_with_four_lcm_steps_without_guidance(tiny_pipeline, tmp_path):
    path = training_checkpoint(tiny_pipeline, tmp_path / "lcm.pth", "lcm")
    (line,) = cli(tiny_pipeline, path, tmp_path / "out")
    assert (line["sampler"], line["steps"], line["cfg_scale"]) == ("lcm", 4, None)
    (plain,) = cli(tiny_pipeline, tiny_pipeline[0] / "model.pth", tmp_path / "plain", "--step", "2")
    assert plain["sampler"] == "dpm-solver" and plain["cfg_scale"] == 4.5  # other models keep the default


def test_the_released_lcm_pipeline_layout_loads_without_a_null_caption_and_samples_with_lcm(tiny_pipeline, tmp_path):
    from diffusers import PixArtTransformer2DModel

    from tests.test_diffusers_interop import diffusers_forward
    folder = lcm_pipeline_folder(tiny_pipeline, tmp_path / "PixArt-LCM")
    model = load_transformer(folder)
    assert not model.y_embedder.y_embedding.any()  # none in the folder: a zero one
    theirs = PixArtTransformer2DModel.from_pretrained(folder / "transformer").eval()
    x, t, y, mask, _ = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, y, mask), diffusers_forward(theirs, x, t, y, mask), rtol=0, atol=1e-5)
    (line,) = cli(tiny_pipeline, folder, tmp_path / "out", config=False)
    assert (line["sampler"], line["steps"]) == ("lcm", 4)
    with pytest.raises(SystemExit, match="dpm-solver guided at 4.5 needs a null caption, and this model has none"):
        cli(tiny_pipeline, folder, tmp_path / "guided", "--sampling_algo", "dpm-solver", config=False)
    assert not list((tmp_path / "guided").glob("*.png"))


def test_an_lcm_lora_peft_adapter_over_the_lcm_folder_gives_diffusers_outputs(tiny_pipeline, tmp_path):
    """PixArt-LCM-LoRA: a peft adapter with the released target list (the patch conv, timestep and caption
    embedders included), trained on diffusers' transformer, loaded with --lora."""
    from tests.test_diffusers_interop import diffusers_forward
    root = tiny_pipeline[0]
    folder = lcm_pipeline_folder(tiny_pipeline, tmp_path / "PixArt-LCM")
    twin = diffusers_adapter(load_transformer(folder), tmp_path / "PixArt-LCM-LoRA", target_modules=LCM_LORA_TARGETS,
                             r=4, lora_alpha=8)
    pipe = load_pipeline(folder, t5_path=root / "t5", vae_path=root / "vae", loras=[(tmp_path / "PixArt-LCM-LoRA",
                                                                                      1.0)])
    x, t, y, mask, _ = tiny_inputs()
    with torch.no_grad():
        torch.testing.assert_close(pipe.model(x, t, y, mask), diffusers_forward(twin.base_model.model, x, t, y, mask),
                                   rtol=0, atol=1e-5)
    (line,) = cli(tiny_pipeline, folder, tmp_path / "out", "--lora", tmp_path / "PixArt-LCM-LoRA", config=False)
    assert line["sampler"] == "lcm" and line["loras"][0]["path"].endswith("PixArt-LCM-LoRA")


def test_the_demo_opens_a_distilled_model_in_lcm_mode_and_ignores_guidance(tiny_pipeline, tmp_path):
    pytest.importorskip("gradio")
    from diffusion.demo import build_demo
    from scripts import interface
    root, config = tiny_pipeline
    path = training_checkpoint(tiny_pipeline, tmp_path / "lcm.pth", "lcm")
    _, _, _, options = interface.build(interface.parse_args(["--config", str(config), "--model_path", str(path),
                                                            "--device", "cpu"]))
    assert options["default_sampler"] == "LCM"
    _, _, _, options = interface.build(interface.parse_args(["--config", str(config), "--model_path",
                                                            str(root / "model.pth"), "--device", "cpu", "--lcm"]))
    assert options["default_sampler"] == "LCM"  # --lcm: e.g. a PixArt-LCM-LoRA folder, which cannot tell
    pipe = load_pipeline(path, config=load_config(config))
    demo = build_demo(pipe, pipe.text_encoder, default_sampler="LCM")
    generate = next(block.fn for block in demo.fns.values() if getattr(block.fn, "__name__", "") == "generate")

    def sample(guidance):
        pictures, _, status = generate(PROMPT, "", "(no style)", "LCM", 4, guidance, 7, False, "64 x 64", 1,
                                       progress=lambda *args, **kwargs: None)
        return np.asarray(pictures[0]), status

    low, status = sample(1.0)
    assert status.endswith("in 4 LCM step(s), without guidance.")
    assert np.array_equal(low, sample(9.0)[0])  # the guidance slider has no effect on LCM
    features, mask = pipe.encode([PROMPT])
    expected = pipe.sample(features, mask, 64, 64, [7], "lcm", 4)
    assert np.array_equal(low, (expected[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def test_an_lcm_lora_training_checkpoint_is_taken_as_an_adapter(tiny_pipeline, tmp_path):
    """What LCM-LoRA runs save (flavour 'lcm-lora') is an adapter for --lora, not a model."""
    from diffusion.train.lora import holds_adapter
    from diffusion.utils.checkpoint import CheckpointError, read_checkpoint
    path = training_checkpoint(tiny_pipeline, tmp_path / "lcm_lora.pth", "lcm-lora")
    assert holds_adapter(read_checkpoint(path))
    with pytest.raises(CheckpointError, match="is a LoRA training checkpoint"):
        load_transformer(path, config=load_config(tiny_pipeline[1]))
    save_weights(read_state_dict(tiny_pipeline[0] / "model.pth"), tmp_path / "plain.pth")
    assert not is_distilled(tmp_path / "plain.pth")
