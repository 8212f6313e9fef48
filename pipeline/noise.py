"""The random draws of a micro-step belong to its samples, not to the rank that runs them."""

from __future__ import annotations

import numpy as np
import torch


def seed_noise(generator: torch.Generator, seed: int, step: int, micro_batch: int) -> None:
    """Seed every random draw of one micro-step: ``generator`` (the model's timesteps, noise,
    masks) and the global RNG (dropout, the InfoTok reparameterisation), from (seed, step,
    micro-batch number). A micro-batch is the same samples on any number of ranks, so the same
    sample gets the same noise whatever the split of the global batch."""
    words = np.random.SeedSequence([seed, step, micro_batch]).generate_state(2, np.uint64)
    generator.manual_seed(int(words[0]) >> 1)
    torch.manual_seed(int(words[1]) >> 1)
