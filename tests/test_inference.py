"""scripts/inference.py and diffusion.pipeline on a tiny model, T5 and VAE: files, metadata, seeds, errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.pipeline import PromptError, parse_prompt
from scripts import inference


def run(tiny_pipeline, out, *extra):
    root, config = tiny_pipeline
    inference.main(["--config", str(config), "--model_path", str(root / "model.pth"), "--output-dir", str(out),
                    "--step", "3", "--device", "cpu", *map(str, extra)])


def test_images_get_sanitised_unique_names_and_metadata(tiny_pipeline, tmp_path):
    prompts = ["a small red circle / on a gray background?", "a small red circle / on a gray background?"]
    run(tiny_pipeline, tmp_path, "--prompt", prompts[0], "--prompt", prompts[1], "--seed", "7")
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["0000_a-small-red-circle-on-a-gray-background_s7.png",
                     "0001_a-small-red-circle-on-a-gray-background_s8.png"]
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [(m["file"], m["seed"], m["prompt"]) for m in lines] == [(files[0], 7, prompts[0]), (files[1], 8, prompts[1])]
    assert lines[0]["sampler"] == "dpm-solver" and lines[0]["steps"] == 3 and lines[0]["height"] == 64
    assert Image.open(tmp_path / files[0]).size == (64, 64)


def test_a_second_run_into_the_same_folder_keeps_the_first_runs_images(tiny_pipeline, tmp_path):
    run(tiny_pipeline, tmp_path, "--prompt", "a small red circle on a gray background", "--seed", "3")
    first = (tmp_path / "0000_a-small-red-circle-on-a-gray-background_s3.png").read_bytes()
    run(tiny_pipeline, tmp_path, "--prompt", "a small red circle on a gray background", "--seed", "3",
        "--cfg_scale", "1.5")
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["0000_a-small-red-circle-on-a-gray-background_s3.png",
                                                              "0001_a-small-red-circle-on-a-gray-background_s3.png"]
    assert (tmp_path / "0000_a-small-red-circle-on-a-gray-background_s3.png").read_bytes() == first
    lines = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [(m["file"][:4], m["cfg_scale"]) for m in lines] == [("0000", 4.5), ("0001", 1.5)]


@pytest.mark.parametrize("algo", ["dpm-solver", "sa-solver", "iddpm"])
def test_an_image_does_not_depend_on_the_batch_size(tiny_pipeline, tmp_path, algo):
    prompts = ["a large blue circle on a gray background", "a small green circle on a gray background",
               "a small red square at the top, on a black background"]
    args = [a for prompt in prompts for a in ("--prompt", prompt)] + ["--sampling_algo", algo]
    run(tiny_pipeline, tmp_path / "bs1", *args, "--bs", "1")
    run(tiny_pipeline, tmp_path / "bs3", *args, "--bs", "3")
    names = sorted(p.name for p in (tmp_path / "bs1").glob("*.png"))
    assert len(names) == 3 and names == sorted(p.name for p in (tmp_path / "bs3").glob("*.png"))
    for name in names:
        a = np.asarray(Image.open(tmp_path / "bs1" / name), dtype=np.float32)
        b = np.asarray(Image.open(tmp_path / "bs3" / name), dtype=np.float32)
        assert np.abs(a - b).max() <= 1, name  # equal up to one 8-bit level of float rounding


def test_no_prompt_is_an_error(tiny_pipeline, tmp_path):
    with pytest.raises(SystemExit, match="no prompts"):
        run(tiny_pipeline, tmp_path)


def test_load_pipeline_takes_the_encoders_and_scale_factor_of_the_config(tiny_pipeline):
    from diffusion.pipeline import load_pipeline
    from diffusion.utils.config import load_config
    from tests.conftest import REPO

    root, config = tiny_pipeline
    cfg = load_config(config)
    sampler = load_pipeline(root / "model.pth", config=cfg)
    assert (sampler.image_size, sampler.multi_scale, sampler.scale_factor) == (64, False, 1.0)
    assert sampler.text_encoder.model_max_length == 48  # the model's null caption length
    with pytest.raises(ValueError, match="gives 128-wide caption features; .* reads caption_channels=32"):
        load_pipeline(root / "model.pth", config=cfg, t5_path=REPO / "pretrained" / "toy" / "t5")


def test_size_flags_of_the_papers_demo():
    assert parse_prompt("a cat --ar 1:2", 1024, True) == ("a cat", 704, 1408)
    assert parse_prompt("a cat --aspect_ratio 2:1", 512, True)[1:] == (704, 352)
    assert parse_prompt("a cat --hw 512:768", 1024, True) == ("a cat", 512, 768)
    with pytest.raises(PromptError, match="single-scale model samples 512x512 only"):
        parse_prompt("a cat --ar 1:2", 512, False)
    with pytest.raises(PromptError, match="malformed size flag"):
        parse_prompt("a cat --ar wide", 1024, True)
    with pytest.raises(PromptError, match="multiples of 16"):
        parse_prompt("a cat --hw 500:700", 1024, True)
    with pytest.raises(PromptError, match="empty"):
        parse_prompt("   --ar 1:1", 1024, True)


@pytest.mark.parametrize("algo", ["dpm-solver", "sa-solver", "iddpm"])
def test_guidance_scale_one_samples_the_prompts_alone(tiny_pipeline, algo):
    """At cfg 1 the unconditional branch drops out: the result equals sampling with a different null caption."""
    import torch

    from diffusion.model.t5 import T5Embedder
    from diffusion.pipeline import Pipeline, load_transformer, load_vae
    from diffusion.utils.config import load_config

    root, config = tiny_pipeline
    cfg = load_config(config)
    features, mask = T5Embedder(root / "t5", model_max_length=48).get_text_embeddings(
        ["a small red circle on a gray background", "a large blue circle on a gray background"])
    sampler = Pipeline(load_transformer(root / "model.pth", config=cfg), load_vae(root / "vae"), scale_factor=1.0)
    plain = sampler.sample(features, mask, 64, 64, [1, 2], algo, 3, cfg_scale=1.0)
    other_null = sampler.sample(features, mask, 64, 64, [1, 2], algo, 3, cfg_scale=1.0,
                                negative=(torch.randn(1, *features.shape[1:]), mask[:1]))
    assert plain.shape == (2, 3, 64, 64)
    torch.testing.assert_close(plain, other_null, rtol=0, atol=1e-5)
    guided = sampler.sample(features, mask, 64, 64, [1, 2], algo, 3, cfg_scale=3.0)
    assert (guided - plain).abs().max() > 1e-6  # the random tiny model reads captions only weakly


class IdentityDecoder:
    dtype = torch.float32

    def decode(self, z):
        return type("Decoded", (), {"sample": z})()


@pytest.mark.parametrize("algo", ["dpm-solver", "sa-solver", "iddpm", "lcm"])
def test_sampler_projects_the_captions_once_and_samples_as_with_the_features_every_step(tiny_pipeline, algo):
    """`Pipeline.sample` encodes the captions once (one caption projection per call); the same registered sampler
    driven by the raw features, projected at every step, gives the same latents."""
    import torch

    from diffusion.model.guidance import cfg_inputs, guided_model
    from diffusion.model.t5 import T5Embedder
    from diffusion.pipeline import Pipeline, load_transformer, load_vae
    from diffusion.sampling import get_sampler
    from diffusion.utils.config import load_config

    root, config = tiny_pipeline
    features, mask = T5Embedder(root / "t5", model_max_length=48).get_text_embeddings(
        ["a small red circle on a gray background", "a large blue square at the top left on a white background"])
    model = load_transformer(root / "model.pth", config=load_config(config))
    sampler = Pipeline(model, load_vae(root / "vae"), scale_factor=1.0)
    projections = []
    model.y_embedder.y_proj.register_forward_hook(lambda *_: projections.append(1))
    sampler.vae = IdentityDecoder()  # compare latents: the pipeline maps them to [0, 1] as it would images
    encoded = sampler.sample(features, mask, 64, 64, [1, 2], algo, 4, cfg_scale=3.0)
    assert len(projections) == 1
    info = {"img_hw": torch.tensor([[64.0, 64.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    cond = dict(y=features, mask=mask, data_info=info)
    spec = get_sampler(algo)
    if spec.guided:
        null = model.y_embedder.y_embedding[None].expand(2, -1, -1)
        model_fn = guided_model(model, cfg_inputs(cond, dict(cond, y=null), 2), 3.0)
    else:
        model_fn = guided_model(model, cond)
    noise = torch.stack([torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    with torch.no_grad():
        plain = spec.fn(model_fn, noise, 4, generator=[1, 2])
    assert len(projections) > 4  # one per model evaluation
    # float32 reassociation only (the projection runs once on the stacked captions instead of once a step): up to
    # 1.25e-6 was seen for iddpm on some machines, about 10 ulps of values near 1
    torch.testing.assert_close(encoded, ((plain + 1) / 2).clamp(0, 1), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- diffusers weights as --model_path

def diffusers_copy(tiny_pipeline, folder):
    """The tiny checkpoint as a diffusers PixArtTransformer2DModel folder (with its null caption file)."""
    from diffusion.model.builder import build_model_from_config
    from diffusion.utils.checkpoint import read_state_dict
    from diffusion.utils.config import load_config
    from diffusion.utils.diffusers_interop import architecture_of, save_diffusers_transformer

    root, config = tiny_pipeline
    with torch.device("meta"):
        model = build_model_from_config(load_config(config))
    return save_diffusers_transformer(read_state_dict(root / "model.pth"), architecture_of(model), folder)


def sample_with(tiny_pipeline, model_path, out):
    inference.main(["--config", str(tiny_pipeline[1]), "--model_path", str(model_path), "--output-dir", str(out),
                    "--step", "3", "--device", "cpu", "--prompt", "a small red circle on a gray background"])
    return list(out.glob("*.png"))


def test_a_diffusers_folder_samples_the_images_of_the_checkpoint_it_came_from(tiny_pipeline, tmp_path):
    folder = diffusers_copy(tiny_pipeline, tmp_path / "diffusers")
    (a,) = sample_with(tiny_pipeline, tiny_pipeline[0] / "model.pth", tmp_path / "pth")
    (b,) = sample_with(tiny_pipeline, folder, tmp_path / "folder")
    assert a.name == b.name and np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_a_diffusers_weights_file_needs_its_null_caption(tiny_pipeline, tmp_path):
    folder = diffusers_copy(tiny_pipeline, tmp_path / "diffusers")
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert len(sample_with(tiny_pipeline, weights, tmp_path / "beside")) == 1  # the null caption beside it is used
    (folder / "pixart_null_caption.safetensors").unlink()
    with pytest.raises(SystemExit, match=f"error: {weights} has no null caption"):
        sample_with(tiny_pipeline, weights, tmp_path / "out")
    assert not list((tmp_path / "out").glob("*"))
