"""The T5 text encoder (`T5Embedder`), its tokenizer alone (`CaptionTokenizer`) and the caption cleaning applied
before tokenisation (SPEC section 7).

The encoder is read from a local folder laid out like `t5-v1_1-xxl` (tokenizer files + `T5EncoderModel`
weights), or from a diffusers pipeline folder (its `tokenizer/` and `text_encoder/`). The released folder's
conventional place (output/pretrained_models/t5_ckpts) downloads itself when it is missing (diffusion.model_zoo);
any other folder must be on disk. The toy encoder of `tools/build_toy_encoders.py` is such a folder too.
"""
import html
import re
import urllib.parse
import warnings
from pathlib import Path

import ftfy
import torch
from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

from diffusion.release import DTYPES, T5_TOKENS

# ---------------------------------------------------------------- caption cleaning
_URL = re.compile(r'\b(?:https?://|ftp://|www\.)\S+', re.IGNORECASE)
_DOMAIN = re.compile(r'\b[\w-]+(?:\.[\w-]+)*\.(?:com|net|org|io|co|ru|de|uk|jp|cn|info|html?|php)(?:/\S*)?\b',
                     re.IGNORECASE)
_MENTION = re.compile(r'(?<!\w)@[\w.]+')
_FILE_NAME = re.compile(r'\b[\w-]+\.(?:jpe?g|png|gif|webp|bmp|tiff?|svg|mp4|pdf|zip)\b', re.IGNORECASE)
_NUMBER_TAG = re.compile(r'#\d+\b')
_DASHES = re.compile('[\u2010-\u2015\u2212\u2e3a\u2e3b\ufe58\ufe63\uff0d]')
_DOUBLE_QUOTES = re.compile('[\u201c\u201d\u201e\u201f\u00ab\u00bb\u2033\u301d\u301e\uff02]')
_SINGLE_QUOTES = re.compile('[\u2018\u2019\u201a\u201b\u2032\u0060\u00b4]')
_REPEATED_PUNCT = re.compile(r'([!?.,;:\-_*~=+])(?:\s*\1)+')  # "!!!" -> "!", ", ," -> ","
_SPACE_BEFORE_PUNCT = re.compile(r'\s+([,.;:!?])')
_SPACES = re.compile(r'\s+')
_EDGE_JUNK = ' \t\n-_*~.,;:|/\\'  # quotes stay: they may be balanced


def clean_caption(text):
    """Normalise a caption the way the released models' captions were: fix mojibake (ftfy), unescape HTML
    entities and drop tags, lowercase, drop urls, @mentions, file names and '#123' tags, unify quotes and
    dashes, collapse repeated punctuation and whitespace, and trim punctuation from the ends."""
    text = ftfy.fix_text(str(text))
    text = urllib.parse.unquote(text)  # '%20' and friends from scraped alt texts
    text = html.unescape(html.unescape(text))  # twice: '&amp;quot;' is common in scraped captions
    if '<' in text and '>' in text:
        with warnings.catch_warnings():  # a caption is not a file name; bs4 warns when it looks like one
            warnings.simplefilter('ignore', MarkupResemblesLocatorWarning)
            text = BeautifulSoup(text, 'html.parser').get_text(' ')
    text = text.lower()
    text = _URL.sub(' ', text)
    text = _FILE_NAME.sub(' ', text)  # before domains: 'photo.png' is not a site
    text = _DOMAIN.sub(' ', text)
    text = _MENTION.sub(' ', text)
    text = _NUMBER_TAG.sub(' ', text)
    text = _DASHES.sub('-', text)
    text = _DOUBLE_QUOTES.sub('"', text)
    text = _SINGLE_QUOTES.sub("'", text)
    text = _REPEATED_PUNCT.sub(r'\1', text)
    text = _SPACE_BEFORE_PUNCT.sub(r'\1', text)
    text = _SPACES.sub(' ', text)
    return text.strip(_EDGE_JUNK)


# ---------------------------------------------------------------- encoder

