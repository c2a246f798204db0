"""Config values are checked where they enter (config files, --cfg-options, with_overrides()): ranges, the keys of
nested dicts against the base config's `_dict_keys_`, combinations, and what training needs beyond that."""
import inspect
from pathlib import Path

import pytest

from diffusion.data.datasets import DATASETS, InternalData
from diffusion.model.builder import MODELS, model_kwargs_from_config
from diffusion.model.nets import PixArt
from diffusion.train.checks import check_training_config
from diffusion.train.optim import LR_SCHEDULES, OPTIMIZERS
from diffusion.utils.config import INERT_KEYS, VALUE_RULES, ConfigError, Schema, load_config

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'
BASE = CONFIGS / 'PixArt_xl2_internal.py'
TOY = CONFIGS / 'pixart_config' / 'PixArt_toy_shapes.py'


@pytest.fixture(scope='module')
def schema():
    return Schema.from_file(BASE)


def write_child(tmp_path, body):
    path = tmp_path / 'child.py'
    path.write_text(f"_base_ = [{str(BASE)!r}]\n{body}\n")
    return path


def refused(overrides, config=TOY):
    """The message of the ConfigError that `overrides` draw."""
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides)
    return str(err.value)


# ---------------------------------------------------------------- every config loads

@pytest.mark.parametrize('path', sorted(CONFIGS.rglob('*.py')), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_under_configs_loads(path):
    assert load_config(path).filename == str(path)


# ---------------------------------------------------------------- silently wrong values

def test_negative_gradient_clip_is_refused():
    message = refused({'gradient_clip': -1.0})
    assert "'gradient_clip' is -1.0; expected None or a number >= 0 (None or 0: no clipping)" in message
    assert 'from --cfg-options' in message


def test_zero_or_none_gradient_clip_switches_clipping_off():
    assert load_config(TOY, {'gradient_clip': 0}).gradient_clip == 0.0
    assert load_config(TOY, {'gradient_clip': None}).gradient_clip is None


def test_class_dropout_prob_must_be_a_probability():
    assert "'class_dropout_prob' is 2.0; expected a number in [0, 1]" in refused({'class_dropout_prob': 2.0})
    assert load_config(TOY, {'class_dropout_prob': 1.0}).class_dropout_prob == 1.0


def test_negative_keep_last_n_is_refused():
    assert "'keep_last_n' is -1; expected None or at least 0" in refused({'keep_last_n': -1})
    assert load_config(TOY, {'keep_last_n': 0}).keep_last_n == 0


def test_typo_in_lr_schedule_args_names_the_dotted_key_and_the_file(tmp_path):
    path = write_child(tmp_path, 'lr_schedule_args = dict(num_warmup_step=100)')
    with pytest.raises(ConfigError, match=r"unknown config key 'lr_schedule_args.num_warmup_step' in .*child.py; "
                                          r"did you mean 'lr_schedule_args.num_warmup_steps'\?"):
        load_config(path)


def test_value_set_in_a_file_names_the_file(tmp_path):
    path = write_child(tmp_path, 'ema_rate = 1.5')
    with pytest.raises(ConfigError, match=r"'ema_rate' is 1.5; expected a number in \[0, 1\)") as err:
        load_config(path)
    assert f'set in {path}' in str(err.value)


def test_with_overrides_checks_values_too():
    cfg = load_config(TOY)
    with pytest.raises(ConfigError, match=r"'seed' is -1; expected at least 0; set from with_overrides\(\)"):
        cfg.with_overrides({'seed': -1})
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr' from with_overrides\(\)"):
        cfg.with_overrides({'optimizer.lrr': 1e-4})


# ---------------------------------------------------------------- named errors instead of tracebacks

def test_typo_in_optimizer_suggests_the_key():
    assert "unknown config key 'optimizer.lrr' from --cfg-options; did you mean 'optimizer.lr'?" in refused(
        {'optimizer.lrr': 1e-4})


def test_typo_in_model_kwargs_suggests_the_key():
    assert "'model_kwargs.hiden_size' from --cfg-options; did you mean 'model_kwargs.hidden_size'" in refused(
        {'model_kwargs.hiden_size': 64})


def test_model_kwargs_may_not_set_a_key_that_has_its_own_config_key():
    assert "it has its own config key 'class_dropout_prob'" in refused({'model_kwargs.class_dropout_prob': 0.2})


def test_data_none_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"'data' in .*child.py is None; expected a dict"):
        load_config(write_child(tmp_path, 'data = None'))


