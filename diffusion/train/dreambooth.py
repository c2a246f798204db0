"""DreamBooth fine-tuning as a training flavour: every weight (`DreamBoothFlavour`) or a LoRA adapter
(`DreamBoothLoRAFlavour`, when the config sets `lora` too) learns a subject from a few instance images under one
prompt ('a photo of sks dog'), optionally with prior preservation. An image with a caption file beside it (the same
name with `.txt`: `dog3.png` -> `dog3.txt`, one prompt in UTF-8) is trained on its own caption instead, in the
instance and the class folder alike; `class_prompt` may be a list, class image j then being made from prompt
j mod len (its caption file is written with it).

Selected by the config's `dreambooth` dict (base config: its keys and defaults; `flavour_from_config`). At start-up,
before training and on the main process (the others wait, then read the cache):
1. the instance images are listed (a missing or empty folder, an unreadable image are errors naming the file);
2. with prior preservation, `num_class_images` class images are made by the base model (`--load-from`) with the
   shared sampling pipeline at the instance images' sizes and written as PNGs into `class_data_dir` (images already
   there count: the user's own, or those of an earlier start), each from its own seed;
3. the VAE features of every image at its training size (its aspect-ratio bucket on multi-scale models) and the T5
   features of every prompt are computed and cached in `cache_dir` under keys made of the image bytes, the size,
   the prompt and the encoder folders, so a changed image, prompt or encoder is recomputed and a resume reads the
   cache; T5, VAE and the sampling model are freed before training.
Every item pairs an instance image with a class image (`diffusion/data/datasets/dreambooth.py`), so any batch size
holds both (the reference trains batch 1 on instance images only, its one prompt not repeated per sample); the loss
is the instance loss plus `prior_loss_weight` x the class loss, split by the mark each sample carries.

The cache is written at start-up, before the work dir's lock is taken: a start that fails a later check may leave
cache files (complete ones: every write is atomic), which the next start reuses.
"""
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from diffusion.data import paths
from diffusion.data.aspect_ratios import aspect_ratio_table, closest_bucket
from diffusion.data.datasets.dreambooth import IMAGE_SUFFIXES, CachedImage, DreamBoothData, list_images
from diffusion.data.errors import DataError
from diffusion.data.feature_io import (
    load_caption_feature,
    load_image,
    load_vae_feature,
    save_caption_feature,
    save_vae_feature,
)
from diffusion.data.latents import posterior_feature
from diffusion.data.transforms import get_transform
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.train.data import build_train_data
from diffusion.train.flavour import TrainingFlavour
from diffusion.train.lora import LoRAFlavour
from diffusion.utils.config import ConfigError

VAE_FEATURE_CHANNELS = 8  # posterior mean and std of a 4-channel latent
CACHE_DIR = "dreambooth_cache"  # under the work dir unless dreambooth.cache_dir is set


@dataclass(frozen=True)
class DreamBoothSettings:
    """The config's `dreambooth` dict with the defaults of the keys left out (load_config checked the values)."""
    instance_data_dir: str
    instance_prompt: str             # of the instance images without a caption file
    with_prior_preservation: bool = False
    class_prompt: object = None      # a prompt, or a list of them (class image j: prompt j mod len)
    class_data_dir: str = None       # None: a folder of the cache, keyed by what makes the images
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4       # class images sampled at a time
    class_sampler: str = "dpm-solver"
    class_sampling_steps: int = 20
    class_cfg_scale: float = 4.5
    cache_dir: str = None            # None: work_dir/dreambooth_cache

    @classmethod
    def from_config(cls, value):
        return value if isinstance(value, cls) else cls(**dict(value))

    @property
    def class_prompts(self):
        """The class prompts as a tuple (class image j is made from entry j mod len)."""
        prompt = self.class_prompt
        return () if prompt is None else (prompt,) if isinstance(prompt, str) else tuple(prompt)


