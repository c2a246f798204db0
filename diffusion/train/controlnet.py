"""ControlNet training (PIXART-delta) on the shared loop: the `--load-from` model frozen, trainable copies of its
first `copy_blocks_num` blocks (`build_controlnet`), the batch's condition feature as the control latent `c`.

Switched on by the config key `controlnet = True` (`copy_blocks_num`, `control_condition` say which copies and
which condition features `tools/extract_features.py` wrote). What differs from the reference's
train_controlnet.py: `class_dropout_prob` reaches the model and the loss (the reference's 0.5 never did), every
sample keeps its own img_hw and aspect ratio (the reference gave all 1024 x 1024, ratio 1), and the copies are
gradient-checkpointed with `grad_checkpointing` like the base blocks (the reference ran them without).

Checkpoints hold the full released layout (`base_model.*` and `controlnet.*`), so one file loads into inference
(`ControlPixArtHalf.load_weights`) and resumes alone; the frozen base costs disk space, not correctness.
"""
import torch

from diffusion.data.latents import sample_latent
from diffusion.model.builder import build_controlnet
from diffusion.train.flavour import TrainingFlavour
from diffusion.train.randomness import sample_seed


def condition_noise(indices, epoch, seed, shape, device):
    """Per-sample noise for sampling the condition's posterior, from (seed, epoch, record) like every other
    training draw (`diffusion.train.randomness`), on a stream of its own."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(sample_seed(f"{seed}/condition", epoch, i)))
             for i in torch.as_tensor(indices).tolist()]
    return torch.stack(noise).to(device)


class ControlNetFlavour(TrainingFlavour):
    """Train only the ControlNet branch of a ControlPixArtHalf / ControlPixArtMSHalf over the loaded base."""

    name = "controlnet"

    def wrap_model(self, model, cfg):
        # called after the --load-from weights are in: the copies start from the pretrained blocks
        return build_controlnet(model, cfg.copy_blocks_num)

    def trainable_parameters(self, model):
        return list(model.controlnet.parameters())

    def extra_model_kwargs(self, batch, epoch, cfg, device):
        """`c`: the batch's condition features sampled (mean + std * noise, per-sample seeded) and scaled like the
        latents."""
        data_info = batch[3]
        if "condition" not in data_info:
            raise KeyError("the batch has no 'condition' feature: build the dataset with control_condition "
                           "(config controlnet=True)")
        feature = data_info["condition"].to(device)
        noise = condition_noise(data_info["index"], epoch, cfg.seed, (feature.shape[1] // 2, *feature.shape[-2:]),
                                device)
        return {"c": sample_latent(feature, cfg.scale_factor, noise=noise, sample_posterior=cfg.sample_posterior)}
