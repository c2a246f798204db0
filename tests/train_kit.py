"""Helpers of the training tests (tests/test_train.py and the flavours' tests): a tiny precomputed-feature dataset,
one in-process run, and exact comparisons of checkpoints. Their fixtures (dataset_root, train_config,
fresh_accelerate_state) are in conftest.py."""
import json

import torch

from diffusion.data import paths
from diffusion.data.feature_io import save_caption_feature, save_vae_feature
from diffusion.train.core import TrainOptions, train
from diffusion.utils.checkpoint import read_checkpoint
from diffusion.utils.config import load_config
from tests.conftest import REPO, TINY

NUM_RECORDS = 24
TRAIN_SCRIPT = REPO / "scripts" / "train.py"


def make_feature_dataset(root, num_records=NUM_RECORDS, seed=0):
    """Records whose latents depend on their caption (a learnable mapping), with T5/VAE feature files."""
    gen = torch.Generator().manual_seed(seed)
    L, C = TINY["model_max_length"], TINY["caption_channels"]
    records = []
    for i in range(num_records):
        rel = f"shapes/img_{i:03d}.png"
        caption = torch.randn(1, L, C, generator=gen)
        mask = torch.zeros(1, L, dtype=torch.long)
        mask[0, : 3 + i % (L - 3)] = 1
        mean = caption[0, :4, :8].reshape(4, 1, 8).expand(4, 8, 8).clone() * 0.5
        std = torch.full((4, 8, 8), 0.05)
        save_caption_feature(paths.caption_feature_path(root, rel), caption.numpy(), mask.numpy())
        save_vae_feature(paths.vae_feature_path(root, rel, 64), torch.cat([mean, std]).numpy())
        records.append({"path": rel, "prompt": f"record {i}", "height": 64, "width": 64, "ratio": 1.0})
    annotation = paths.annotation_path(root, "data_info.json")
    annotation.parent.mkdir(parents=True, exist_ok=True)
    annotation.write_text(json.dumps(records))
    return root


def run(config_path, work_dir, overrides=None, flavour=None, **options):
    cfg = load_config(config_path, overrides)
    return train(cfg, TrainOptions(work_dir=str(work_dir), report_to="none", **options), flavour)


def final_state(result):
    return read_checkpoint(result.last_checkpoint)


def assert_states_equal(a, b, atol=0.0):
    for key in ("state_dict", "state_dict_ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=atol, msg=f"{key}.{name}")
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for idx in opt_a:
        for field in opt_a[idx]:
            torch.testing.assert_close(torch.as_tensor(opt_a[idx][field]), torch.as_tensor(opt_b[idx][field]),
                                       rtol=0, atol=atol, msg=f"optimizer state {idx}.{field}")