def dreambooth_flavour(settings, lora=None):
    """DreamBooth on every weight, or on a LoRA adapter when `lora` (the config's lora dict) is set."""
    return DreamBoothLoRAFlavour(settings, lora) if lora else DreamBoothFlavour(settings)


class DreamBoothFlavour(TrainingFlavour):
    """DreamBooth of every weight of the loaded model, with the IDDPM loss (see the module docstring)."""

    name = "dreambooth"
    fine_tunes_loaded_weights = True  # the subject is taught to a trained model, which also makes the class images

    def __init__(self, settings):
        self.dreambooth = DreamBoothSettings.from_config(settings)  # LoRA's are `settings`

    def build_data(self, cfg, rank, world_size, num_workers, device, load_from=None):
        dataset = _main_process_first(rank, world_size,
                                      lambda: prepare_dreambooth_data(cfg, self.dreambooth, load_from, device))
        return build_train_data(cfg, rank=rank, world_size=world_size, num_workers=num_workers, device=device,
                                dataset=dataset)

    def loss(self, model, diffusion, batch, epoch, cfg, device, vae=None, companions=None):
        """Instance loss + prior_loss_weight x class loss over the batch's instance and class samples."""
        x, y, mask, info = batch
        if "class_x" not in info:
            return super().loss(model, diffusion, batch, epoch, cfg, device, vae, companions)
        merged = {"index": torch.cat([info["index"], info["class_index"]]),
                  "img_hw": torch.cat([info["img_hw"], info["class_img_hw"]]),
                  "aspect_ratio": torch.cat([info["aspect_ratio"], info["class_aspect_ratio"]])}
        is_class = torch.cat([torch.zeros(len(x), dtype=torch.bool), torch.ones(len(x), dtype=torch.bool)])
        batch = (torch.cat([x, info["class_x"]]), torch.cat([y, info["class_caption"]]),
                 torch.cat([mask, info["class_mask"]]), merged)
        terms = self.loss_terms(model, diffusion, batch, epoch, cfg, device, vae)
        per_sample = terms["loss"]
        is_class = is_class.to(per_sample.device)
        loss = per_sample[~is_class].mean() + self.dreambooth.prior_loss_weight * per_sample[is_class].mean()
        return loss, dict(terms, is_class=is_class)


class DreamBoothLoRAFlavour(DreamBoothFlavour, LoRAFlavour):
    """DreamBooth of a LoRA adapter on the frozen loaded model: DreamBooth's data and loss, LoRA's adapter hooks
    (what trains, what is saved, the base weights' fingerprint)."""

    name = "dreambooth-lora"

    def __init__(self, settings, lora):
        LoRAFlavour.__init__(self, lora)
        DreamBoothFlavour.__init__(self, settings)


# ---------------------------------------------------------------- the data

