"""Feature extraction: resume, sharding, failures that do not stop the run, multi-scale sizes, the CLI."""
import json

import numpy as np
import pytest

from diffusion.data import paths
from diffusion.data.aspect_ratios import aspect_ratio_table, closest_bucket
from diffusion.data.errors import DataError
from diffusion.data.extract import shard_indices
from diffusion.data.feature_io import load_vae_feature
from tests.data_fixtures import SIZES, HashTextEncoder, extractor, make_dataset, tiny_vae, write_image


@pytest.fixture(scope='module')
def vae():
    return tiny_vae()


def feature_files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob('*') if p.suffix in ('.npz', '.npy'))


def test_resume_skips_finished_files(tmp_path, vae):
    root = make_dataset(tmp_path / 'ds')
    ex, records = extractor(root, HashTextEncoder(), vae)
    first = ex.run([0, 1, 2], tmp_path / 'f.jsonl')
    assert first.counts['t5'].written == 3 and first.counts['vae'].written == 3
    done = paths.vae_feature_path(root, records[0].path, 64)
    stamp = done.stat().st_mtime_ns
    encoder = HashTextEncoder()
    ex, _ = extractor(root, encoder, vae)
    second = ex.run(list(range(len(records))), tmp_path / 'f.jsonl')
    assert second.counts['t5'].skipped == 3 and second.counts['t5'].written == len(records) - 3
    assert second.counts['vae'].skipped == 3 and second.counts['vae'].written == len(records) - 3
    assert done.stat().st_mtime_ns == stamp
    assert not list(root.rglob('*.tmp'))  # atomic writes leave no temp files


def test_verify_existing_redoes_damaged_files(tmp_path, vae):
    root = make_dataset(tmp_path / 'ds')
    ex, records = extractor(root, HashTextEncoder(), vae)
    ex.run([0, 1], tmp_path / 'f.jsonl')
    paths.caption_feature_path(root, records[1].path).write_bytes(b'not a zip')
    ex, _ = extractor(root, HashTextEncoder(), vae, verify_existing=True)
    summary = ex.run([0, 1], tmp_path / 'f.jsonl')
    assert (summary.counts['t5'].skipped, summary.counts['t5'].written) == (1, 1)


def test_sharded_extraction_covers_every_record_exactly_once(tmp_path, vae):
    n, world = len(SIZES), 4
    shards = [shard_indices(n, 0, None, rank, world) for rank in range(world)]
    assert sorted(i for shard in shards for i in shard) == list(range(n))
    assert shard_indices(10, 2, 8, 1, 3) == [3, 6]
    root = make_dataset(tmp_path / 'ds')
    written = 0
    for rank, shard in enumerate(shards):
        ex, _ = extractor(root, HashTextEncoder(), vae)
        summary = ex.run(shard, paths.failures_path(root, rank, world))
        written += summary.counts['t5'].written
        assert summary.counts['t5'].skipped == 0
    assert written == n and len(feature_files(root)) == 2 * n
    with pytest.raises(ValueError, match='rank 4 of 4'):
        shard_indices(n, 0, None, 4, 4)


def test_a_corrupt_image_is_reported_and_the_run_goes_on(tmp_path, vae):
    root = make_dataset(tmp_path / 'ds')
    bad = paths.image_path(root, 'set/img2.png')
    bad.write_bytes(b'\x89PNG garbage')
    ex, records = extractor(root, HashTextEncoder(), vae)
    failures_file = tmp_path / 'failures.jsonl'
    summary = ex.run(list(range(len(records))), failures_file)
    assert summary.counts['vae'].written == len(records) - 1 and summary.counts['vae'].failed == 1
    listed = [json.loads(line) for line in failures_file.read_text().splitlines()]
    assert listed == [{'index': 2, 'source': 'partition/data_info.json record 2', 'image': 'set/img2.png',
                       'feature': 'vae', 'error': listed[0]['error']}]
    assert str(bad) in listed[0]['error'] and 'failed' in summary.text()
    # once the image is fixed, a rerun does the missing record only and clears the failure list
    write_image(bad, *SIZES[2], seed=2)
    summary = ex.run(list(range(len(records))), failures_file)
    assert summary.counts['vae'].written == 1 and not failures_file.exists()