def test_data_without_a_type_is_refused():
    assert "'data.type' is missing from --cfg-options; expected one of 'InternalData'" in refused(
        {'data': {'root': 'x'}})


def test_negative_num_workers_is_refused():
    assert "'num_workers' is -1; expected at least 0" in refused({'num_workers': -1})


@pytest.mark.parametrize('size', [0, -16, 40])
def test_image_size_must_be_a_positive_multiple_of_vae_factor_times_patch(size):
    assert f"'image_size' is {size}; expected a multiple of 16 (VAE factor 8 x patch size 2), at least 16" in \
        refused({'image_size': size})


def test_image_size_follows_the_patch_size_of_model_kwargs():
    assert "'image_size' is 48; expected a multiple of 32 (VAE factor 8 x patch size 4)" in refused(
        {'image_size': 48, 'model_kwargs.patch_size': 4})


def test_unknown_types_suggest_the_registered_ones():
    assert "'data.type' is 'InternalDat'; expected one of 'InternalData', 'InternalDataMS', 'SAM' (did you mean " \
           "'InternalData'" in refused({'data.type': 'InternalDat'})
    assert "'optimizer.type' is 'Adam'" in refused({'optimizer.type': 'Adam'})
    assert "'model' is 'PixArt_XL'" in refused({'model': 'PixArt_XL'})
    assert "'lr_schedule' is 'cosin'; expected one of 'constant', 'cosine'" in refused({'lr_schedule': 'cosin'})


def test_a_key_of_another_dataset_type_says_which_type_takes_it():
    assert "unknown config key 'data.image_list_txt' from --cfg-options; only SAM takes it" in refused(
        {'data.image_list_txt': ['part0.txt']})


def test_came_needs_its_eps_pair():
    assert "'optimizer.eps' is 1e-08; expected a pair (eps1, eps2)" in refused({'optimizer.type': 'CAME'})
    cfg = load_config(TOY, {'optimizer': dict(type='CAME', lr=1e-4, eps=(1e-30, 1e-16))})
    assert cfg.optimizer.type == 'CAME'


def test_nested_values_are_range_checked():
    assert "'optimizer.lr' is 0; expected a number > 0" in refused({'optimizer.lr': 0})
    assert "'lr_schedule_args.num_warmup_steps' is 2.5; expected an integer, at least 0" in refused(
        {'lr_schedule_args.num_warmup_steps': 2.5})
    assert "'auto_lr.rule' is 'log'; expected one of 'sqrt', 'linear'" in refused({'auto_lr': dict(rule='log')})


def test_resume_from_may_not_ask_for_a_partial_resume():
    assert "'resume_from.load_ema' is True; expected False" in refused({'resume_from.load_ema': True})


def test_snr_loss_and_min_snr_gamma_exclude_each_other():
    assert "'min_snr_gamma' is 0.07; expected None when snr_loss=True" in refused({'snr_loss': True})


def test_learn_sigma_needs_pred_sigma():
    assert "'learn_sigma' is True; expected False when pred_sigma=False" in refused({'pred_sigma': False})
    assert load_config(TOY, {'pred_sigma': False, 'learn_sigma': False}).pred_sigma is False


# ---------------------------------------------------------------- what training needs beyond a valid config