def prepare_dreambooth_data(cfg, settings, load_from, device):
    """The DreamBoothData of a config: instance images, class images made where missing, features cached."""
    log = logging.getLogger("pixart.train")
    instance_dir = paths.dataset_dir(cfg.data_root, settings.instance_data_dir)
    instance_files = list_images(instance_dir, "the instance folder (dreambooth.instance_data_dir)")
    if not instance_files:
        raise DataError(f"the instance folder (dreambooth.instance_data_dir) {instance_dir} holds no images: expected "
                        f"image files ({', '.join(IMAGE_SUFFIXES)}) directly in it")
    tokenizer = _check_prompts(cfg, settings)
    instance_prompts = [_image_prompt(path, settings.instance_prompt, "dreambooth.instance_prompt", tokenizer)
                        for path in instance_files]
    cache = Path(settings.cache_dir) if settings.cache_dir else Path(cfg.work_dir) / CACHE_DIR
    instances = [_image_target(cfg, path) for path in instance_files]  # decodes each image: a bad one is named here
    classes, class_prompts = [], []
    if settings.with_prior_preservation:
        class_files, made = _class_images(cfg, settings, load_from, device, cache,
                                          [size for _, size, _, _ in instances])
        classes = [_image_target(cfg, path) for path in class_files]
        single = settings.class_prompt if isinstance(settings.class_prompt, str) else None
        class_prompts = [_image_prompt(path, single, "dreambooth.class_prompt", tokenizer) for path in class_files]
        log.info(f"DreamBooth: {len(class_files)} class images of {_describe_prompts(class_prompts)} in "
                 f"{class_files[0].parent} ({made} generated now)")
    captions = _t5_features(cfg, list(dict.fromkeys(instance_prompts + class_prompts)), cache, device)
    features = _vae_features(cfg, instances + classes, cache, device)

    def cached(targets, prompts, feats):
        return [CachedImage(str(path), feat, *captions[prompt], hw, ratio, bucket)
                for (path, _, hw, (ratio, bucket)), prompt, feat in zip(targets, prompts, feats, strict=True)]

    dataset = DreamBoothData(cached(instances, instance_prompts, features[:len(instances)]),
                             cached(classes, class_prompts, features[len(instances):]),
                             dataset_dir=instance_dir, multi_scale=cfg.multi_scale)
    log.info(f"DreamBooth: {len(instances)} instance images of {_describe_prompts(instance_prompts)} in "
             f"{instance_dir}; {len(dataset)} items; features cached in {cache}")
    return dataset


def _describe_prompts(prompts):
    unique = list(dict.fromkeys(prompts))
    return repr(unique[0]) if len(unique) == 1 else f"{len(unique)} prompts"


def caption_file(image_path):
    """The caption file of an image: the same name with `.txt`."""
    return Path(image_path).with_suffix(".txt")


def _image_prompt(path, default, key, tokenizer):
    """An image's prompt: its caption file's text, else `default` (the config's prompt `key`)."""
    from diffusion.pipeline import PromptError, check_prompt_length
    file = caption_file(path)
    if not file.exists():
        if default is None:
            raise DataError(f"{path} has no caption file {file.name}: with a list as {key}, every image of the class "
                            f"folder needs its own (the class images this run generates get one)")
        return default
    try:
        text = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the caption file {file}: {err}") from None
    if not text:
        raise DataError(f"the caption file {file} is empty: expected the image's prompt (or remove the file to use "
                        f"{key})")
    try:
        check_prompt_length(tokenizer, text, what=f"the caption file {file}")
    except PromptError as err:
        raise DataError(str(err)) from None
    return text


def _check_prompts(cfg, settings):
    """A prompt longer than the model's caption length is refused before anything loads (T5 would cut it); returns
    the tokenizer, for the caption files."""
    from diffusion.model.t5 import CaptionTokenizer
    from diffusion.pipeline import PromptError, check_prompt_length, t5_folder
    tokenizer = CaptionTokenizer(t5_folder(None, cfg), model_max_length=cfg.model_max_length)
    checked = [("dreambooth.instance_prompt", settings.instance_prompt)]
    if settings.with_prior_preservation:
        prompts = settings.class_prompts
        checked += [("dreambooth.class_prompt" + ("" if isinstance(settings.class_prompt, str) else f"[{i}]"), p)
                    for i, p in enumerate(prompts)]
    for key, prompt in checked:
        try:
            check_prompt_length(tokenizer, prompt, what=f"config key {key!r}")
        except PromptError as err:
            raise ConfigError(str(err)) from None
    return tokenizer


def _buckets(cfg):
    return aspect_ratio_table(cfg.aspect_ratio_type or f"ASPECT_RATIO_{cfg.image_size}")


def _image_target(cfg, path):
    """(path, training size (h, w), original (h, w), (aspect ratio for the model, bucket key)) of an image: its
    closest bucket on multi-scale models (the bucket's ratio), else image_size square (the image's own h/w)."""
    image = load_image(path)
    hw = (image.height, image.width)
    if cfg.multi_scale:
        key, size = closest_bucket(*hw, _buckets(cfg))
        return path, tuple(size), hw, (float(key), key)
    return path, (cfg.image_size, cfg.image_size), hw, (hw[0] / hw[1], "1.0")


