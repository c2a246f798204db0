"""Validation grids during training: the config's `validation_prompts` sampled with the EMA weights."""
import torch
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

from diffusion.pipeline import Pipeline
from diffusion.utils.fileio import save_png


class ValidationGrids:
    """Encodes the prompts once at start-up (then frees T5); each call samples them with DPM-Solver++ (an LCM run's
    student: the lcm sampler, 4 steps, no guidance) from fixed seeds, so the grids of successive steps are
    comparable, and writes one PNG grid."""

    def __init__(self, cfg, vae, device):
        from diffusion.model.t5 import T5Embedder
        self.prompts = list(cfg.validation_prompts)
        t5 = T5Embedder(cfg.t5_pretrained, device=device, model_max_length=cfg.model_max_length)
        features, mask = t5.get_text_embeddings(self.prompts)
        self.features, self.mask = features.float(), mask
        del t5
        self.vae = vae
        self.device = torch.device(device)
        self.cfg = cfg

    def __call__(self, model, path):
        pipe = Pipeline(model, self.vae, scale_factor=self.cfg.scale_factor, device=self.device)
        size = self.cfg.image_size
        seeds = [self.cfg.seed + i for i in range(len(self.prompts))]
        sampler, steps = ("lcm", None) if self.cfg.lcm else ("dpm-solver", self.cfg.validation_steps)
        images = pipe.sample(self.features, self.mask, size, size, seeds, sampler, steps, self.cfg.cfg_scale)
        grid = make_grid(images.cpu(), nrow=min(len(self.prompts), 4), padding=2)
        return save_png(path, to_pil_image(grid))