@pytest.mark.parametrize('overrides, message', [
    ({'model': 'PixArt_XL_2', 'model_kwargs': dict(depth=4)}, "'model_kwargs.depth' is 4; expected 28"),
    ({'data.load_t5_feat': False}, "'data.load_t5_feat' is False; expected True for training"),
    ({'data.transform': 'flip'}, "'data.transform' is 'flip'; expected one of ['default_train']"),
    ({'model': 'PixArtMS', 'multi_scale': True, 'aspect_ratio_type': 'ASPECT_RATIO_256'},
     "'data.type' is 'InternalData'; expected 'InternalDataMS' when multi_scale=True"),
])
def test_training_refuses_what_it_cannot_run(overrides, message):
    with pytest.raises(ConfigError) as err:
        check_training_config(load_config(TOY, {'mixed_precision': 'no', **overrides}))
    assert message in str(err.value)


# ---------------------------------------------------------------- the schema is true to the code

def test_schema_types_are_the_code_registries(schema):
    assert set(schema.choices('data')[1]) == set(DATASETS)
    assert set(schema.choices('optimizer')[1]) == set(OPTIMIZERS)
    assert set(schema.choices('lr_schedule_args')[1]) == set(LR_SCHEDULES)
    assert set(schema.choices('model_kwargs')[1]) == set(MODELS)


def test_data_keys_are_the_constructor_arguments_a_config_sets(schema):
    derived = {'self', 'kwargs', 'data_root', 'text_encoder', 'resolution', 'max_length', 'caption_channels',
               'aspect_ratio_type', 'control_condition'}  # given by build_dataset_from_config or its caller
    base_arguments = set(inspect.signature(InternalData.__init__).parameters)  # subclasses pass them on
    lists = {cls.annotation_list_key for cls in DATASETS.values()}
    for name, cls in DATASETS.items():
        other_lists = lists - {cls.annotation_list_key}  # SAM inherits the base data dict's image_list_json
        arguments = (set(inspect.signature(cls.__init__).parameters) | base_arguments) - derived - other_lists
        assert set(schema.choices('data')[1][name]) - other_lists == arguments, name


def test_model_kwargs_keys_are_the_network_arguments_without_a_config_key(schema):
    cfg = load_config(TOY)
    own_keys = (set(model_kwargs_from_config(cfg)) - set(cfg.model_kwargs)) | {'grad_checkpointing', 'fp32_attention',
                                                                               'gc_step'}  # build_model's
    arguments = set(inspect.signature(PixArt.__init__).parameters) - {'self'} - own_keys
    for name, keys in schema.choices('model_kwargs')[1].items():
        assert set(keys) == arguments, name


def test_every_value_rule_names_a_key_of_the_schema(schema):
    for key in VALUE_RULES:
        top, _, sub = key.partition('.')
        assert top in schema.types, key
        if sub:
            per, choices = schema.choices(top)
            keys = {k for ks in choices.values() for k in ks} if per else set(
                schema.dict_keys.get(top) or schema.defaults[top])
            assert sub in keys, key


def test_every_base_key_was_given_a_check(schema):
    """Each key of the base config has a range rule, is inert, is a dict whose keys are checked, selects such
    keys, is checked in combination, or is one whose type says all (a flag, a path or a name)."""
    selectors = {schema.choices(k)[0] for k in schema.dict_keys} - {None}
    combined = {'image_size', 'multi_scale', 'snr_loss', 'pred_sigma', 'learn_sigma', 'lora'}  # lora: LoraSettings
    typed_only = {'data_root', 'use_fsdp', 'fp32_attention', 'compile', 'grad_checkpointing', 'sample_posterior',
                  'vae_pretrained', 't5_pretrained'}
    dicts = {k for k, t in schema.types.items() if t is dict}
    covered = set(VALUE_RULES) | set(INERT_KEYS) | selectors | combined | typed_only | dicts
    assert set(schema.types) - covered == set()


def test_a_lora_typo_fails_at_load_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"lora\.rnak.*did you mean 'rank'"):
        load_config(TOY, {'lora': {'rnak': 4}})
    with pytest.raises(ConfigError, match=r"lora\.dropout.*1\.5"):
        load_config(TOY, {'lora': {'rank': 4, 'dropout': 1.5}})
