"""T5Embedder on a tiny T5 folder (sentencepiece tokenizer + T5EncoderModel), and the caption cleaning."""
import importlib.util

import pytest
import torch

from diffusion.data.toy_encoders import build_toy_t5
from diffusion.model.t5 import T5Embedder, clean_caption

CAPTIONS = ['a red circle on the left, on a gray background', 'a large blue square at the top',
            'a small green triangle in the center and a red circle on the right, on a white background']


@pytest.fixture(scope='module')
def t5_dir(tmp_path_factory):
    return build_toy_t5(CAPTIONS, tmp_path_factory.mktemp('t5'), width=32, num_layers=1, num_heads=2, vocab_size=80)


@pytest.mark.parametrize('raw, cleaned', [
    ('A &amp;quot;Red&amp;quot; Circle!!!  on the LEFT', 'a "red" circle! on the left'),
    ('see https://example.com/x.jpg or www.foo.org now', 'see or now'),
    ('<b>bold</b> text \u2014 with \u201cquotes\u201d @user #123', 'bold text - with "quotes"'),
    ('photo IMG_1234.JPG of a cat , , ,', 'photo of a cat'),
    ('  ...hello   world...  ', 'hello world'),
    ('Caf\u00c3\u00a9 latte', 'caf\u00e9 latte'),  # mojibake fixed by ftfy
    ('50%25 off', '50% off'),
])
def test_captions_are_cleaned(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_embeddings_have_max_length_tokens_and_a_mask_of_the_real_ones(t5_dir):
    embedder = T5Embedder(t5_dir, model_max_length=40)
    features, mask = embedder.get_text_embeddings(CAPTIONS[:2])
    assert features.shape == (2, 40, 32) and features.dtype == torch.float32
    assert mask.shape == (2, 40) and mask.dtype == torch.int64
    ids = embedder.tokenizer(CAPTIONS[:2])['input_ids']
    assert max(map(len, ids)) < 40
    assert mask.sum(1).tolist() == [len(i) for i in ids]  # the real tokens, EOS included
    assert all(row[-1] == 1 for row in ids)  # T5's EOS id
    again, _ = embedder(CAPTIONS[:2])
    assert torch.equal(features, again)


def test_long_captions_are_truncated_and_captions_cleaned_first(t5_dir):
    embedder = T5Embedder(t5_dir, model_max_length=4)
    _, mask = embedder([CAPTIONS[2]])
    assert mask.tolist() == [[1, 1, 1, 1]]
    loud = embedder(['A RED circle on the LEFT!!!'])[0]
    quiet = embedder(['a red circle on the left!'])[0]
    assert torch.equal(loud, quiet)


def test_dtype_option(t5_dir):
    embedder = T5Embedder(t5_dir, model_max_length=8, torch_dtype='bf16')
    assert embedder.model.dtype == torch.bfloat16
    assert embedder(CAPTIONS[:1])[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match='unknown dtype'):
        T5Embedder(t5_dir, torch_dtype='int8')


def test_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='no config.json'):
        T5Embedder(tmp_path)


def test_texts_must_be_a_list_of_strings(t5_dir):
    with pytest.raises(TypeError, match='list of strings'):
        T5Embedder(t5_dir, model_max_length=8)('a single string')


@pytest.mark.skipif(importlib.util.find_spec('bitsandbytes') is None or not torch.cuda.is_available(),
                    reason='8-bit loading needs bitsandbytes and a CUDA device')
def test_eight_bit_loading(t5_dir):
    embedder = T5Embedder(t5_dir, device='cuda', model_max_length=8, load_in_8bit=True)
    features, _ = embedder(CAPTIONS[:1])
    assert features.shape == (1, 8, 32) and torch.isfinite(features.float()).all()
