"""Training-time caption dropout: whole captions become the null caption `y_embedding`; masks stay."""
import torch

from diffusion.model.nets import PixArt
from tests.conftest import TINY, randomize, tiny_inputs


def model_with_dropout(prob):
    torch.manual_seed(0)
    return randomize(PixArt(**{**TINY, "class_dropout_prob": prob})).train()


def test_probability_one_replaces_every_caption_by_the_null_caption():
    model = model_with_dropout(1.0)
    _, _, y, _, _ = tiny_inputs()
    dropped = model.y_embedder(y, train=True)
    null = model.y_embedder.y_embedding.expand_as(y)
    torch.testing.assert_close(dropped, model.y_embedder.y_proj(null))


def test_probability_one_keeps_the_caption_mask():
    model = model_with_dropout(1.0)
    x, t, y, mask, _ = tiny_inputs()
    trained = model(x, t, y, mask)
    null_captions = model.y_embedder.y_embedding.expand_as(y).clone()
    model.eval()
    torch.testing.assert_close(trained, model(x, t, null_captions, mask))
    assert not torch.allclose(trained, model(x, t, null_captions, None))  # so the mask did matter


def test_probability_zero_changes_nothing():
    model = model_with_dropout(0.0)
    x, t, y, mask, _ = tiny_inputs()
    trained = model(x, t, y, mask)
    torch.testing.assert_close(trained, model.eval()(x, t, y, mask))


def test_dropout_is_per_sample_and_uses_torch_rng_on_the_caption_device():
    model = model_with_dropout(0.5)
    y = torch.randn(64, TINY["model_max_length"], TINY["caption_channels"])
    torch.manual_seed(3)
    a = model.y_embedder.token_drop(y)
    torch.manual_seed(3)
    b = model.y_embedder.token_drop(y)
    torch.testing.assert_close(a, b)
    dropped = (a == model.y_embedder.y_embedding).all(dim=(1, 2))
    kept = (a == y).all(dim=(1, 2))
    assert (dropped ^ kept).all() and 10 < dropped.sum().item() < 54


def test_forced_drop_ids_select_exactly_those_captions():
    model = model_with_dropout(0.0)
    _, _, y, _, _ = tiny_inputs()
    out = model.y_embedder.token_drop(y, force_drop_ids=torch.tensor([0, 1, 0]))
    torch.testing.assert_close(out[1], model.y_embedder.y_embedding)
    torch.testing.assert_close(out[[0, 2]], y[[0, 2]])


def test_eval_mode_never_drops():
    model = model_with_dropout(1.0).eval()
    _, _, y, _, _ = tiny_inputs()
    torch.testing.assert_close(model.y_embedder(y, train=False), model.y_embedder.y_proj(y))


def test_model_forward_takes_forced_drop_ids_instead_of_random_dropout():
    model = model_with_dropout(0.5)
    x, t, y, mask, _ = tiny_inputs()
    forced = model(x, t, y, mask, force_drop_ids=torch.tensor([0, 1, 0]))
    expected_y = y.clone()
    expected_y[1] = model.y_embedder.y_embedding
    model.eval()
    torch.testing.assert_close(forced, model(x, t, expected_y, mask))
