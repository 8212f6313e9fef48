"""Harmon (wusize/Harmon): Qwen2.5 + MAR encoder/decoder + per-token diffusion MLP + KL-16 VAE.
The registry reads :mod:`.spec`; :mod:`.model` holds the adapter."""
