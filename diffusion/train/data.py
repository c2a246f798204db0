"""Everything a training run reads: the dataset, its resumable distributed batch sampler and loader, the VAE
(only when the dataset yields images rather than VAE features) and the validation-grid sampler."""
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from diffusion.data.datasets.builder import build_dataset_from_config
from diffusion.data.datasets.batch_sampler import build_batch_sampler
from diffusion.train.checks import check_dataset_fills_a_step


@dataclass
class TrainData:
    dataset: object
    batch_sampler: object  # set_epoch(epoch, start_batch=k) picks the epoch and resumes at this rank's batch k
    loader: DataLoader
    vae: object = None
    visualizer: object = None


def build_train_data(cfg, rank, world_size, num_workers, device, dataset=None):
    """The `TrainData` of `dataset` (a flavour's own, e.g. DreamBooth's), else of the config's `data`."""
    dataset = build_dataset_from_config(cfg) if dataset is None else dataset
    check_dataset_fills_a_step(dataset, cfg, world_size)
    batch_sampler = build_batch_sampler(dataset, cfg.train_batch_size, num_replicas=world_size, rank=rank,
                                        shuffle=True, seed=cfg.seed, drop_last=True,
                                        accumulation=cfg.gradient_accumulation_steps)
    # Starting an iterator draws the workers' base seed from `generator`; from the global RNG, which dropout in the
    # step uses, that draw would shift the global stream of a run resumed in mid-epoch against the uninterrupted one.
    loader = DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers,
                        pin_memory=torch.device(device).type == "cuda",
                        generator=torch.Generator().manual_seed(cfg.seed + rank))
    vae = None
    if not cfg.data.get("load_vae_feat", True) or (cfg.eval_interval and cfg.validation_prompts):
        from diffusion.pipeline import load_vae
        vae = load_vae(cfg.vae_pretrained, device)  # a pipeline folder's vae/, or the released one fetched if missing
    visualizer = None
    if cfg.eval_interval and cfg.validation_prompts:
        from diffusion.train.visualize import ValidationGrids
        visualizer = ValidationGrids(cfg, vae, device)
    return TrainData(dataset, batch_sampler, loader, vae if not cfg.data.get("load_vae_feat", True) else None,
                     visualizer)
