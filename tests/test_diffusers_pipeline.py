"""The whole diffusers pipeline both ways: `tools/convert_pixart_to_diffusers.py --pipeline` writes a
PixArtAlphaPipeline folder that diffusers loads without a key warning and that samples the image our pipeline
samples; and such a folder is a `--model_path` here, with its T5 and VAE. On the toy PixArt (the shipped toy T5 and
VAE) and a tiny PixArtMS at diffusers' 1024 px sample size, every weight random."""
import logging

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)

from diffusion.data.aspect_ratios import aspect_ratio_table
from diffusion.model.builder import build_model_from_config
from diffusion.pipeline import load_pipeline, parse_prompt
from diffusion.sampling import diffusers_scheduler_sampler
from diffusion.utils.checkpoint import read_state_dict, save_weights
from diffusion.utils.config import load_config
from diffusion.utils.diffusers_interop import NULL_CAPTION_FILE, architecture_of, diffusers_config
from tests.conftest import REPO, randomize
from tools import convert_pixart_to_diffusers as convert_tool

TOY_CONFIG = REPO / "configs" / "pixart_config" / "PixArt_toy_shapes.py"
TOY_SCALE = 2.0  # not the toy VAE's own 5.04: a pipeline folder must carry the model's scale factor to diffusers
PROMPT = "a large red circle on the left and a small blue square at the top right, on a gray background"
STEPS, GUIDANCE, SEED = 8, 3.0, 7
TOL = dict(rtol=0, atol=1e-4)


def export(tmp_path, config, overrides=()):
    """A random model of `config` saved as a checkpoint, then exported with --pipeline: (folder, model)."""
    torch.manual_seed(0)
    model = randomize(build_model_from_config(load_config(config, dict(overrides)), grad_checkpointing=False),
                      scale=0.05)
    save_weights(model.state_dict(), tmp_path / "model.pth")
    folder = tmp_path / "pipeline"
    cfg_options = ["--cfg-options", *(f"{k}={v}" for k, v in overrides)] if overrides else []
    convert_tool.main(["--orig_ckpt_path", str(tmp_path / "model.pth"), "--config", str(config), *cfg_options,
                       "--pipeline", "--dump_path", str(folder)])
    return folder, model.eval()


@pytest.fixture(scope="module")
def toy_pipeline(tmp_path_factory):
    torch.set_num_threads(2)
    return export(tmp_path_factory.mktemp("toy"), TOY_CONFIG, [("scale_factor", TOY_SCALE)])


@pytest.fixture(scope="module")
def ms_pipeline(tmp_path_factory):
    """A tiny PixArtMS of sample size 128 (the only size diffusers gives micro-conditions to) on the toy encoders."""
    root = tmp_path_factory.mktemp("ms")
    config = root / "tiny_ms.py"
    config.write_text(f"""_base_ = [{str(REPO / 'configs/PixArt_xl2_internal.py')!r}]
model = 'PixArtMS'
model_kwargs = dict(depth=1, hidden_size=48, num_heads=4, patch_size=2)
image_size = 1024
lewei_scale = 2.0
caption_channels = 128
model_max_length = 32
t5_pretrained = {str(REPO / 'pretrained/toy/t5')!r}
vae_pretrained = {str(REPO / 'pretrained/toy/vae')!r}
scale_factor = 5.042129158973694
""")
    return export(root, config)


def diffusers_images(folder, height, width, **kwargs):
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(num_inference_steps=STEPS, guidance_scale=GUIDANCE, generator=torch.Generator().manual_seed(SEED),
                height=height, width=width, use_resolution_binning=False, output_type="pt", **kwargs).images


def our_images(folder, height, width, negative_prompt=None):
    pipe = load_pipeline(folder)  # the folder alone: its transformer, T5, VAE and scale factor
    features, mask = pipe.encode([PROMPT])
    negative = pipe.text_encoder.get_text_embeddings([negative_prompt]) if negative_prompt is not None else None
    sampler = diffusers_scheduler_sampler(DPMSolverMultistepScheduler.from_pretrained(folder / "scheduler"))
    return pipe.sample(features, mask, height, width, [SEED], sampler, STEPS, GUIDANCE, negative=negative)


