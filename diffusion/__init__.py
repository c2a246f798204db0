"""PixArt-alpha: Diffusion Transformers for text-to-image synthesis (models, diffusion, data, utilities)."""
