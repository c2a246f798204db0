"""Feature paths are defined once; bucket tables match the release; transforms keep aspect ratios."""
import json
from pathlib import Path

import pytest
from PIL import Image

from diffusion.data import paths
from diffusion.data.aspect_ratios import TABLES_FILE, aspect_ratio_table, closest_bucket, table_names
from diffusion.data.datasets import InternalData, InternalDataMS
from diffusion.data.transforms import default_train
from tests.conftest import SHARED_REF
from tests.data_fixtures import CHANNELS, MAX_LENGTH, HashTextEncoder, extractor, make_dataset, tiny_vae


def test_extracted_features_are_where_the_datasets_read_them(tmp_path):
    root = make_dataset(tmp_path / 'ds', subdir='deep/er')
    vae = tiny_vae()
    for image_size, buckets in ((64, None), (256, 'ASPECT_RATIO_256')):
        ex, records = extractor(root, HashTextEncoder(), vae, image_size=image_size, buckets=buckets)
        ex.run(list(range(len(records))), tmp_path / 'failures.jsonl')
    options = dict(image_list_json=['data_info.json'], max_length=MAX_LENGTH, caption_channels=CHANNELS)
    single = InternalData(root, resolution=64, **options)
    multi = InternalDataMS(root, resolution=256, **options)
    for dataset in (single, multi):
        for index, record in enumerate(dataset.records):
            assert dataset.caption_feature_path(record) == paths.caption_feature_path(root, record.path)
            x = dataset[index][0]  # reads both feature files
            assert x.shape[1:] == tuple(s // 8 for s in dataset.target_size(index))
    assert single.vae_feature_path(records[0]) != multi.vae_feature_path(records[0])


def test_feature_stems_keep_sub_folders():
    root = Path('/d')
    assert paths.caption_feature_path(root, 'a/b/x.png') == root / 'caption_feature_wmask/a/b/x.npz'
    assert paths.vae_feature_path(root, 'a/b/x.png', 256) == root / 'img_vae_feature/train_vae_256/noflip/a/b/x.npy'
    assert paths.vae_feature_path(root, 'x.jpg', 512, True) == root / 'img_vae_feature/train_vae_512_ms/noflip/x.npy'
    # the reference flattened a_b/x and a/b_x to the same name; here they stay apart
    assert paths.caption_feature_path(root, 'a_b/x.png') != paths.caption_feature_path(root, 'a/b_x.png')


def test_bucket_tables_are_the_released_ones():
    ours = json.loads(TABLES_FILE.read_text())
    reference = SHARED_REF / 'aspect_ratios.json'
    if reference.is_file():
        assert ours == json.loads(reference.read_text())
    for size in (256, 512, 1024):
        assert len(aspect_ratio_table(f'ASPECT_RATIO_{size}')) == 40
        assert len(aspect_ratio_table(f'ASPECT_RATIO_{size}_TEST')) == 33
        for key, (h, w) in aspect_ratio_table(f'ASPECT_RATIO_{size}').items():
            # divisible by VAE (8) x patch (2); ratio key = h / w to two decimals
            assert h % 16 == 0 and w % 16 == 0 and abs(h / w - float(key)) < 0.05 * float(key)
    assert aspect_ratio_table('ASPECT_RATIO_1024')['1.0'] == (1024, 1024)
    assert set(table_names()) == set(ours)
    with pytest.raises(KeyError, match='ASPECT_RATIO_1024'):
        aspect_ratio_table('ASPECT_RATIO_2048')


@pytest.mark.parametrize('height, width', [(1024, 768), (768, 1024), (500, 2000), (3000, 500), (1080, 1920)])
def test_images_go_to_the_bucket_of_closest_ratio(height, width):
    table = aspect_ratio_table('ASPECT_RATIO_1024')
    key, size = closest_bucket(height, width, table)
    best = min(abs(float(k) - height / width) for k in table)
    assert abs(float(key) - height / width) == best and size == table[key]


def test_transform_covers_the_bucket_without_distorting():
    # a 100 x 300 image of a left third red, the rest blue: at bucket 64 x 128 the crop keeps the red edge
    image = Image.new('RGB', (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 100))
    x = default_train(image, 64, 128)
    assert x.shape == (3, 64, 128) and x.min() >= -1 and x.max() <= 1
    red_columns = (x[0, 32] > 0.5).sum().item()
    # resized to 64 x 192 (scale 0.64), cropped 32 columns each side: red keeps 64*... = 64 - 32 = 32 columns
    assert abs(red_columns - 32) <= 1
