"""Training: one loop for every backbone and objective, its state, checkpoints and the runs it writes (VAE,
noisy classifier, latent diffusion, imported diffusers DDPM)."""
