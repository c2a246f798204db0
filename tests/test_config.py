"""The config system: released configs, `_base_` inheritance, --cfg-options, validation, read-only configs."""
import argparse
import pickle
from pathlib import Path

import pytest

from diffusion.utils.config import (
    INERT_KEYS,
    ConfigError,
    FrozenConfig,
    InertConfigKeyWarning,
    add_cfg_options_argument,
    load_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
BASE = CONFIGS / 'PixArt_xl2_internal.py'
RELEASED = CONFIGS / 'pixart_config'

# SPEC section 8: config name -> (batch per GPU, lewei_scale, model)
RELEASED_VALUES = {
    'PixArt_xl2_img256_internal.py': (176, 1.0, 'PixArt_XL_2'),
    'PixArt_xl2_img256_SAM.py': (176, 1.0, 'PixArt_XL_2'),
    'PixArt_xl2_img512_internal.py': (38, 1.0, 'PixArt_XL_2'),
    'PixArt_xl2_img512_internalms.py': (40, 1.0, 'PixArtMS_XL_2'),
    'PixArt_xl2_img1024_internal.py': (2, 2.0, 'PixArt_XL_2'),
    'PixArt_xl2_img1024_internalms.py': (12, 2.0, 'PixArtMS_XL_2'),
}


@pytest.fixture(scope='module')
def cfg256():
    return load_config(RELEASED / 'PixArt_xl2_img256_internal.py')


def write_child(tmp_path, body):
    """A config file in tmp_path that inherits the real base config by absolute path."""
    path = tmp_path / 'child.py'
    path.write_text(f"_base_ = [{str(BASE)!r}]\n{body}\n")
    return path


@pytest.mark.parametrize('name', sorted(RELEASED_VALUES))
def test_released_config_matches_spec_training_defaults(name):
    cfg = load_config(RELEASED / name)
    batch, lewei_scale, model = RELEASED_VALUES[name]
    assert cfg.train_batch_size == batch
    assert cfg.lewei_scale == lewei_scale
    assert cfg.model == model
    assert cfg.optimizer == dict(type='AdamW', lr=2e-5, weight_decay=0.03, eps=1e-10)
    assert cfg.lr_schedule == 'constant' and cfg.lr_schedule_args == dict(num_warmup_steps=1000)
    assert cfg.auto_lr == dict(rule='sqrt')
    assert cfg.gradient_clip == 0.01
    assert cfg.mixed_precision == 'fp16'
    assert cfg.grad_checkpointing is True
    assert cfg.ema_rate == 0.9999


def test_multi_scale_configs_use_the_multi_scale_dataset_and_buckets():
    for res in (512, 1024):
        cfg = load_config(RELEASED / f'PixArt_xl2_img{res}_internalms.py')
        assert cfg.multi_scale and cfg.aspect_ratio_type == f'ASPECT_RATIO_{res}'
        assert cfg.data.type == 'InternalDataMS'


def test_sam_config_lists_its_32_partitions():
    cfg = load_config(RELEASED / 'PixArt_xl2_img256_SAM.py')
    assert cfg.data.type == 'SAM' and cfg.data.root == 'SA1B'
    assert list(cfg.data.image_list_txt) == [f'part{i}.txt' for i in range(32)]


def test_base_inheritance_fills_keys_the_child_omits(cfg256):
    assert cfg256.seed == 43
    assert cfg256.scale_factor == 0.18215
    assert cfg256.resume_from == dict(checkpoint=None, load_ema=False, resume_optimizer=True,
                                      resume_lr_scheduler=True)
    assert cfg256.data.type == 'InternalData'
    assert '_base_' not in cfg256


def test_cfg_options_override_top_level_and_nested_values():
    cfg = load_config(RELEASED / 'PixArt_xl2_img256_internal.py',
                      {'train_batch_size': 4, 'optimizer.lr': 1e-4})
    assert cfg.train_batch_size == 4
    assert cfg.optimizer.lr == 1e-4
    assert cfg.optimizer.weight_decay == 0.03  # siblings of an overridden nested key survive


def test_cfg_options_can_add_a_key_the_schema_allows_to_a_dict():
    cfg = load_config(BASE, {'model_kwargs.depth': 2})
    assert cfg.model_kwargs == {'depth': 2}


def test_unknown_key_error_suggests_nearest_key(tmp_path):
    path = write_child(tmp_path, 'train_batchsize = 8')
    with pytest.raises(ConfigError, match=r"'train_batchsize'.*did you mean 'train_batch_size'") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_unknown_cfg_option_error_suggests_nearest_key():
    with pytest.raises(ConfigError, match=r"'lewei_scal' from --cfg-options; did you mean 'lewei_scale'"):
        load_config(BASE, {'lewei_scal': 2.0})


def test_wrong_type_error_names_key_value_and_expected_type(tmp_path):
    with pytest.raises(ConfigError, match=r"'train_batch_size'.*'32'.*str.*expected int"):
        load_config(write_child(tmp_path, "train_batch_size = '32'"))
    with pytest.raises(ConfigError, match=r"'grad_checkpointing'.*expected bool"):
        load_config(BASE, {'grad_checkpointing': 1})
    with pytest.raises(ConfigError, match=r"'num_epochs'.*expected int"):
        load_config(BASE, {'num_epochs': True})


def test_dotted_override_into_a_non_dict_value_is_an_error():
    with pytest.raises(ConfigError, match=r"'train_batch_size.x'.*'train_batch_size' is of type int"):
        load_config(BASE, {'train_batch_size.x': 1})


def test_int_is_accepted_for_a_float_field():
    cfg = load_config(BASE, {'gradient_clip': 1, 'cfg_scale': 4.5})
    assert cfg.gradient_clip == 1.0 and isinstance(cfg.gradient_clip, float)
    assert cfg.cfg_scale == 4.5


def test_none_default_accepts_any_type_and_lists_accept_tuples():
    cfg = load_config(BASE, {'load_from': 'ckpt.pth', 'validation_prompts': ('a cat', 'a dog')})
    assert cfg.load_from == 'ckpt.pth' and tuple(cfg.validation_prompts) == ('a cat', 'a dog')


def test_a_key_no_code_reads_warns_by_name_when_set_to_another_value(tmp_path, recwarn):
    load_config(write_child(tmp_path, "valid_num = 2000"))  # the base value: nothing to say
    assert not [w for w in recwarn if issubclass(w.category, InertConfigKeyWarning)]
    with pytest.warns(InertConfigKeyWarning, match=r"'valid_num' in .*child.py is 10, but no code reads it"):
        load_config(write_child(tmp_path, "valid_num = 10"))
    with pytest.warns(InertConfigKeyWarning, match="'s3_work_dir' from --cfg-options is 's3://x'"):
        load_config(BASE, {'s3_work_dir': 's3://x'})


def test_inert_keys_are_base_keys_that_no_code_reads():
    repo = CONFIGS.parent
    code = '\n'.join(p.read_text() for folder in ('diffusion', 'scripts', 'tools') for p in (repo / folder).rglob('*.py'))
    base = load_config(BASE)
    for key in INERT_KEYS:
        assert key in base
        assert code.count(key) == 1, f'{key} is read somewhere; take it out of INERT_KEYS'  # INERT_KEYS itself


def test_missing_config_file_error_names_the_path(tmp_path):
    with pytest.raises(ConfigError, match='nope.py'):
        load_config(tmp_path / 'nope.py')


@pytest.mark.parametrize('mutate', [
    lambda cfg: setattr(cfg, 'train_batch_size', 1),
    lambda cfg: cfg.__setitem__('train_batch_size', 1),
    lambda cfg: delattr(cfg, 'seed'),
    lambda cfg: cfg.__delitem__('seed'),
    lambda cfg: cfg.update(seed=1),
    lambda cfg: setattr(cfg.optimizer, 'lr', 1.0),
    lambda cfg: cfg.optimizer.__setitem__('lr', 1.0),
    lambda cfg: cfg.resume_from.pop('checkpoint'),
    lambda cfg: cfg.data.image_list_json.append('more.json'),
    lambda cfg: cfg.image_list_json.__setitem__(0, 'other.json'),
], ids=['attr', 'item', 'delattr', 'delitem', 'update', 'nested-attr', 'nested-item', 'nested-pop',
        'list-append', 'list-item'])
def test_mutating_a_loaded_config_raises(cfg256, mutate):
    with pytest.raises(TypeError, match='read-only after loading.*--cfg-options'):
        mutate(cfg256)
    with pytest.raises(ConfigError):
        mutate(cfg256)
    assert cfg256.to_dict() == load_config(RELEASED / 'PixArt_xl2_img256_internal.py').to_dict()


def test_to_dict_is_a_plain_mutable_copy(cfg256):
    plain = cfg256.to_dict()
    plain['optimizer']['lr'] = 1.0
    plain['image_list_json'].append('x.json')
    assert type(plain['optimizer']) is dict and type(plain['image_list_json']) is list
    assert cfg256.optimizer.lr == 2e-5 and cfg256.image_list_json == ['data_info.json']


def test_with_overrides_returns_new_config_and_leaves_original_unchanged(cfg256):
    new = cfg256.with_overrides({'optimizer.lr': 1e-3, 'seed': 0})
    assert isinstance(new, FrozenConfig) and new.filename == cfg256.filename
    assert (new.optimizer.lr, new.seed) == (1e-3, 0)
    assert (cfg256.optimizer.lr, cfg256.seed) == (2e-5, 43)
    with pytest.raises(ConfigError, match="did you mean 'seed'"):
        cfg256.with_overrides({'sead': 0})


def test_mapping_interface(cfg256):
    assert cfg256['model'] == cfg256.model == 'PixArt_XL_2'
    assert cfg256.get('no_such_key', 'default') == 'default'
    assert 'optimizer' in cfg256 and 'no_such_key' not in cfg256
    assert len(cfg256) == len(list(cfg256)) == len(cfg256.keys()) == len(dict(cfg256.items()))
    assert cfg256.filename.endswith('PixArt_xl2_img256_internal.py')
    assert 'FrozenConfig' in repr(cfg256)
    with pytest.raises(AttributeError, match='no_such_key'):
        cfg256.no_such_key


def test_dump_round_trips_through_load_config(cfg256, tmp_path):
    path = tmp_path / 'run' / 'config.py'
    cfg256.dump(path)
    assert load_config(path).to_dict() == cfg256.to_dict()
    assert "model = 'PixArt_XL_2'" in cfg256.pretty_text
    assert [p.name for p in path.parent.iterdir()] == ['config.py']  # no temp file left behind


def test_config_survives_pickling_for_dataloader_workers(cfg256):
    copy = pickle.loads(pickle.dumps(cfg256))
    assert copy == cfg256 and copy.filename == cfg256.filename and isinstance(copy, FrozenConfig)
    with pytest.raises(TypeError):
        copy.optimizer.lr = 1.0


def test_add_cfg_options_argument_parses_values_load_config_accepts():
    parser = argparse.ArgumentParser()
    parser.add_argument('config')
    add_cfg_options_argument(parser)
    args = parser.parse_args([str(BASE), '--cfg-options', 'gc_step=2', 'optimizer.lr=1e-4',
                              'mixed_precision=bf16', "image_list_json=['a.json','b.json']"])
    assert args.cfg_options == {'gc_step': 2, 'optimizer.lr': 1e-4, 'mixed_precision': 'bf16',
                                'image_list_json': ['a.json', 'b.json']}
    cfg = load_config(args.config, args.cfg_options)
    assert (cfg.gc_step, cfg.optimizer.lr, cfg.mixed_precision) == (2, 1e-4, 'bf16')
    assert parser.parse_args([str(BASE)]).cfg_options is None


def test_cfg_options_keep_spaces_in_string_values():
    parser = argparse.ArgumentParser()
    add_cfg_options_argument(parser)
    args = parser.parse_args(['--cfg-options', 'work_dir=output/my run', "image_list_json=['a b.json']"])
    assert args.cfg_options == {'work_dir': 'output/my run', 'image_list_json': ['a b.json']}


def test_cfg_options_item_without_equals_sign_is_rejected(capsys):
    parser = argparse.ArgumentParser()
    add_cfg_options_argument(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(['--cfg-options', 'train_batch_size'])
    assert 'KEY=VALUE' in capsys.readouterr().err


def test_a_dict_option_can_be_switched_off_with_none(tmp_path):
    child = tmp_path / 'child.py'
    child.write_text(f"_base_ = [{str(BASE)!r}]\nauto_lr = None\n")
    assert load_config(child).auto_lr is None
    with pytest.raises(ConfigError, match="'train_batch_size'"):
        load_config(BASE, {'train_batch_size': None})


def test_compile_key_reaches_the_model_and_model_kwargs_may_not_repeat_it():
    from diffusion.model.builder import model_kwargs_from_config
    cfg = load_config(RELEASED / 'PixArt_toy_shapes.py')
    assert cfg.compile is False and model_kwargs_from_config(cfg)['compile'] is False
    compiled = cfg.with_overrides({'compile': True})
    assert model_kwargs_from_config(compiled)['compile'] is True
    with pytest.raises(ConfigError, match=r"'model_kwargs.compile' from with_overrides\(\); it has its own config "
                                          r"key 'compile': set that instead"):
        cfg.with_overrides({'model_kwargs': dict(cfg.model_kwargs, compile=True)})
