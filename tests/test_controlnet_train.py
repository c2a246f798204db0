"""ControlNet training (diffusion/train/controlnet.py) on a tiny model and a tiny feature dataset (CPU): the base frozen
and untouched, only the copies trained, exact resume, checkpointed copies, the config's caption dropout, per-sample
micro-conditions, and the condition features the extractor writes for the dataset."""
import hashlib
import json

import pytest
import torch
from torch.utils.data import default_collate

from diffusion.data import paths
from diffusion.data.conditions import ConditionResizedWarning, make_condition
from diffusion.data.datasets import InternalData, InternalDataMS, build_dataset_from_config
from diffusion.data.feature_io import load_image, save_caption_feature, save_vae_feature
from diffusion.data.latents import posterior_feature
from diffusion.model.builder import build_model_from_config
from diffusion.model.nets import ControlPixArtHalf, ControlPixArtMSHalf
from diffusion.train.controlnet import ControlNetFlavour
from diffusion.train.flavour import TrainingFlavour
from diffusion.train.randomness import draw_for_samples
from diffusion.utils.checkpoint import read_checkpoint
from diffusion.utils.config import ConfigError, load_config
from tests.conftest import REPO, TINY, randomize
from tests.data_fixtures import make_dataset, tiny_vae, write_training_config
from tests.train_kit import assert_states_equal, make_feature_dataset, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

CONDITION = "canny"