def _class_images(cfg, settings, load_from, device, cache, instance_sizes):
    """The class image files (num_class_images of them) and how many were generated now. Class image j is made
    at instance image (j mod n)'s size from seed `seed + j`, so item j pairs images of one bucket."""
    if settings.class_data_dir:
        folder = paths.dataset_dir(cfg.data_root, settings.class_data_dir)
    else:
        key = _digest("class images", settings.class_prompt, _identity(load_from), settings.class_sampler,
                      settings.class_sampling_steps, settings.class_cfg_scale, cfg.seed, instance_sizes,
                      cfg.model_max_length, _identity(cfg.t5_pretrained), _identity(cfg.vae_pretrained))
        folder = cache / "class_images" / key
    existing = list_images(folder, "the class folder (dreambooth.class_data_dir)") if folder.exists() else []
    needed = settings.num_class_images - len(existing)
    jobs, j = [], 0
    while len(jobs) < needed:  # the names an earlier, interrupted start did not write
        if not (folder / _class_image_name(j)).exists():
            jobs.append((j, instance_sizes[j % len(instance_sizes)]))
        j += 1
    if jobs:
        _generate_class_images(cfg, settings, load_from, device, folder, jobs)
    return list_images(folder, "the class folder (dreambooth.class_data_dir)")[:settings.num_class_images], len(jobs)


def _class_image_name(j):
    return f"generated_{j:05d}.png"


def _class_prompt_of(settings, j):
    prompts = settings.class_prompts
    return prompts[j % len(prompts)]


def _generate_class_images(cfg, settings, load_from, device, folder, jobs):
    """Sample the class prompt with the base model through the shared pipeline, one PNG per job (j, (h, w))."""
    from torchvision.transforms.functional import to_pil_image

    from diffusion.pipeline import load_pipeline
    from diffusion.utils.fileio import atomic_write_text, save_png
    if not load_from:
        raise ConfigError("dreambooth.with_prior_preservation makes class images with the base model: give "
                          "--load-from CKPT (or the config's load_from)")
    logging.getLogger("pixart.train").info(
        f"DreamBooth: generating {len(jobs)} class images of {_describe_prompts(settings.class_prompts)} with "
        f"{load_from} ({settings.class_sampler}, {settings.class_sampling_steps} steps, guidance "
        f"{settings.class_cfg_scale}) into {folder}")
    # the config's encoders, which the training features come from, even when load_from is a pipeline folder
    pipe = load_pipeline(load_from, config=cfg, t5_path=cfg.t5_pretrained, vae_path=cfg.vae_pretrained, device=device)
    prompts = list(dict.fromkeys(settings.class_prompts))
    features, mask = pipe.encode(prompts)
    pipe.free_text_encoder()
    row = {prompt: i for i, prompt in enumerate(prompts)}
    by_size = {}
    for j, size in jobs:
        by_size.setdefault(tuple(size), []).append(j)
    for (height, width), numbers in by_size.items():
        for start in range(0, len(numbers), settings.sample_batch_size):
            chunk = numbers[start:start + settings.sample_batch_size]
            rows = torch.tensor([row[_class_prompt_of(settings, j)] for j in chunk], device=features.device)
            images = pipe.sample(features[rows], mask[rows], height, width,
                                 [cfg.seed + j for j in chunk], settings.class_sampler,
                                 settings.class_sampling_steps, settings.class_cfg_scale)
            for j, image in zip(chunk, images.cpu()):
                if not isinstance(settings.class_prompt, str):  # the caption first: a PNG never lacks its prompt
                    atomic_write_text(caption_file(folder / _class_image_name(j)), _class_prompt_of(settings, j))
                save_png(folder / _class_image_name(j), to_pil_image(image))
    del pipe
    _free_memory()


