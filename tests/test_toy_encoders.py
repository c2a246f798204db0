"""The toy T5's phrase training: per-token targets read from the caption grammar, and features that end up
telling which shape phrase a word belongs to (a random T5 gives a word the same feature wherever it stands)."""
import numpy as np
import pytest
import torch

from diffusion.data.toy_encoders import build_toy_t5, phrase_targets, train_toy_t5
from diffusion.data.toy_shapes import BACKGROUNDS, COLOURS, KINDS, POSITIONS, SIZES, caption, sample_scene

TWO_SHAPES = 'a large red circle on the left and a small blue square at the top right, on a gray background'


def index(table, name):
    return list(table).index(name)


def test_phrase_targets_give_each_word_the_attributes_of_its_own_shape_phrase():
    words = TWO_SHAPES.split()
    word_ids = [None] + list(range(len(words))) + [None]  # special tokens around one token per word
    targets = phrase_targets(TWO_SHAPES, word_ids)
    gray = index(BACKGROUNDS, 'gray')
    first = [index(COLOURS, 'red'), index(KINDS, 'circle'), index(SIZES, 'large'),
             index(list(POSITIONS.values()), 'left'), gray]
    second = [index(COLOURS, 'blue'), index(KINDS, 'square'), index(SIZES, 'small'),
              index(list(POSITIONS.values()), 'top right'), gray]
    none = [-100] * 4 + [gray]
    expected = [none] + [first] * 7 + [none] + [second] * 8 + [none] * 4 + [none]
    assert targets == expected
    # a word split into several tokens gives each of them its word's targets
    assert phrase_targets(TWO_SHAPES, [2, 2, 12]) == [first, first, second]


def test_phrase_targets_reject_text_outside_the_caption_grammar():
    with pytest.raises(ValueError, match='not a toy-shapes caption'):
        phrase_targets('a photo of a cat', [0, 1, 2, 3, 4])


def test_trained_t5_features_tell_which_phrase_a_word_belongs_to(tmp_path):
    from diffusion.model.t5 import T5Embedder

    captions = [caption(sample_scene(0, 'train', i)[0]) for i in range(300)]
    t5_dir = build_toy_t5(captions, tmp_path / 't5', width=32, num_layers=2, num_heads=2, vocab_size=160)
    a = 'a small red circle on the left and a large blue square on the right, on a white background'
    b = 'a small blue circle on the left and a large red square on the right, on a white background'

    def red_feature(embedder, text):
        tokens = embedder.tokenize([text])
        pieces = embedder.tokenizer.convert_ids_to_tokens(tokens['input_ids'][0])
        return embedder([text])[0][0, pieces.index('\u2581red')]

    before = T5Embedder(t5_dir, model_max_length=32)
    same_before = torch.cosine_similarity(red_feature(before, a), red_feature(before, b), dim=0)
    torch.manual_seed(0)
    accuracy = train_toy_t5(t5_dir, captions, 32, steps=150, batch_size=32, lr=3e-3, progress=False)
    assert set(accuracy) == {'colour', 'kind', 'size', 'position', 'background'}
    assert min(accuracy.values()) > 0.9, accuracy
    after = T5Embedder(t5_dir, model_max_length=32)  # reloaded: the trained weights were saved
    same_after = torch.cosine_similarity(red_feature(after, a), red_feature(after, b), dim=0)
    # "red" of the left circle and "red" of the right square: nearly one vector before, apart after
    assert same_before > 0.95 and same_after < same_before - 0.1, (same_before, same_after)


def test_the_vae_anchor_ties_latent_channels_0_to_2_to_the_pooled_image():
    from diffusion.data.toy_encoders import images_to_tensor, train_toy_vae
    from diffusion.data.toy_shapes import render_scene

    images = np.stack([np.asarray(render_scene(sample_scene(0, 'train', i)[0], 32)) for i in range(24)])
    x = images_to_tensor(images)
    pooled = torch.nn.functional.avg_pool2d(x, 8)

    def anchor_error(anchor_weight):
        vae, _ = train_toy_vae(images, steps=60, batch_size=8, anchor_weight=anchor_weight,
                               block_out_channels=(8, 8, 8, 8), progress=False)
        with torch.no_grad():
            mean = vae.encode(x).latent_dist.mean
        return float((mean[:, :3] - pooled).pow(2).mean()), float(mean[:, 3].pow(2).mean())

    anchored, free = anchor_error(10.0), anchor_error(0.0)  # a strong anchor: 60 steps are few
    # channels 0-2 nearer the pooled image, channel 3 nearer 0 (the full 1000-step build gets to an MSE of 0.03)
    assert anchored[0] < 0.6 * free[0] and anchored[1] < 0.5 * free[1], (anchored, free)


@pytest.mark.parametrize('flag, value, message', [
    ('--t5-steps', '-1', 'argument --t5-steps: expected an integer >= 0, got -1'),
    ('--threads', '0', 'argument --threads: expected an integer >= 1, got 0'),
    ('--vae-anchor', '-0.5', '--vae-anchor must be 0 or more'),
    ('--latent-gain', '0', '--latent-gain must be positive')])
def test_build_toy_encoders_rejects_out_of_range_values_by_name(flag, value, message, capsys):
    from tools import build_toy_encoders

    with pytest.raises(SystemExit) as exit_info:
        build_toy_encoders.parse_args([flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