def add_condition_features(root, size=64):
    """A condition feature (mean, std) for every record of the dataset at `root`, different per record."""
    records = json.loads(paths.annotation_path(root, "data_info.json").read_text())
    for i, record in enumerate(records):
        mean = torch.full((4, size // 8, size // 8), 0.1 * (i % 5)) + torch.linspace(-1, 1, size // 8)
        std = torch.full((4, size // 8, size // 8), 0.05)
        save_vae_feature(paths.condition_feature_path(root, record["path"], CONDITION, size),
                         torch.cat([mean, std]).numpy())
    return root


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    return add_condition_features(make_feature_dataset(tmp_path_factory.mktemp("data") / "tiny", num_records=8))


@pytest.fixture(scope="module")
def base_weights(tmp_path_factory, dataset_root):
    """A 'pretrained' tiny base model's weights file, the --load-from of every run here."""
    cfg = load_config(write_config(tmp_path_factory.mktemp("cfg"), dataset_root))
    path = tmp_path_factory.mktemp("base") / "base.pth"
    torch.save({"state_dict": randomize(build_model_from_config(cfg), seed=3).state_dict()}, path)
    return path


def write_config(folder, dataset_root, extra=""):
    return write_training_config(
        folder / "tiny_controlnet.py", REPO / "configs" / "PixArt_xl2_internal.py", extra,
        data_root=str(dataset_root.parent),
        data=dict(type='InternalData', root=dataset_root.name, image_list_json=['data_info.json'], load_vae_feat=True),
        caption_channels=TINY['caption_channels'], model_max_length=TINY['model_max_length'], max_steps=4,
        controlnet=True, copy_blocks_num=1, control_condition=CONDITION, class_dropout_prob=0.5)


@pytest.fixture
def config_path(tmp_path, dataset_root):
    return write_config(tmp_path, dataset_root)


def digest(state_dict, prefix=""):
    """A hash of every tensor whose key starts with `prefix` (the prefix removed from the names)."""
    h = hashlib.sha256()
    for name in sorted(k for k in state_dict if k.startswith(prefix)):
        h.update(name[len(prefix):].encode())
        h.update(state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def wrapped_model(cfg, base_weights):
    model = build_model_from_config(cfg)
    model.load_state_dict(torch.load(base_weights)["state_dict"])
    return ControlNetFlavour().wrap_model(model, cfg)


def first_batch(cfg, size=4):
    dataset = build_dataset_from_config(cfg)
    return default_collate([dataset[i] for i in range(size)])


class RecordingDiffusion:
    """Stands in for IDDPM in `flavour.loss`: calls the model with the loss's arguments and keeps them."""

    num_timesteps = 1000

    def training_losses(self, model, x, t, model_kwargs, noise=None):
        self.model_kwargs = model_kwargs
        return {"loss": model(x, t, **model_kwargs).float().pow(2).mean()[None]}


# ---------------------------------------------------------------- what trains

def test_the_copies_start_from_the_loaded_base_blocks_and_only_they_are_trainable(config_path, base_weights):
    cfg = load_config(config_path)
    model = wrapped_model(cfg, base_weights)
    state = model.state_dict()
    assert digest(state, "controlnet.0.copied_block.") == digest(state, "base_model.blocks.0.")
    trainable = {id(p) for p in ControlNetFlavour().trainable_parameters(model)}
    assert trainable == {id(p) for p in model.controlnet.parameters()}
    assert not any(p.requires_grad for p in model.base_model.parameters())


def test_only_the_controlnet_gets_gradients(config_path, base_weights):
    cfg = load_config(config_path)
    model = wrapped_model(cfg, base_weights)
    randomize(model.controlnet, seed=5)  # nonzero projections: gradients reach every copy weight
    loss, _ = ControlNetFlavour().loss(model, RecordingDiffusion(), first_batch(cfg), 0, cfg, "cpu")
    loss.backward()
    assert all(p.grad is None for p in model.base_model.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.controlnet.parameters())


def test_a_run_optimises_the_controlnet_only_and_leaves_the_base_bitwise_untouched(config_path, base_weights, tmp_path):
    result = run(config_path, tmp_path / "run", load_from=str(base_weights), flavour=ControlNetFlavour())
    saved = read_checkpoint(result.last_checkpoint)
    loaded = torch.load(base_weights)["state_dict"]
    for key in ("state_dict", "state_dict_ema"):  # the full released layout: base_model.* and controlnet.*
        assert digest(saved[key], "base_model.") == digest(loaded)
    start = wrapped_model(load_config(config_path), base_weights).state_dict()
    assert digest(saved["state_dict"], "controlnet.") != digest(start, "controlnet.")
    controlnet_params = [k for k in saved["state_dict"] if k.startswith("controlnet.")]
    assert len(saved["optimizer"]["state"]) == len(controlnet_params)
    assert saved["flavour"]["name"] == "controlnet"
    inference_model = ControlPixArtHalf(build_model_from_config(load_config(config_path)), copy_blocks_num=1)
    inference_model.load_weights(saved["state_dict"])  # strict: the checkpoint is the released layout


def test_resume_from_the_checkpoint_alone_matches_an_uninterrupted_run(config_path, base_weights, tmp_path):
    straight = run(config_path, tmp_path / "straight", {"max_steps": 4}, load_from=str(base_weights),
                   flavour=ControlNetFlavour())
    run(config_path, tmp_path / "resumed", {"max_steps": 2}, load_from=str(base_weights), flavour=ControlNetFlavour())
    resumed = run(config_path, tmp_path / "resumed", {"max_steps": 4}, flavour=ControlNetFlavour(),
                  resume_from="auto")  # no --load-from: the checkpoint holds the base too
    assert resumed.global_step == 4
    assert_states_equal(read_checkpoint(straight.last_checkpoint), read_checkpoint(resumed.last_checkpoint))


def test_grad_checkpointing_covers_the_copies_and_gives_the_same_gradients(config_path, base_weights, monkeypatch):
    from diffusion.model.nets import pixart_controlnet
    grads, calls = {}, []
    checkpoint = pixart_controlnet.checkpoint
    monkeypatch.setattr(pixart_controlnet, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    for on in (False, True):
        cfg = load_config(config_path, {"grad_checkpointing": on})
        model = wrapped_model(cfg, base_weights)
        randomize(model.controlnet, seed=5)
        loss, _ = ControlNetFlavour().loss(model, RecordingDiffusion(), first_batch(cfg), 0, cfg, "cpu")
        loss.backward()
        grads[on] = {name: p.grad for name, p in model.controlnet.named_parameters()}
    assert len(calls) == cfg.model_kwargs.depth + cfg.copy_blocks_num  # every base block and every copy
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-6, msg=name)


# ---------------------------------------------------------------- what reaches the model

def test_class_dropout_prob_reaches_the_model_and_the_loss(config_path, base_weights):
    cfg = load_config(config_path)
    model = wrapped_model(cfg, base_weights)
    assert model.y_embedder.uncond_prob == cfg.class_dropout_prob == 0.5
    batch, diffusion = first_batch(cfg), RecordingDiffusion()
    ControlNetFlavour().loss(model, diffusion, batch, 3, cfg, "cpu")
    draws = draw_for_samples(batch[3]["index"], 3, cfg.seed, (4, 8, 8), 1000, 0.5, "cpu")
    assert torch.equal(diffusion.model_kwargs["force_drop_ids"], draws.drop)


def test_the_control_latent_is_the_batchs_sampled_and_scaled_condition(config_path, base_weights):
    cfg = load_config(config_path, {"scale_factor": 0.5, "sample_posterior": False})
    batch, diffusion = first_batch(cfg), RecordingDiffusion()
    ControlNetFlavour().loss(wrapped_model(cfg, base_weights), diffusion, batch, 0, cfg, "cpu")
    torch.testing.assert_close(diffusion.model_kwargs["c"], batch[3]["condition"][:, :4] * 0.5, rtol=0, atol=0)


def test_every_sample_keeps_its_own_img_hw_and_aspect_ratio_on_buckets(tmp_path):
    root = tmp_path / "ms"
    sizes = [(256, 512), (260, 520), (512, 256)]  # two records in the 0.5 bucket, one in the 2.0 bucket
    records = []
    for i, (h, w) in enumerate(sizes):
        rel = f"img{i}.png"
        records.append({"path": rel, "prompt": f"p{i}", "height": h, "width": w, "ratio": h / w})
        save_caption_feature(paths.caption_feature_path(root, rel), torch.randn(1, TINY["model_max_length"],
                                                                                TINY["caption_channels"]).numpy(),
                             torch.ones(1, TINY["model_max_length"], dtype=torch.long).numpy())
    paths.annotation_path(root, "data_info.json").parent.mkdir(parents=True)
    paths.annotation_path(root, "data_info.json").write_text(json.dumps(records))
    dataset = InternalDataMS(root, resolution=256, aspect_ratio_type="ASPECT_RATIO_256", control_condition=CONDITION,
                             max_length=TINY["model_max_length"], caption_channels=TINY["caption_channels"])
    for i, record in enumerate(dataset.records):
        h, w = dataset.target_size(i)
        for path in (dataset.vae_feature_path(record), dataset.condition_feature_path(record)):
            save_vae_feature(path, torch.rand(8, h // 8, w // 8).numpy())
    batch = default_collate([dataset[0], dataset[1]])
    cfg = load_config(write_config(tmp_path, root, "model = 'PixArtMS'\nimage_size = 256"))
    model = ControlPixArtMSHalf(build_model_from_config(cfg), copy_blocks_num=1)
    diffusion = RecordingDiffusion()
    ControlNetFlavour().loss(model, diffusion, batch, 0, cfg, "cpu")
    data_info = diffusion.model_kwargs["data_info"]
    assert data_info["img_hw"].tolist() == [[256.0, 512.0], [260.0, 520.0]]  # the reference: [1024, 1024] each
    assert data_info["aspect_ratio"].tolist() == [[0.5], [0.5]]  # the bucket's (the reference: 1)


# ---------------------------------------------------------------- features and configs

def test_extraction_writes_the_condition_features_the_dataset_reads(tmp_path):
    from diffusion.data.extract import FeatureExtractor
    root = make_dataset(tmp_path / "images", sizes=[(64, 64), (48, 96)])
    options = dict(resolution=64, max_length=TINY["model_max_length"], caption_channels=TINY["caption_channels"])
    vae = tiny_vae()
    writer = InternalData(root, load_t5_feat=True, control_condition=CONDITION, **options)
    summary = FeatureExtractor(writer, vae=vae, batch_size=2, progress=False).run(
        list(range(len(writer))), failures_file=tmp_path / "failures.jsonl")
    assert summary.counts["condition"].written == 2 and summary.counts["vae"].written == 2
    reader = InternalData(root, control_condition=CONDITION, load_t5_feat=False, text_encoder=lambda p: (
        torch.zeros(1, TINY["model_max_length"], TINY["caption_channels"]),
        torch.ones(1, TINY["model_max_length"], dtype=torch.long)), **options)
    record = reader.records[1]
    assert paths.condition_feature_path(root, record.path, CONDITION, 64).is_file()
    with pytest.warns(ConditionResizedWarning):  # resized to cover and center-cropped as the dataset's transform
        edges = make_condition(load_image(paths.image_path(root, record.path)), 64, 64, CONDITION)
    torch.testing.assert_close(reader[1][3]["condition"], posterior_feature(vae, edges)[0], rtol=1e-4, atol=1e-5)


def test_hed_features_need_the_hed_network(tmp_path):
    from diffusion.data.extract import FeatureExtractor
    root = make_dataset(tmp_path / "images", sizes=[(64, 64)])
    dataset = InternalData(root, resolution=64, control_condition="hed")
    with pytest.raises(ValueError, match="'hed' need the HED network"):
        FeatureExtractor(dataset, vae=tiny_vae(), progress=False)


@pytest.mark.parametrize("size,model", [(512, "PixArt_XL_2"), (1024, "PixArtMS_XL_2")])
def test_the_released_controlhed_configs_load_with_the_reference_values(size, model):
    cfg = load_config(REPO / "configs" / "pixart_app_config" / f"PixArt_xl2_img{size}_controlHed.py")
    assert (cfg.image_size, cfg.model, cfg.controlnet, cfg.copy_blocks_num, cfg.control_condition) == (
        size, model, True, 13, "hed")
    assert (cfg.class_dropout_prob, cfg.gradient_clip, cfg.optimizer.lr, cfg.grad_checkpointing) == (
        0.5, 0.01, 2e-5, True)


def test_more_copies_than_the_base_allows_are_refused_at_start_up(config_path, tmp_path):
    with pytest.raises(ConfigError, match="'copy_blocks_num' is 2; expected at most 1 for a 2-block model"):
        run(config_path, tmp_path / "run", {"copy_blocks_num": 2}, flavour=ControlNetFlavour())


def test_the_train_script_trains_a_controlnet_config_with_the_controlnet_flavour(config_path, tmp_path, monkeypatch):
    from scripts import train as script
    chosen = []

    def train(cfg, options, flavour=None):
        chosen.append(flavour)
        raise ConfigError("stopped before training")

    monkeypatch.setattr(script, "train", train)
    for controlnet in ("True", "False"):
        with pytest.raises(SystemExit):
            script.main([str(config_path), "--work-dir", str(tmp_path), "--cfg-options", f"controlnet={controlnet}"])
    assert isinstance(chosen[0], ControlNetFlavour) and type(chosen[1]) is TrainingFlavour


def test_the_extraction_tool_writes_a_controlnet_configs_condition_features(tmp_path, capsys):
    from tools import extract_features
    root = make_dataset(tmp_path / "images", sizes=[(64, 64), (48, 96)])
    tiny_vae().save_pretrained(tmp_path / "vae")
    config = write_config(tmp_path, root, f"vae_pretrained = {str(tmp_path / 'vae')!r}")
    assert extract_features.main([str(config), "--skip-t5", "--no-progress", "--device", "cpu", "--threads", "1"]) == 0
    for record in json.loads(paths.annotation_path(root, "data_info.json").read_text()):
        assert paths.condition_feature_path(root, record["path"], CONDITION, 64).is_file()
    assert "condition: 2 written" in capsys.readouterr().out


def test_missing_condition_features_fail_at_start_up_naming_the_file(tmp_path):
    from diffusion.data.errors import DataError
    root = make_feature_dataset(tmp_path / "data" / "no_conditions", num_records=4)
    with pytest.raises(DataError, match=r"canny_feature_64/shapes/img_000\.npy"):
        run(write_config(tmp_path, root), tmp_path / "run", flavour=ControlNetFlavour())
    assert not (tmp_path / "run").exists()  # nothing written before the start-up checks pass


def test_a_controlnet_config_with_lora_or_dreambooth_is_refused_by_name(config_path):
    from diffusion.train.flavour import flavour_from_config
    from diffusion.utils.config import load_config
    cfg = load_config(config_path, {"controlnet": True, "lora": {"rank": 4}})
    with pytest.raises(ConfigError, match="does not combine with dreambooth or lora"):
        flavour_from_config(cfg)
