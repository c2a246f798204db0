"""DreamBooth on the shared training core (tiny model, T5, VAE and 64 px images, CPU): instance images under one
prompt, class images made by the base model and cached, features computed once and cached, any batch size, exact
resume, full or LoRA, aspect-ratio buckets, named errors for bad folders and prompts."""
import numpy as np
import pytest
import torch
from PIL import Image

from diffusion.data.errors import DataError
from diffusion.model.lora import base_state_dict, fingerprint
from diffusion.model.nets import PixArtMS
from diffusion.train import dreambooth as db
from diffusion.train.flavour import TrainingFlavour, flavour_from_config
from diffusion.train.lora import adapter_from_checkpoint
from diffusion.utils.checkpoint import read_checkpoint, save_weights
from diffusion.utils.config import ConfigError, load_config
from tests.conftest import REPO, randomize
from tests.data_fixtures import write_training_config
from tests.train_kit import assert_states_equal, final_state, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PRIOR = {"with_prior_preservation": True, "class_prompt": "a photo of dog", "num_class_images": 4,
         "class_sampling_steps": 2, "sample_batch_size": 3}


def own_cache(tmp_path):
    return {"dreambooth.cache_dir": str(tmp_path / "cache")}


def write_image(path, height, width, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    """Three 64 px instance images and a note that is not an image."""
    folder = tmp_path_factory.mktemp("data") / "dog"
    for i in range(3):
        write_image(folder / f"dog{i}.png", 64, 64, seed=i)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One feature and class-image cache for the training tests (tests of the cache itself use their own)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def config(tmp_path, tiny_pipeline, instances, base_config_path, shared_cache):
    root, _ = tiny_pipeline
    return write_training_config(
        tmp_path / "dreambooth.py", base_config_path, data_root=str(instances.parent),
        dreambooth=dict(instance_data_dir=instances.name, instance_prompt='a photo of sks dog',
                        cache_dir=str(shared_cache)),
        model_kwargs=dict(depth=1, hidden_size=96, num_heads=4, patch_size=2), caption_channels=32,
        model_max_length=48, t5_pretrained=str(root / 't5'), vae_pretrained=str(root / 'vae'),
        load_from=str(root / 'model.pth'), train_batch_size=2, max_steps=2, seed=5)


def db_run(config, work_dir, overrides=None, **options):
    cfg = load_config(config, overrides)
    return run(config, work_dir, overrides, flavour=flavour_from_config(cfg), load_from=cfg.load_from, **options)


def prior(**changes):
    return {f"dreambooth.{k}": v for k, v in {**PRIOR, **changes}.items()}


# ---------------------------------------------------------------- data and loss

def test_prior_preservation_generates_class_images_once_and_pairs_them_with_instances(config, shared_cache):
    data = prepare(config, prior())
    generated = sorted((shared_cache / "class_images").rglob("*.png"))
    assert [p.name for p in generated] == [f"generated_{j:05d}.png" for j in range(4)]
    assert len(data) == 4  # max(3 instance, 4 class images)
    x, caption, mask, info = data[3]
    assert x.shape == info["class_x"].shape == (8, 8, 8)
    assert torch.equal(x, data[0][0])  # instance image 3 mod 3
    assert caption.shape == (1, 48, 32) and not torch.equal(caption, info["class_caption"])  # two prompts
    assert info["class_index"] == 4 + 3
    before = [p.stat().st_mtime_ns for p in generated]
    prepare(config, prior())
    assert [p.stat().st_mtime_ns for p in generated] == before  # cached: not made again


def test_loss_is_instance_loss_plus_weighted_class_loss(config, tiny_pipeline):
    cfg = load_config(config, prior())
    settings = db.DreamBoothSettings.from_config(cfg.dreambooth)
    data = db.prepare_dreambooth_data(cfg, settings, cfg.load_from, "cpu")
    batch = torch.utils.data.default_collate([data[0], data[1]])
    model = randomize(TrainingFlavour().build_model(cfg), seed=1).eval()
    from diffusion import IDDPM
    diffusion = IDDPM("1000")
    without_prior, _ = db.DreamBoothFlavour({**settings.__dict__, "prior_loss_weight": 0.0}).loss(
        model, diffusion, batch, 0, cfg, "cpu")
    instance_only, _ = TrainingFlavour().loss(model, diffusion, batch, 0, cfg, "cpu")
    torch.testing.assert_close(without_prior, instance_only)  # same draws per instance sample (batch of 4 vs 2)
    loss, terms = db.DreamBoothFlavour({**settings.__dict__, "prior_loss_weight": 0.5}).loss(
        model, diffusion, batch, 0, cfg, "cpu")
    assert terms["loss"].shape == (4,) and terms["is_class"].tolist() == [False, False, True, True]
    torch.testing.assert_close(loss, instance_only + 0.5 * terms["loss"][2:].mean())


def prepare(config, overrides):
    cfg = load_config(config, overrides)
    return db.prepare_dreambooth_data(cfg, db.DreamBoothSettings.from_config(cfg.dreambooth), cfg.load_from, "cpu")


def test_features_are_computed_once_then_read_from_the_cache(config, tmp_path, monkeypatch):
    first = prepare(config, own_cache(tmp_path))
    assert len(list((tmp_path / "cache" / "vae").glob("*.npy"))) == 3
    import diffusion.model.t5 as t5
    import diffusion.pipeline as pipeline

    def no_encoder(*args, **kwargs):
        raise AssertionError("an encoder was loaded although every feature is cached")
    monkeypatch.setattr(t5, "T5Embedder", no_encoder)
    monkeypatch.setattr(pipeline, "load_vae", no_encoder)
    second = prepare(config, own_cache(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(first[2][:2], second[2][:2]))


def test_a_changed_prompt_is_encoded_again(config, tmp_path):
    prepare(config, own_cache(tmp_path))
    prepare(config, {"dreambooth.instance_prompt": "a photo of sks cat", **own_cache(tmp_path)})
    assert len(list((tmp_path / "cache" / "t5").glob("*.npz"))) == 2
    assert len(list((tmp_path / "cache" / "vae").glob("*.npy"))) == 3  # same images, same features


# ---------------------------------------------------------------- training

def test_any_batch_size_trains_with_prior_preservation(config, tmp_path):
    """Batch 3 of 4 items, each an instance and a class image with their own prompts (the resume test: batch 2)."""
    result = db_run(config, tmp_path / "run", {**prior(), "train_batch_size": 3, "max_steps": 2})
    state = final_state(result)
    assert state["flavour"]["name"] == "dreambooth" and result.global_step == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_dreambooth_resume_matches_an_uninterrupted_run(config, tmp_path):
    """4 items / batch 2 = 2 steps an epoch: stop in the middle of the first epoch, resume into the second."""
    overrides = {**prior(), "max_steps": 3}
    straight = db_run(config, tmp_path / "straight", overrides)
    db_run(config, tmp_path / "resumed", {**overrides, "max_steps": 1})
    resumed = db_run(config, tmp_path / "resumed", overrides, resume_from="auto")
    assert resumed.global_step == 3
    assert_states_equal(final_state(straight), final_state(resumed))  # bitwise on the CPU


def test_with_lora_only_the_adapter_trains_and_the_base_is_untouched(config, tmp_path, tiny_pipeline):
    root, _ = tiny_pipeline
    base = fingerprint(read_checkpoint(root / "model.pth")["state_dict"])
    cfg = load_config(config, {**prior(), "lora": {"rank": 4, "alpha": 4}})
    flavour = flavour_from_config(cfg)
    assert flavour.name == "dreambooth-lora"
    kept = {}
    wrap = flavour.wrap_model
    flavour.wrap_model = lambda model, c: kept.setdefault("model", wrap(model, c))
    result = run(config, tmp_path / "run", {**prior(), "lora": {"rank": 4, "alpha": 4}}, flavour=flavour,
                 load_from=cfg.load_from)
    assert fingerprint(base_state_dict(kept["model"])) == base
    weights, spec = adapter_from_checkpoint(result.last_checkpoint)  # what inference's --lora reads
    assert weights and all("lora_" in k for k in weights) and spec.modules
    resumed = db_run(config, tmp_path / "run", {**prior(), "lora": {"rank": 4, "alpha": 4}, "max_steps": 3},
                     resume_from="auto")  # LoRA's checks of the adapter and the base hold for DreamBooth-LoRA
    assert resumed.global_step == 3 and final_state(resumed)["flavour"]["name"] == "dreambooth-lora"


def test_multi_scale_models_train_on_the_buckets_of_their_images(tmp_path, config, base_config_path):
    folder = tmp_path / "tall_and_wide"
    write_image(folder / "tall.png", 96, 48, seed=1)
    write_image(folder / "wide.png", 48, 96, seed=2)
    base = tmp_path / "ms.pth"
    ms = randomize(PixArtMS(input_size=32, hidden_size=96, depth=1, num_heads=4, caption_channels=32,
                            model_max_length=48), scale=0.02)
    save_weights(ms.state_dict(), base)
    overrides = {**prior(num_class_images=2), "model": "PixArtMS", "multi_scale": True, "image_size": 256,
                 "aspect_ratio_type": "ASPECT_RATIO_256", "dreambooth.instance_data_dir": str(folder),
                 "load_from": str(base), "train_batch_size": 1, "max_steps": 1}
    cfg = load_config(config, overrides)
    data = db.prepare_dreambooth_data(cfg, db.DreamBoothSettings.from_config(cfg.dreambooth), str(base), "cpu")
    assert sorted(data.bucket_keys) == ["0.5", "2.0"]
    for i in range(len(data)):
        x, _, _, info = data[i]
        assert x.shape == info["class_x"].shape  # class image i was made at instance image i's bucket
        assert float(info["aspect_ratio"]) == float(data.bucket_keys[i])
    assert db_run(config, tmp_path / "run", overrides).global_step == 1


# ---------------------------------------------------------------- named errors

def test_a_missing_instance_folder_is_named(config, tmp_path):
    with pytest.raises(DataError, match=r"instance folder \(dreambooth.instance_data_dir\) .*nowhere is missing: "
                                        r"expected a folder of images"):
        db_run(config, tmp_path / "run", {"dreambooth.instance_data_dir": str(tmp_path / "nowhere")})


def test_an_instance_folder_without_images_is_named(config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"instance folder .*empty holds no images: expected image files \(.*\.png"):
        db_run(config, tmp_path / "run", {"dreambooth.instance_data_dir": str(empty)})
    assert not (tmp_path / "run").exists()


def test_an_unreadable_instance_image_is_named(config, tmp_path):
    folder = tmp_path / "broken"
    write_image(folder / "good.png", 64, 64, seed=0)
    (folder / "bad.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken/bad.png: corrupt or unreadable image"):
        db_run(config, tmp_path / "run", {"dreambooth.instance_data_dir": str(folder)})


@pytest.mark.parametrize("overrides, message", [
    ({"dreambooth": {"instance_data_dir": "dog"}}, "'dreambooth.instance_prompt' is missing"),
    ({"dreambooth.instance_prompt": ""}, "'dreambooth.instance_prompt' is ''; expected a non-empty prompt"),
    ({"dreambooth.with_prior_preservation": True}, "'dreambooth.class_prompt' is None; expected the prompt of the "
                                                   "class images"),
    ({"dreambooth.num_class_image": 3},
     "unknown config key 'dreambooth.num_class_image' from --cfg-options; did you mean 'dreambooth.num_class_images'?"),
    ({"dreambooth.prior_loss_weight": -1.0}, "'dreambooth.prior_loss_weight' is -1.0; expected a number >= 0"),
    ({"dreambooth.class_sampler": "dpm"}, "'dreambooth.class_sampler' is 'dpm'; expected one of 'dpm-solver'"),
])
def test_bad_dreambooth_settings_fail_at_load_naming_the_key(config, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    assert message in str(err.value)


def test_an_over_long_prompt_is_refused_before_anything_loads(config, tmp_path):
    with pytest.raises(ConfigError, match=r"'dreambooth.instance_prompt'.*tokens; the model reads at most 48"):
        db_run(config, tmp_path / "run", {"dreambooth.instance_prompt": "a photo of sks dog " * 20})


def test_dreambooth_needs_base_weights(config, tmp_path):
    with pytest.raises(ConfigError, match="'dreambooth' training flavour fine-tunes loaded weights"):
        db_run(config, tmp_path / "run", {"load_from": None})


def test_the_toy_dreambooth_config_trains_with_the_toy_encoders(tmp_path, instances):
    """configs/pixart_app_config/PixArt_toy_dreambooth.py on the shipped toy T5 and VAE (the model: random; its
    class images are the other tests' business)."""
    toy = REPO / "configs" / "pixart_app_config" / "PixArt_toy_dreambooth.py"
    model = tmp_path / "toy.pth"
    save_weights(randomize(TrainingFlavour().build_model(load_config(toy)), scale=0.02).state_dict(), model)
    overrides = {"dreambooth.instance_data_dir": str(instances), "dreambooth.cache_dir": str(tmp_path / "cache"),
                 "dreambooth.with_prior_preservation": False,
                 "t5_pretrained": str(REPO / "pretrained" / "toy" / "t5"),
                 "vae_pretrained": str(REPO / "pretrained" / "toy" / "vae"), "train_batch_size": 2, "max_steps": 2,
                 "load_from": str(model)}
    result = db_run(toy, tmp_path / "run", overrides)
    assert result.global_step == 2 and final_state(result)["flavour"]["name"] == "dreambooth"
    assert len(list((tmp_path / "cache" / "vae").glob("*.npy"))) == 3


# ---------------------------------------------------------------- caption files and several class prompts

def test_caption_files_give_images_their_own_prompts(config, tmp_path):
    folder = tmp_path / "captioned"
    for i in range(3):
        write_image(folder / f"dog{i}.png", 64, 64, seed=i)
    (folder / "dog1.txt").write_text("a photo of sks dog on the grass\n", encoding="utf-8")
    (folder / "dog2.txt").write_text("a photo of sks dog asleep", encoding="utf-8")
    data = prepare(config, {"dreambooth.instance_data_dir": str(folder), **own_cache(tmp_path)})
    captions = [data[i][1] for i in range(3)]
    assert not torch.equal(captions[0], captions[1]) and not torch.equal(captions[1], captions[2])
    alone = prepare(config, {"dreambooth.instance_data_dir": str(folder), **own_cache(tmp_path / "other"),
                             "dreambooth.instance_prompt": "a photo of sks dog asleep"})
    assert torch.equal(alone[0][1], captions[2])  # dog2's caption file is read as that prompt
    (folder / "dog1.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"the caption file .*dog1.txt is empty: expected the image's prompt"):
        prepare(config, {"dreambooth.instance_data_dir": str(folder), **own_cache(tmp_path)})
    (folder / "dog1.txt").write_text("a photo of sks dog " * 20, encoding="utf-8")
    with pytest.raises(DataError, match=r"the caption file .*dog1.txt .*tokens; the model reads at most 48"):
        prepare(config, {"dreambooth.instance_data_dir": str(folder), **own_cache(tmp_path)})


def test_a_list_of_class_prompts_makes_class_images_from_each_with_their_captions(config, tmp_path):
    prompts = ["a photo of dog", "a photo of a dog running", "a photo of a dog asleep"]
    data = prepare(config, {**prior(class_prompt=prompts, num_class_images=4), **own_cache(tmp_path)})
    generated = sorted((tmp_path / "cache" / "class_images").rglob("*.png"))
    assert [db.caption_file(p).read_text(encoding="utf-8") for p in generated] == prompts + prompts[:1]
    class_captions = [data[i][3]["class_caption"] for i in range(4)]
    assert torch.equal(class_captions[0], class_captions[3])
    assert not torch.equal(class_captions[0], class_captions[1])
    # an image without a caption in a folder read under a list of prompts has no prompt: named
    user_folder = tmp_path / "user_classes"
    write_image(user_folder / "mine.png", 64, 64, seed=9)
    with pytest.raises(DataError, match=r"mine.png has no caption file mine.txt: with a list as "
                                        r"dreambooth.class_prompt"):
        prepare(config, {**prior(class_prompt=prompts, num_class_images=1),
                         "dreambooth.class_data_dir": str(user_folder), **own_cache(tmp_path)})
    with pytest.raises(ConfigError, match=r"'dreambooth.class_prompt' is \[\]; expected None or a non-empty prompt"):
        load_config(config, prior(class_prompt=[]))
    with pytest.raises(ConfigError, match=r"config key 'dreambooth.class_prompt\[1\]'.*tokens; the model reads at most"):
        prepare(config, {**prior(class_prompt=["a dog", "a dog " * 40]), **own_cache(tmp_path)})
