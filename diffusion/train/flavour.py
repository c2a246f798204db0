"""What a training flavour contributes to the shared loop: the model, what is trainable, batch -> loss, and
what is saved. Full training is the base; LoRA, DreamBooth, ControlNet and LCM override pieces of it."""
from diffusion.data.latents import posterior_feature, sample_latent
from diffusion.model.builder import VAE_DOWNSAMPLE, build_model_from_config
from diffusion.train.randomness import draw_for_samples


class TrainingFlavour:
    """Full training of every parameter with the IDDPM loss (the paper's recipe)."""

    name = "full"

    def build_model(self, cfg):
        return build_model_from_config(cfg)

    def trainable_parameters(self, model):
        return [p for p in model.parameters() if p.requires_grad]

    def latents(self, x, posterior_noise, cfg, vae):
        """Scaled latents from a batch's VAE features (mean and std) or, without features, from images."""
        if not cfg.data.get("load_vae_feat", True):
            if vae is None:
                raise ValueError("the dataset yields images (data.load_vae_feat=False) but no VAE was loaded")
            x = posterior_feature(vae, x)
        return sample_latent(x, cfg.scale_factor, noise=posterior_noise, sample_posterior=cfg.sample_posterior)

    def loss(self, model, diffusion, batch, epoch, cfg, device, vae=None):
        """Mean IDDPM loss of one micro-batch and the per-sample loss terms."""
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
                            data_info={k: data_info[k].to(device) for k in ("img_hw", "aspect_ratio")})
        terms = diffusion.training_losses(model, latent, draws.timesteps, model_kwargs, noise=draws.noise)
        return terms["loss"].mean(), terms

    def state_dict(self, model):
        """The weights a checkpoint stores under `state_dict` (everything for full training)."""
        return model.state_dict()