def _t5_features(cfg, prompts, cache, device):
    """prompt -> (caption feature (1, L, C), mask (1, L)), from the cache or computed (then cached) with T5."""
    t5_dir = _t5_dir(cfg)
    files = {p: cache / "t5" / f"{_digest('t5', p, _identity(t5_dir), cfg.model_max_length)}.npz" for p in prompts}
    load = lambda path: load_caption_feature(path, cfg.model_max_length, cfg.caption_channels)  # noqa: E731
    missing = [p for p, path in files.items() if not _readable(path, load)]
    if missing:
        from diffusion.model.t5 import T5Embedder
        t5 = T5Embedder(t5_dir, device=device, model_max_length=cfg.model_max_length)
        if t5.hidden_size != cfg.caption_channels:
            raise ConfigError(f"the T5 folder {t5_dir} (t5_pretrained) gives {t5.hidden_size}-wide caption features; "
                              f"caption_channels is {cfg.caption_channels}")
        feats, masks = t5.get_text_embeddings(missing)
        for row, prompt in enumerate(missing):
            save_caption_feature(files[prompt], feats[row:row + 1].float().cpu().numpy(),
                                 masks[row:row + 1].cpu().numpy())
        del t5
        _free_memory()
    return {p: load(path) for p, path in files.items()}  # what a resume reads too: one source, bitwise alike


def _vae_features(cfg, targets, cache, device):
    """The VAE feature (8, h/8, w/8) of each (path, size, ...) target, from the cache or computed (then cached)."""
    transform_name = cfg.data.get("transform", "default_train")
    vae_id = _identity(cfg.vae_pretrained)
    jobs = []
    for path, (height, width), _, _ in targets:
        key = _digest("vae", hashlib.sha256(Path(path).read_bytes()).hexdigest(), height, width, transform_name,
                      vae_id)
        jobs.append((path, cache / "vae" / f"{key}.npy",
                     (VAE_FEATURE_CHANNELS, height // VAE_DOWNSAMPLE, width // VAE_DOWNSAMPLE), (height, width)))
    missing = [job for job in jobs if not _readable(job[1], lambda p, shape=job[2]: load_vae_feature(p, shape))]
    if missing:
        from diffusion.pipeline import load_vae
        vae = load_vae(cfg.vae_pretrained, device)
        transform = get_transform(transform_name)
        for path, file, _, (height, width) in missing:
            image = transform(load_image(path), height, width)[None]
            save_vae_feature(file, posterior_feature(vae, image)[0].float().cpu().numpy())
        del vae
        _free_memory()
    return [load_vae_feature(file, shape) for _, file, shape, _ in jobs]


def _t5_dir(cfg):
    from diffusion.pipeline import t5_folder
    return t5_folder(None, cfg)


def _readable(path, load):
    """Whether a cache file is there and reads back as expected (a damaged one is recomputed)."""
    if not Path(path).is_file():
        return False
    try:
        load(path)
        return True
    except DataError:
        return False


def _identity(path):
    """What identifies an encoder folder or weights file cheaply: its path and its files' sizes and times."""
    if path is None:
        return None
    path = Path(path).resolve()
    if path.is_dir():
        return str(path), [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.iterdir())
                           if f.is_file()]
    if path.is_file():
        return str(path), path.stat().st_size, path.stat().st_mtime_ns
    return str(path)


def _digest(*parts):
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def _free_memory():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _main_process_first(rank, world_size, fn):
    """`fn()` on the main process (which writes the cache), then on the others (which read it); an error on the
    main process stops every rank."""
    distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:
            error = err
    if distributed:
        message = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(message, src=0)
        if rank != 0:
            if message[0] is not None:
                raise DataError(f"the main process stopped preparing the DreamBooth data: {message[0]}")
            result = fn()
    if error is not None:
        raise error
    return result