def test_multi_scale_features_have_their_bucket_size(tmp_path, vae):
    root = make_dataset(tmp_path / 'ds')
    table = aspect_ratio_table('ASPECT_RATIO_256')
    ex, records = extractor(root, None, vae, image_size=256, buckets='ASPECT_RATIO_256')
    summary = ex.run(list(range(len(records))), tmp_path / 'f.jsonl')
    assert summary.counts['vae'].written == len(records) and summary.counts['t5'].written == 0
    for record, (h, w) in zip(records, SIZES):
        bh, bw = closest_bucket(h, w, table)[1]
        feature = load_vae_feature(paths.vae_feature_path(root, record.path, 256, multi_scale=True))
        assert feature.shape == (8, bh // 8, bw // 8)
        assert (feature[4:] > 0).all()  # the std half is positive


def test_features_can_be_stored_in_float16(tmp_path, vae):
    root = make_dataset(tmp_path / 'ds', sizes=SIZES[:2])
    ex, records = extractor(root, HashTextEncoder(), vae, feature_dtype=np.float16)
    ex.run([0, 1], tmp_path / 'f.jsonl')
    with np.load(paths.caption_feature_path(root, records[0].path)) as npz:
        assert npz['caption_feature'].dtype == np.float16 and npz['attention_mask'].dtype == np.int64


@pytest.mark.parametrize('tool', ['extract_features', 'make_toy_dataset', 'build_toy_encoders', 'eval_toy_alignment'])
def test_every_flag_is_documented_in_help(tool, capsys):
    import importlib
    module = importlib.import_module(f'tools.{tool}')
    parser = module.build_parser()
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(['--help'])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for action in parser._actions:
        assert action.help and len(action.help) > 10, f'{action.option_strings or action.dest} has no help'
        for option in action.option_strings:
            assert option in text


# ---------------------------------------------------------------- a disk that cannot take the files

def disk_full_after(limit, real):
    """A numpy writer that writes `limit` files, then half of the next one and fails as a full disk does."""
    import errno
    import os
    calls = []

    def write(f, *args, **kwargs):
        calls.append(1)
        if len(calls) <= limit:
            return real(f, *args, **kwargs)
        f.write(b'half a feature file')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def test_a_full_disk_stops_extraction_naming_the_file_and_leaves_no_partial_file(tmp_path, vae, monkeypatch):
    from diffusion.data.extract import FeatureWriteError
    root = make_dataset(tmp_path / 'ds')
    ex, records = extractor(root, None, vae)
    monkeypatch.setattr(np, 'save', disk_full_after(2, np.save))
    with pytest.raises(FeatureWriteError) as err:
        ex.run(list(range(len(records))), tmp_path / 'f.jsonl')
    third = paths.vae_feature_path(root, records[2].path, 64)
    assert str(err.value) == (f'cannot write {third}: No space left on device; the 2 feature file(s) written before '
                              'it are complete and kept (a rerun skips them)')
    assert feature_files(root) == [p.relative_to(root).as_posix() for p in
                                   (paths.vae_feature_path(root, r.path, 64) for r in records[:2])]
    assert not list(root.rglob('*.tmp')) and not list(root.rglob('.*'))
    monkeypatch.undo()
    summary = ex.run(list(range(len(records))), tmp_path / 'f.jsonl')  # the rerun resumes
    assert (summary.counts['vae'].skipped, summary.counts['vae'].written) == (2, len(records) - 2)


def test_a_read_only_folder_stops_extraction_naming_the_file(tmp_path, monkeypatch):
    import errno
    import tempfile
    root = make_dataset(tmp_path / 'ds')
    ex, records = extractor(root, HashTextEncoder(), None)

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system', str(dir))

    monkeypatch.setattr(tempfile, 'mkstemp', read_only)
    with pytest.raises(DataError, match=f'cannot write {paths.caption_feature_path(root, records[0].path)}: '
                                        'Read-only file system; the 0 feature file'):
        ex.run([0, 1], tmp_path / 'f.jsonl')
    assert feature_files(root) == []


def test_the_tool_reports_a_full_disk_in_one_line(tiny_pipeline, monkeypatch, capsys):
    from tools import extract_features
    monkeypatch.setattr(np, 'savez', disk_full_after(0, np.savez))
    root, config = tiny_pipeline
    with pytest.raises(SystemExit) as exit_info:
        extract_features.main([str(config), '--skip-vae', '--no-progress', '--threads', '1'])
    message = str(exit_info.value.code)
    assert message.startswith(f'error: cannot write {root / "toy"}') and message.endswith(
        '.npz: No space left on device; the 0 feature file(s) written before it are complete and kept (a rerun '
        'skips them)')
    assert not list((root / 'toy').rglob('*.npz')) and not list((root / 'toy').rglob('*.tmp'))
