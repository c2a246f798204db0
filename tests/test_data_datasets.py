"""Datasets: the round trip extract -> dataset -> batch, the item format, and the named errors for bad files."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from diffusion.data import paths
from diffusion.data.aspect_ratios import aspect_ratio_table, closest_bucket
from diffusion.data.datasets import (
    SAM,
    AspectRatioBatchSampler,
    InternalData,
    InternalDataMS,
    build_dataset,
    build_dataset_from_config,
)
from diffusion.data.errors import AnnotationError, BadRecordError, DataError
from diffusion.data.latents import posterior_feature, sample_latent
from diffusion.data.transforms import default_train
from diffusion.utils.config import load_config
from tests.conftest import REPO
from tests.data_fixtures import (
    CHANNELS,
    MAX_LENGTH,
    SIZES,
    HashTextEncoder,
    extractor,
    make_dataset,
    tiny_vae,
    write_image,
)

SD_SCALE = 0.18215


@pytest.fixture(scope='module')
def vae():
    return tiny_vae()


@pytest.fixture
def extracted(tmp_path, vae):
    """A dataset with T5 and single-size (64 px) VAE features extracted."""
    root = make_dataset(tmp_path / 'ds')
    ex, records = extractor(root, HashTextEncoder(), vae)
    ex.run(list(range(len(records))), tmp_path / 'failures.jsonl')
    return root


def internal(root, **kwargs):
    return InternalData(root, image_list_json=['data_info.json'], resolution=64, max_length=MAX_LENGTH,
                        caption_channels=CHANNELS, **kwargs)


def test_round_trip_extract_dataset_batch_gives_shapes_and_values(extracted, vae):
    dataset = internal(extracted)
    x, y, mask, info = next(iter(DataLoader(dataset, batch_size=4)))
    assert x.shape == (4, 8, 8, 8) and x.dtype == torch.float32
    assert y.shape == (4, 1, MAX_LENGTH, CHANNELS) and y.dtype == torch.float32
    assert mask.shape == (4, 1, MAX_LENGTH) and mask.dtype == torch.int64
    assert info['img_hw'].tolist() == [list(map(float, hw)) for hw in SIZES[:4]]
    assert info['aspect_ratio'].shape == (4, 1)
    torch.testing.assert_close(info['aspect_ratio'][:, 0], torch.tensor([h / w for h, w in SIZES[:4]]))
    assert info['index'].tolist() == [0, 1, 2, 3]
    # the stored feature is the posterior's mean and std of the transformed image
    image = default_train(Image.open(paths.image_path(extracted, 'set/img1.png')), 64, 64)
    torch.testing.assert_close(x[1], posterior_feature(vae, image[None])[0], atol=1e-5, rtol=1e-5)
    # caption features and mask are those of the text encoder
    feature, text_mask = HashTextEncoder()(['caption number 2'])
    torch.testing.assert_close(y[2, 0], feature[0])
    assert mask[2, 0].tolist() == text_mask[0].tolist()
    # the latent the training step samples: (mean + std * noise) * 0.18215
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    latent = sample_latent(x, SD_SCALE, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(latent, (x[:, :4] + x[:, 4:] * noise) * SD_SCALE)
    torch.testing.assert_close(sample_latent(x, SD_SCALE, noise=noise), latent)
    torch.testing.assert_close(sample_latent(x, SD_SCALE, sample_posterior=False), x[:, :4] * SD_SCALE)


def test_items_are_deterministic(extracted):
    dataset = internal(extracted)
    first, again = dataset[3], dataset[3]
    for a, b in zip(first[:3], again[:3]):
        assert torch.equal(a, b)


def test_cached_items_are_read_once_and_equal_the_uncached_ones(extracted):
    plain, cached = internal(extracted), internal(extracted, cache_items=True)
    first = [cached[i] for i in range(len(cached))]
    for record in cached.records:  # later reads come from memory: the files are no longer needed
        paths.caption_feature_path(extracted, record.path).unlink()
        paths.vae_feature_path(extracted, record.path, 64).unlink()
    for i, item in enumerate(first):
        again = cached[i]
        for a, b in zip(item[:3], again[:3]):
            assert torch.equal(a, b)
        again[3]['index'] = -1  # a caller editing its data_info does not edit the cache
        assert cached[i][3]['index'] == i
    with pytest.raises(BadRecordError, match='missing'):
        plain[0]


def test_cache_items_keeps_no_bad_record(extracted):
    missing = paths.vae_feature_path(extracted, 'set/img1.png', 64)
    content = missing.read_bytes()
    missing.unlink()
    dataset = internal(extracted, cache_items=True)
    with pytest.raises(BadRecordError, match='VAE feature file is missing'):
        dataset[1]
    assert 1 not in dataset.cached_items
    missing.write_bytes(content)  # repaired: the next read loads it
    assert torch.is_tensor(dataset[1][0]) and 1 in dataset.cached_items


def test_multi_scale_dataset_uses_buckets_and_batches_one_bucket(tmp_path, vae):
    root = make_dataset(tmp_path / 'ds')
    table = aspect_ratio_table('ASPECT_RATIO_256')
    ex, records = extractor(root, HashTextEncoder(), vae, image_size=256, buckets='ASPECT_RATIO_256')
    ex.run(list(range(len(records))), tmp_path / 'f.jsonl')
    dataset = InternalDataMS(root, image_list_json=['data_info.json'], resolution=256, max_length=MAX_LENGTH,
                             caption_channels=CHANNELS)
    assert dataset.bucket_keys == [closest_bucket(h, w, table)[0] for h, w in SIZES]
    sampler = AspectRatioBatchSampler(dataset.bucket_keys, batch_size=2, num_replicas=1, rank=0, seed=1,
                                      drop_last=False)
    batches = list(DataLoader(dataset, batch_sampler=sampler))
    assert len(batches) == 4  # buckets 1.0 (2 records), 0.5 (2), 2.0 (1), 1.13 (1)
    for x, _, _, info in batches:
        key = dataset.bucket_keys[int(info['index'][0])]
        h, w = table[key]
        assert x.shape[1:] == (8, h // 8, w // 8)
        assert torch.all(info['aspect_ratio'] == float(key))
        for i, index in enumerate(info['index'].tolist()):
            assert info['img_hw'][i].tolist() == list(map(float, SIZES[index]))


def test_raw_mode_returns_normalised_images_and_encodes_captions(tmp_path):
    root = make_dataset(tmp_path / 'ds')
    encoder = HashTextEncoder()
    dataset = InternalDataMS(root, image_list_json=['data_info.json'], resolution=256, load_vae_feat=False,
                             load_t5_feat=False, text_encoder=encoder)
    x, y, mask, info = dataset[1]  # 48 x 96: bucket 0.5 of the 256 table
    h, w = aspect_ratio_table('ASPECT_RATIO_256')['0.5']
    assert x.shape == (3, h, w) and x.min() >= -1 and x.max() <= 1
    assert y.shape == (1, MAX_LENGTH, CHANNELS) and mask.shape == (1, MAX_LENGTH) and encoder.calls == 1
    assert info['img_hw'].tolist() == [48.0, 96.0] and info['aspect_ratio'].item() == 0.5


def test_raw_captions_need_a_text_encoder(tmp_path):
    root = make_dataset(tmp_path / 'ds')
    with pytest.raises(ValueError, match='text_encoder'):
        internal(root, load_t5_feat=False)


# ---------------------------------------------------------------- named errors

def test_missing_feature_names_the_file_and_the_record(extracted):
    missing = paths.caption_feature_path(extracted, 'set/img2.png')
    missing.unlink()
    with pytest.raises(BadRecordError, match=r'record 2 \(partition/data_info.json record 2\)') as err:
        internal(extracted)[2]
    assert str(missing) in str(err.value) and 'missing' in str(err.value)


def test_truncated_npz_names_the_file(extracted):
    path = paths.caption_feature_path(extracted, 'set/img0.png')
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(BadRecordError, match='corrupt or truncated T5 feature file') as err:
        internal(extracted)[0]
    assert str(path) in str(err.value) and err.value.index == 0


def test_vae_feature_of_another_size_is_an_error(extracted):
    path = paths.vae_feature_path(extracted, 'set/img3.png', 64)
    np.save(path, np.zeros((8, 4, 4), dtype=np.float32))
    with pytest.raises(BadRecordError, match=r'shape \(8, 4, 4\), expected \(8, 8, 8\)'):
        internal(extracted)[3]


def test_corrupt_image_names_the_file_and_the_record(tmp_path):
    root = make_dataset(tmp_path / 'ds')
    image = paths.image_path(root, 'set/img4.png')
    image.write_bytes(image.read_bytes()[:60])
    dataset = internal(root, load_vae_feat=False, load_t5_feat=False, text_encoder=HashTextEncoder())
    with pytest.raises(BadRecordError, match='corrupt or unreadable image') as err:
        dataset[4]
    assert str(image) in str(err.value) and 'record 4' in str(err.value)


def test_image_whose_size_disagrees_with_its_annotation_is_an_error(tmp_path):
    root = make_dataset(tmp_path / 'ds')
    annotation = paths.annotation_path(root, 'data_info.json')
    items = json.loads(annotation.read_text())
    items[0].update(height=32, ratio=0.5)
    annotation.write_text(json.dumps(items))
    dataset = internal(root, load_vae_feat=False, load_t5_feat=False, text_encoder=HashTextEncoder())
    with pytest.raises(BadRecordError, match='64x64 .* annotation says 32x64'):
        dataset[0]


@pytest.mark.parametrize('text, message', [
    ('[{"path": "a.png", "prompt": "x", "height": 8, "width": 8}', 'not valid JSON'),
    ('{"path": "a.png"}', 'expected a list of records'),
    ('[{"path": "a.png", "prompt": "x", "height": "tall", "width": 8}]', "record 0: field 'height' must be a positive"),
    ('[{"path": "a.png", "prompt": "x", "width": 8}]', "record 0: field 'height' is missing"),
    ('[{"path": "../a.png", "prompt": "x", "height": 8, "width": 8}]', "record 0: field 'path'"),
    ('[{"path": "a.png", "prompt": "x", "height": 8, "width": 16, "ratio": 2.0}]', "field 'ratio' is 2.0"),
    ('[{"path": "a.png", "prompt": "x", "height": 8, "width": 8}, {"path": "a.jpg", "prompt": "y", '
     '"height": 8, "width": 8}]', "would share the feature files of 'a'"),
])
def test_malformed_annotation_names_the_file_and_field(tmp_path, text, message):
    annotation = paths.annotation_path(tmp_path, 'data_info.json')
    annotation.parent.mkdir(parents=True)
    annotation.write_text(text)
    with pytest.raises(AnnotationError, match=message) as err:
        InternalData(tmp_path, image_list_json=['data_info.json'])
    assert 'data_info.json' in str(err.value)


# ---------------------------------------------------------------- SAM and the builder

def test_sam_reads_partitions_captions_and_image_sizes(tmp_path):
    root = tmp_path / 'SA1B'
    write_image(paths.image_path(root, 'sa_1.jpg'), 40, 56, seed=0)
    write_image(paths.image_path(root, 'sa_2.jpg'), 64, 64, seed=1)
    paths.caption_text_path(root, 'sa_1.jpg').parent.mkdir(parents=True)
    paths.caption_text_path(root, 'sa_1.jpg').write_text('a street at night\n')
    partition = paths.annotation_path(root, 'part0.txt')
    partition.parent.mkdir(parents=True)
    partition.write_text('sa_1\nsa_2.jpg\n\n')
    dataset = SAM(root, image_list_txt=['part0.txt'], resolution=64, load_vae_feat=False, load_t5_feat=False,
                  text_encoder=HashTextEncoder())
    assert len(dataset) == 2
    x, y, _, info = dataset[0]
    assert x.shape == (3, 64, 64) and info['img_hw'].tolist() == [40.0, 56.0]
    torch.testing.assert_close(y[0], HashTextEncoder()(['a street at night'])[0][0])
    with pytest.raises(BadRecordError, match=r'part0.txt line 2\).*sa_2.txt: caption file is missing'):
        dataset[1]


def test_build_dataset_from_the_toy_config(tmp_path, vae):
    make_dataset(tmp_path / 'toy_shapes')
    cfg = load_config(REPO / 'configs/pixart_config/PixArt_toy_shapes.py',
                      {'data_root': str(tmp_path), 'caption_channels': CHANNELS, 'model_max_length': MAX_LENGTH})
    dataset = build_dataset_from_config(cfg)
    assert isinstance(dataset, InternalData) and len(dataset) == len(SIZES) and dataset.resolution == 64
    with pytest.raises(KeyError, match="did you mean 'InternalDataMS'"):
        build_dataset({'type': 'InternalDataM', 'root': 'x'})
    with pytest.raises(TypeError, match=r"takes no argument\(s\) \['colour'\]"):
        build_dataset({**cfg.data, 'colour': 'red'}, data_root=str(tmp_path))


# ---------------------------------------------------------------- a dataset too small to train on

def annotated(root, num_records, sizes=((64, 64),)):
    """A dataset folder whose annotation lists `num_records` records (no image or feature files: building the
    training data reads none)."""
    items = [{'path': f'set/img{i}.png', 'prompt': f'caption {i}', 'height': sizes[i % len(sizes)][0],
              'width': sizes[i % len(sizes)][1]} for i in range(num_records)]
    annotation = paths.annotation_path(root, 'data_info.json')
    annotation.parent.mkdir(parents=True)
    annotation.write_text(json.dumps(items))
    return annotation


def training_data(tmp_path, world_size=1, **overrides):
    from diffusion.train.data import build_train_data
    cfg = load_config(REPO / 'configs/pixart_config/PixArt_toy_shapes.py',
                      {'data_root': str(tmp_path), 'data.root': 'ds', **overrides})
    return build_train_data(cfg, rank=0, world_size=world_size, num_workers=0, device='cpu')


def test_an_empty_dataset_is_a_data_error_naming_its_annotation_file(tmp_path):
    annotation = annotated(tmp_path / 'ds', 0)
    with pytest.raises(DataError, match='has no records: nothing to train on') as err:
        training_data(tmp_path)
    assert str(annotation) in str(err.value)


def test_a_batch_larger_than_the_dataset_names_records_and_batch(tmp_path):
    annotation = annotated(tmp_path / 'ds', 6)
    with pytest.raises(DataError, match=r'has 6 records, fewer than one optimizer step of 8 \(train_batch_size 8 '
                                        r'x 1 rank\(s\) x 1 accumulation step\(s\)\)') as err:
        training_data(tmp_path, train_batch_size=8)
    assert str(annotation) in str(err.value)


def test_the_batch_must_fit_once_per_rank_and_accumulation_step(tmp_path):
    annotated(tmp_path / 'ds', 6)
    assert len(training_data(tmp_path, world_size=1, train_batch_size=4).batch_sampler) == 1
    with pytest.raises(DataError, match=r'step of 8 \(train_batch_size 4 x 2 rank\(s\) x 1'):
        training_data(tmp_path, world_size=2, train_batch_size=4)
    with pytest.raises(DataError, match=r'step of 8 \(train_batch_size 4 x 1 rank\(s\) x 2 accumulation'):
        training_data(tmp_path, train_batch_size=4, gradient_accumulation_steps=2)


def test_multi_scale_batches_must_fit_in_one_bucket(tmp_path):
    annotated(tmp_path / 'ds', 6, sizes=((64, 64), (32, 128)))  # two buckets of 3 records
    with pytest.raises(DataError, match=r'has 6 records in 2 aspect-ratio buckets \(the largest holds 3\), fewer '
                                        r'than one optimizer step of 4'):
        training_data(tmp_path, train_batch_size=4, **{'data.type': 'InternalDataMS', 'image_size': 256})
