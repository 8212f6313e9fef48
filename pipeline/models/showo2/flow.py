"""Show-o2 flow matching: time convention, timestep sampling, latent layouts, sampler grid.

Convention (``transport/path.py`` ``ICPlan``): x0 is noise, x1 the clean latent,
``x_t = t·x1 + (1−t)·x0`` and the velocity target ``u = x1 − x0``; t = 1 is clean.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from pipeline.models.common.latents import patchify, unpatchify


def resolution_shift(seq_len: int) -> float:
    """The official training shift ``exp(mu)``, mu linear in the image sequence length ``seq_len`` (visual
    tokens plus the time token, 730 at 432 px): 0.5 at 256, 1.15 at 4096."""
    slope = (1.15 - 0.5) / (4096 - 256)
    return math.exp(0.5 + slope * (seq_len - 256))


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """``transport.Transport.time_shift`` with sigma 1, written for t = 1 clean: the noise level's odds
    ``(1 − t)/t`` are multiplied by ``shift``."""
    noise_level = 1 - t
    return 1 - shift / (shift + (1 / noise_level - 1))


def sample_timesteps(
    n: int, shift: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Training timesteps: logit-normal (``snr_type: lognorm``) then shifted towards noise (``do_shift: True``)."""
    u = torch.randn(n, generator=generator, device=device)
    return shift_timesteps(torch.sigmoid(u), shift)


def sampling_grid(num_steps: int, shifting_factor: float) -> Tensor:
    """Sampler time points from 0 (noise) to 1 (clean), denser near 0 (``integrators.ode``)."""
    t = torch.linspace(0.0, 1.0, num_steps)
    return t / (t + shifting_factor - shifting_factor * t)


FlowLayout = Literal["official", "patch"]
FlowPrediction = Literal["velocity", "data"]

MIN_NOISE_LEVEL = 0.05
"""Floor of ``1 − t`` when a data prediction is turned into a velocity (JiT clips at 0.05)."""


def velocity_from_data(clean: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
    """The velocity ``u = (x1 − x_t) / (1 − t)`` that a predicted clean ``x1`` stands for (JiT, Li & He 2025).

    A data-predicting head (``flow_prediction: data``) trains on the same velocity loss; it need
    not reproduce the start noise, which ``x_t`` already holds, so a head narrower than its patch
    can learn it. ``clean`` and ``noisy`` share a layout; ``t`` has one entry per sample.
    """
    noise_level = (1 - t).clamp_min(MIN_NOISE_LEVEL).view(-1, *([1] * (clean.dim() - 1)))
    return (clean - noisy) / noise_level


def velocity_rows(latents: Tensor, patch: int, layout: FlowLayout) -> Tensor:
    """[B, C, H, W] → the flow head's output rows [B, N, p·p·C] in ``layout``."""
    return (
        to_flow_layout(latents, patch) if layout == "official" else patchify(latents, patch, "pqc")
    )


def velocity_latents(
    rows: Tensor, channels: int, size: int, patch: int, layout: FlowLayout
) -> Tensor:
    """Inverse of :func:`velocity_rows` for a square ``size``×``size`` latent."""
    if layout == "official":
        return from_flow_layout(rows, channels, size, size)
    return unpatchify(rows, channels, patch, (size // patch, size // patch), "pqc")


def to_flow_layout(latents: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] → [B, N, p·p·C] in the released flow head's output layout.

    The official code flattens the latent in raster order and cuts it into runs of p·p pixels,
    so output row n holds raster pixels n·p² … n·p²+p²−1 (not the p×p patch under token n).
    The released flow head was trained on this layout; keep it to load its weights.
    """
    b, c, h, w = latents.shape
    return latents.flatten(2).transpose(1, 2).reshape(b, (h * w) // patch**2, patch**2 * c)


def from_flow_layout(rows: Tensor, channels: int, height: int, width: int) -> Tensor:
    """Inverse of :func:`to_flow_layout`."""
    b = rows.shape[0]
    return (
        rows.reshape(b, height * width, channels)
        .transpose(1, 2)
        .reshape(b, channels, height, width)
    )