def test_the_exported_folder_loads_in_diffusers_without_a_key_warning(toy_pipeline, caplog, capfd):
    folder, model = toy_pipeline
    caplog.set_level(logging.INFO)
    pipe = PixArtAlphaPipeline.from_pretrained(folder)
    said = (caplog.text + capfd.readouterr().err).lower()
    for warning in ("missing", "unexpected", "not used", "not initialized", "newly initialized"):
        assert warning not in said
    assert type(pipe.transformer).__name__ == "PixArtTransformer2DModel"
    assert {k: pipe.transformer.config[k] for k in diffusers_config(architecture_of(model))} == diffusers_config(
        architecture_of(model))
    assert pipe.vae.config.scaling_factor == TOY_SCALE
    scheduler = pipe.scheduler.config
    assert (type(pipe.scheduler).__name__, scheduler.algorithm_type, scheduler.solver_order) == (
        "DPMSolverMultistepScheduler", "dpmsolver++", 2)
    assert (scheduler.beta_start, scheduler.beta_end, scheduler.beta_schedule) == (1e-4, 0.02, "linear")
    assert (folder / "transformer" / NULL_CAPTION_FILE).is_file()


def test_diffusers_and_our_pipeline_sample_the_same_image(toy_pipeline):
    folder, _ = toy_pipeline
    # diffusers guides with T5("") and its own mask: ours does the same given "" as the negative prompt
    expected = diffusers_images(folder, 64, 64, prompt=PROMPT)
    ours = our_images(folder, 64, 64, negative_prompt="")
    assert expected.std() > 0.05  # a real image, not a flat one
    torch.testing.assert_close(ours, expected, **TOL)


def test_diffusers_guided_by_the_null_caption_samples_our_default_image(toy_pipeline):
    folder, model = toy_pipeline
    pipe = load_pipeline(folder)
    features, mask = pipe.encode([PROMPT])
    null = model.y_embedder.y_embedding[None]  # ours guides with it and the prompt's mask
    expected = diffusers_images(folder, 64, 64, prompt_embeds=features, prompt_attention_mask=mask,
                                negative_prompt=None, negative_prompt_embeds=null,
                                negative_prompt_attention_mask=mask)
    torch.testing.assert_close(our_images(folder, 64, 64), expected, **TOL)


def test_micro_conditions_are_the_same_on_a_multi_scale_model(ms_pipeline):
    folder, _ = ms_pipeline
    # any size at sample size 128: both give the transformer img_hw = (256, 512) and the aspect ratio 0.5
    expected = diffusers_images(folder, 256, 512, prompt=PROMPT)
    torch.testing.assert_close(our_images(folder, 256, 512, negative_prompt=""), expected, **TOL)


@pytest.mark.parametrize("size, bins", [(256, ASPECT_RATIO_256_BIN), (512, ASPECT_RATIO_512_BIN),
                                        (1024, ASPECT_RATIO_1024_BIN)])
def test_resolution_binning_picks_the_same_bucket(size, bins):
    from diffusers.image_processor import PixArtImageProcessor
    assert {k: tuple(map(int, v)) for k, v in bins.items()} == aspect_ratio_table(f"ASPECT_RATIO_{size}_TEST")
    for h, w in [(size, size), (3, 4), (4, 3), (9, 16), (16, 9), (1, 3), (5, 2), (1, 7), (7, 1), (0.93, 1)]:
        requested = (round(size * h / max(h, w)), round(size * w / max(h, w)))
        ours = parse_prompt(f"a cat --ar {requested[0]}:{requested[1]}", size, multi_scale=True)[1:]
        assert ours == PixArtImageProcessor.classify_height_width_bin(*requested, ratios=bins)


def test_a_pipeline_folder_is_a_model_path_with_its_own_t5_and_vae(toy_pipeline, tmp_path):
    folder, model = toy_pipeline
    pipe = load_pipeline(folder)
    assert (pipe.text_encoder.local_dir, pipe.text_encoder.tokenizer_dir) == (folder / "text_encoder",
                                                                           folder / "tokenizer")
    assert pipe.scale_factor == TOY_SCALE and pipe.model.model_max_length == model.model_max_length
    toy = REPO / "pretrained" / "toy"
    told = load_pipeline(folder, t5_path=toy / "t5", vae_path=toy / "vae")  # told otherwise
    assert told.text_encoder.local_dir == toy / "t5" and told.scale_factor != TOY_SCALE

    # training: --load-from reads its transformer (and null caption) in our names
    loaded = read_state_dict(folder)
    expected = {k: v for k, v in model.state_dict().items() if k != "pos_embed"}
    assert set(loaded) == set(expected)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)

    # the CLI and the demo take the folder alone
    from scripts import inference, interface
    inference.main(["--model_path", str(folder), "--prompt", PROMPT, "--step", "2", "--output-dir", str(tmp_path)])
    assert len(list(tmp_path.glob("0000_*.png"))) == 1
    demo_pipe, _, _, _ = interface.build(interface.parse_args(["--model_path", str(folder)]))
    assert demo_pipe.text_encoder.local_dir == folder / "text_encoder" and demo_pipe.scale_factor == TOY_SCALE
