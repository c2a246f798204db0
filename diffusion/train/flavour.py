"""What a training flavour contributes to the shared loop (`diffusion/train/core.py`): the data, the model, what is
trainable, the modules the loss needs besides the model, batch -> loss, and what a checkpoint stores. Full
training is the base class; LoRA, DreamBooth, ControlNet and LCM override pieces of it, never the loop."""
from diffusion.data.latents import posterior_feature, sample_latent
from diffusion.model.builder import build_model_from_config
from diffusion.release import VAE_DOWNSAMPLE
from diffusion.train.data import build_train_data
from diffusion.train.randomness import draw_for_samples
from diffusion.utils.checkpoint import load_state_dict_into


class TrainingFlavour:
    """Full training of every parameter with the IDDPM loss (the paper's recipe).

    The core calls the hooks in this order: `build_data`; `build_model`, then the `--load-from` weights, then
    `wrap_model`; on resume `load_weights` (the model's, then its EMA's and averaged copies'); `averaged_copies` and
    `frozen_modules`; `trainable_parameters` (after FSDP has wrapped the model, before DDP wraps it); `loss` for
    every micro-batch; on save `weights_to_save` (of the model, its EMA and every averaged copy) and `extra_state`,
    on resume `load_extra_state`. The core keeps the model's EMA (`state_dict_ema`), updates every averaged copy
    after each optimizer step (gathering FSDP shards; only trainable parameters change) and saves and resumes them
    with the run.

    What each flavour overrides:
    - LoRA (`diffusion/train/lora.py`): `wrap_model` (adapters into the loaded model, every base weight frozen),
      `trainable_parameters` (the adapters), `weights_to_save` / `load_weights` (the adapters only; the base comes
      from `--load-from` again), `extra_state` (the adapter's shape and the base weights' fingerprint).
    - DreamBooth (`diffusion/train/dreambooth.py`): `build_data` (the instance images and, with prior preservation,
      class images generated before training by the base model, features cached; every item pairs an instance
      image with a class image, so every batch holds both), `loss` (instance loss plus `prior_loss_weight` x class
      loss, split by the mark each sample carries); with LoRA also LoRA's hooks.
    - ControlNet: `wrap_model` (one module: the loaded base, frozen, and a trainable copy of its first blocks with
      zero-initialised projections, copied after the base's weights are in), `trainable_parameters` (the copy),
      `extra_model_kwargs` (the batch's control latent passed to the model as `c`); it saves the full released
      layout (`diffusion/train/controlnet.py`).
    - LCM distillation (`diffusion/train/lcm.py`): `frozen_modules` (the teacher: the `--load-from` weights read
      from their file, not copied from the model, so that a resumed run does not take the student for it),
      `averaged_copies` (the target network, an EMA of the student at `ema_decay`), `loss` (the consistency loss:
      the teacher's guided DDIM step from `diffusion`'s alphas, the target network's prediction there, a
      pseudo-Huber distance), `extra_state` (the teacher's fingerprint); with LoRA also LoRA's hooks.
    """

    name = "full"  # written into checkpoints; a resume under another flavour is refused
    fine_tunes_loaded_weights = False  # True: a run needs --load-from (or load_from), resumes included

    def build_data(self, cfg, rank, world_size, num_workers, device, load_from=None):
        """The dataset, its resumable batch sampler and loader (a `TrainData`). `load_from`: the weights the run
        starts from (`--load-from`), for data the base model makes (DreamBooth's class images)."""
        return build_train_data(cfg, rank=rank, world_size=world_size, num_workers=num_workers, device=device)

    def build_model(self, cfg):
        """The architecture; `--load-from` weights are loaded into what this returns."""
        return build_model_from_config(cfg)

    def wrap_model(self, model, cfg):
        """The module that is trained, built around the model once its `--load-from` weights are in."""
        return model

    def trainable_parameters(self, model):
        """What the optimizer updates."""
        return [p for p in model.parameters() if p.requires_grad]

    def averaged_copies(self, cfg):
        """name -> rate of EMA copies of the model besides `state_dict_ema` that the loss uses (none here)."""
        return {}

    def frozen_modules(self, cfg, device, load_from=None):
        """name -> module the loss uses and nobody trains, rebuilt at every start, never saved (none here).
        `load_from`: the weights the run starts from (`--load-from`), e.g. a teacher's."""
        return {}

    def latents(self, x, posterior_noise, cfg, vae):
        """Scaled latents from a batch's VAE features (mean and std) or, without features, from images."""
        if not cfg.data.get("load_vae_feat", True):
            if vae is None:
                raise ValueError("the dataset yields images (data.load_vae_feat=False) but no VAE was loaded")
            x = posterior_feature(vae, x)
        return sample_latent(x, cfg.scale_factor, noise=posterior_noise, sample_posterior=cfg.sample_posterior)

    def loss(self, model, diffusion, batch, epoch, cfg, device, vae=None, companions=None):
        """Mean IDDPM loss of one micro-batch and the per-sample loss terms. `companions` maps the names of
        `averaged_copies` and `frozen_modules` to their modules."""
        terms = self.loss_terms(model, diffusion, batch, epoch, cfg, device, vae)
        return terms["loss"].mean(), terms

    def loss_terms(self, model, diffusion, batch, epoch, cfg, device, vae=None):
        """The IDDPM loss terms of each sample of a batch (x, y, mask, data_info), its randomness drawn from
        (seed, epoch, data_info['index'])."""
        x, y, mask, data_info = batch
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        if cfg.data.get("load_vae_feat", True):
            latent_shape = (x.shape[1] // 2, *x.shape[-2:])
        else:
            latent_shape = (vae.config.latent_channels, *(s // VAE_DOWNSAMPLE for s in x.shape[-2:]))
        draws = draw_for_samples(data_info["index"], epoch, cfg.seed, latent_shape,
                                 diffusion.num_timesteps, cfg.class_dropout_prob, device)
        latent = self.latents(x, draws.posterior_noise, cfg, vae)
        model_kwargs = dict(y=y, mask=mask, force_drop_ids=draws.drop,
                            data_info={k: data_info[k].to(device) for k in ("img_hw", "aspect_ratio")},
                            **self.extra_model_kwargs(batch, epoch, cfg, device))
        return diffusion.training_losses(model, latent, draws.timesteps, model_kwargs, noise=draws.noise)

    def extra_model_kwargs(self, batch, epoch, cfg, device):
        """What the loss passes to the model besides the latents, captions and micro-conditions (nothing here)."""
        return {}

    def weights_to_save(self, state_dict):
        """The part of a full state dict of the model (or of its EMA or an averaged copy) that a checkpoint stores
        (all of it here)."""
        return state_dict

    def load_weights(self, model, state_dict, source):
        """Put weights as `weights_to_save` wrote them back into the model (or a copy of it), strictly."""
        load_state_dict_into(model, state_dict, source=source)

    def extra_state(self):
        """Whatever else of this flavour a resume needs, as tensors and plain values (nothing here)."""
        return {}

    def load_extra_state(self, state):
        """Restore what `extra_state` returned."""


def flavour_from_config(cfg):
    """The flavour a config asks for: LCM distillation when `lcm` is set (`diffusion/train/lcm.py`; LCM-LoRA when
    `lora` is set too), DreamBooth when `dreambooth` is set (`diffusion/train/dreambooth.py`; with a LoRA adapter
    when `lora` is set too), LoRA when `lora` is set (`diffusion/train/lora.py`), ControlNet when `controlnet` is
    set (`diffusion/train/controlnet.py`), else full training."""
    from diffusion.utils.config import ConfigError
    if cfg.get("controlnet") and (cfg.get("dreambooth") or cfg.get("lora") or cfg.get("lcm")):
        raise ConfigError("controlnet=True trains the ControlNet copies of a frozen base; it does not combine with "
                          "dreambooth or lora, nor with lcm (set those to None / False, or controlnet=False)")
    if cfg.get("lcm"):
        if cfg.get("dreambooth"):
            raise ConfigError("lcm=True distils the --load-from model on the config's data; it does not combine with "
                              "dreambooth (set dreambooth=None, or lcm=False)")
        from diffusion.train.lcm import LCMFlavour, LCMLoRAFlavour
        return LCMLoRAFlavour(cfg.lora) if cfg.get("lora") else LCMFlavour()
    if cfg.get("dreambooth"):
        from diffusion.train.dreambooth import dreambooth_flavour
        return dreambooth_flavour(cfg.dreambooth, cfg.get("lora"))
    if cfg.get("lora"):
        from diffusion.train.lora import LoRAFlavour
        return LoRAFlavour(cfg.lora)
    if cfg.get("controlnet"):
        from diffusion.train.controlnet import ControlNetFlavour
        return ControlNetFlavour()
    return TrainingFlavour()