def resolve_dtype(dtype, device):
    """A torch dtype from 'fp32'/'fp16'/'bf16' (or a torch dtype); None means bf16 on CUDA, fp32 elsewhere."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == 'cuda' else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f'unknown dtype {dtype!r}; expected one of {", ".join(sorted(DTYPES))}')
    return DTYPES[dtype]


def t5_parts(local_dir):
    """(encoder folder, tokenizer folder) of a T5 folder (both itself) or of a diffusers pipeline folder
    (`text_encoder/`, `tokenizer/`); the released folder is fetched first when it is missing from its place."""
    from diffusion.model_zoo import fetch_conventional
    from diffusion.utils.diffusers_interop import pipeline_part

    local_dir = Path(fetch_conventional(local_dir))
    encoder, tokenizer = pipeline_part(local_dir, 'text_encoder'), pipeline_part(local_dir, 'tokenizer')
    if encoder is not None and tokenizer is not None:
        return encoder, tokenizer
    return local_dir, local_dir


class CaptionTokenizer:
    """The tokenizer of a local T5 folder applied as T5Embedder applies it (captions cleaned, special tokens added,
    padded and truncated to `model_max_length`), without the encoder weights: cheap enough to check prompts
    before any model loads. `token_count(text)` is what a caption needs untruncated."""

    def __init__(self, local_dir, model_max_length=T5_TOKENS, clean_captions=True):
        from transformers import AutoTokenizer

        self.local_dir, self.tokenizer_dir = t5_parts(local_dir)
        if not (self.local_dir / 'config.json').is_file():
            raise FileNotFoundError(f'T5 folder {self.local_dir} has no config.json: expected a local T5 encoder '
                                    'folder such as t5-v1_1-xxl (tokenizer files, config.json and weights) or a '
                                    'diffusers pipeline folder (tokenizer/ and text_encoder/)')
        if model_max_length < 1:
            raise ValueError(f'model_max_length must be >= 1, got {model_max_length}')
        self.model_max_length = model_max_length
        self.clean_captions = clean_captions
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir, local_files_only=True)

    def _cleaned(self, texts):
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f'texts must be a list of strings, got {texts!r:.200}')
        return [clean_caption(t) for t in texts] if self.clean_captions else list(texts)

    def tokenize(self, texts):
        """Token ids and attention mask (B, L) of the (cleaned) texts."""
        return self.tokenizer(self._cleaned(texts), max_length=self.model_max_length, padding='max_length',
                              truncation=True, add_special_tokens=True, return_attention_mask=True,
                              return_tensors='pt')

    def token_count(self, text):
        """The tokens (EOS included) the cleaned `text` needs; more than `model_max_length` are cut by `tokenize`."""
        ids = self.tokenizer(self._cleaned([text])[0], add_special_tokens=True, truncation=False, verbose=False)
        return len(ids['input_ids'])


class T5Embedder(CaptionTokenizer):
    """T5 encoder features of captions: `get_text_embeddings(texts)` (also `embedder(texts)`) returns
    `(caption_features (B, L, C), attention_mask (B, L))` with L = `model_max_length` tokens (special tokens
    added, padded, truncated), on `device`.

    `local_dir`: a folder with the tokenizer (`spiece.model` + `tokenizer_config.json`, or `tokenizer.json`)
    and a `T5EncoderModel` (`config.json` + weights), e.g. output/pretrained_models/t5_ckpts/t5-v1_1-xxl, or a
    diffusers pipeline folder holding them in `tokenizer/` and `text_encoder/`.
    `torch_dtype`: 'fp32', 'fp16', 'bf16' or None (bf16 on CUDA, fp32 otherwise). `load_in_8bit`: quantise
    the encoder with bitsandbytes (CUDA only). `clean_captions`: apply `clean_caption` first.
    """

    def __init__(self, local_dir, device='cpu', torch_dtype=None, model_max_length=T5_TOKENS, load_in_8bit=False,
                 clean_captions=True):
        from transformers import T5EncoderModel

        super().__init__(local_dir, model_max_length=model_max_length, clean_captions=clean_captions)
        local_dir = self.local_dir
        self.device = torch.device(device)
        self.dtype = resolve_dtype(torch_dtype, self.device)
        if load_in_8bit:
            self.model = T5EncoderModel.from_pretrained(
                local_dir, local_files_only=True, quantization_config=_eight_bit_config(),
                device_map={'': self.device}, dtype=self.dtype)
        else:
            self.model = T5EncoderModel.from_pretrained(local_dir, local_files_only=True, dtype=self.dtype)
            self.model.to(self.device)
        self.model.eval().requires_grad_(False)

    @property
    def hidden_size(self):
        """C, the width of the caption features."""
        return self.model.config.d_model

    @torch.no_grad()
    def get_text_embeddings(self, texts):
        tokens = self.tokenize(texts)
        ids = tokens['input_ids'].to(self.device)
        mask = tokens['attention_mask'].to(self.device)
        features = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return features, mask

    __call__ = get_text_embeddings


def _eight_bit_config():
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ImportError('load_in_8bit=True needs the bitsandbytes package (pip install bitsandbytes) '
                          'and a CUDA device') from err
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_8bit=True)
