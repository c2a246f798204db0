"""Shared test helpers: tiny PixArt/PixArtMS models whose every parameter is random."""
from pathlib import Path

import pytest
import torch

from diffusion.model.nets import PixArt

REPO = Path(__file__).resolve().parents[1]
SHARED_REF = REPO.parent / "shared" / "ref"

# hidden 96 = 4 heads x 24, divisible by 3 (PixArtMS) and 4 (positions); 8 caption tokens of width 32.
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=96, depth=2, num_heads=4,
            caption_channels=32, model_max_length=8)


def randomize(model, seed=0, scale=0.1):
    """Overwrite every parameter (the zero-initialised ones too) with N(0, scale), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def tiny_model(cls=PixArt, seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize(cls(**{**TINY, **overrides}), seed=seed).eval()


def tiny_inputs(batch=3, height=8, width=8, seed=1):
    """Latents, fractional timesteps, captions, a padded mask and MS micro-conditions."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=gen)
    t = torch.tensor([0.5, 499.3, 999.0, 250.25, 1.0][:batch])
    y = torch.randn(batch, TINY["model_max_length"], TINY["caption_channels"], generator=gen)
    mask = torch.ones(batch, TINY["model_max_length"], dtype=torch.long)
    mask[0, 3:] = 0
    if batch > 2:
        mask[2, 6:] = 0
    img_hw = torch.tensor([[height * 8.0, width * 8.0]]).repeat(batch, 1) + torch.arange(batch)[:, None] * 8.0
    data_info = {"img_hw": img_hw, "aspect_ratio": (img_hw[:, :1] / img_hw[:, 1:]).round(decimals=2)}
    return x, t, y, mask, data_info


@pytest.fixture
def base_config_path():
    return REPO / "configs" / "PixArt_xl2_internal.py"


@pytest.fixture
def tiny_config(tmp_path, base_config_path):
    """A config file for a tiny PixArt (image 64 px -> latent 8), inheriting the real base config."""
    path = tmp_path / "tiny_config.py"
    path.write_text(
        f"_base_ = [{str(base_config_path)!r}]\n"
        "model = 'PixArt'\n"
        "image_size = 64\n"
        f"caption_channels = {TINY['caption_channels']}\n"
        f"model_max_length = {TINY['model_max_length']}\n"
        "model_kwargs = dict(depth=2, hidden_size=96, num_heads=4, patch_size=2)\n")
    return path


def write_tiny_pipeline_config(path, root, depth):
    """A config of a `depth`-block PixArt of the tiny pipeline's width, with its T5, VAE and toy dataset under
    `root` (see tiny_pipeline)."""
    path.write_text(f"""_base_ = [{str(REPO / 'configs/PixArt_xl2_internal.py')!r}]
model = 'PixArt'
model_kwargs = dict(depth={depth}, hidden_size=96, num_heads=4, patch_size=2)
image_size = 64
caption_channels = 32
model_max_length = 48
t5_pretrained = {str(root / 't5')!r}
vae_pretrained = {str(root / 'vae')!r}
scale_factor = 1.0
data_root = {str(root)!r}
data = dict(type='InternalData', root='toy')
""")
    return path


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A tiny T5, VAE and PixArt checkpoint plus a config naming them and a tiny toy-shapes dataset, like the toy
    model's."""
    from diffusion.data.toy_encoders import build_toy_t5
    from diffusion.data.toy_shapes import write_toy_dataset
    from diffusion.model.nets import PixArt
    from diffusion.utils.checkpoint import save_weights
    from tests.data_fixtures import tiny_vae

    root = tmp_path_factory.mktemp("pipeline")
    captions = [f"a {size} {colour} circle on a gray background" for size in ("small", "large")
                for colour in ("red", "blue", "green")]
    build_toy_t5(captions, root / "t5", width=32, num_layers=1, num_heads=2, vocab_size=64)
    tiny_vae().save_pretrained(root / "vae")
    model = randomize(PixArt(input_size=8, hidden_size=96, depth=1, num_heads=4, caption_channels=32,
                             model_max_length=48), scale=0.02)
    save_weights(model.state_dict(), root / "model.pth")
    write_toy_dataset(root / "toy", num_train=2, num_val=4, num_unseen=4, progress=False)
    config = write_tiny_pipeline_config(root / "demo_config.py", root, depth=1)
    return root, config



def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------- training (helpers: tests/train_kit.py)

@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    from tests.train_kit import make_feature_dataset
    return make_feature_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture
def train_config(tmp_path, dataset_root, base_config_path):
    """A tiny training config on dataset_root: 8 steps."""
    from tests.data_fixtures import write_training_config
    return write_training_config(
        tmp_path / "tiny_train.py", base_config_path, data_root=str(dataset_root.parent),
        data=dict(type='InternalData', root=dataset_root.name, image_list_json=['data_info.json'], load_vae_feat=True),
        caption_channels=TINY['caption_channels'], model_max_length=TINY['model_max_length'], num_epochs=100,
        max_steps=8, lr_schedule_args=dict(num_warmup_steps=2), gradient_clip=1.0, save_model_steps=1000000)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process run builds its own Accelerator; accelerate keeps process-wide state between them."""
    from accelerate.state import AcceleratorState, GradientState, PartialState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()
