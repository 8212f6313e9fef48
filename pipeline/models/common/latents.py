"""Latent images as rows of patches, and the batch fields of cached VAE posteriors.

Patches: row n of ``[B, N, P]`` is the ``p×p`` patch under token n of
the raster token grid. The families' released heads lay a patch's ``P = C·p·p`` values out in two
orders: channels first (``"cpq"``: MAR/Harmon) or pixels first (``"pqc"``: Show-o2, OpenUni)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

PatchOrder = Literal["cpq", "pqc"]
_ROWS = {"cpq": (0, 2, 4, 1, 3, 5), "pqc": (0, 2, 4, 3, 5, 1)}
_IMAGE = {"cpq": (0, 3, 1, 4, 2, 5), "pqc": (0, 5, 1, 3, 2, 4)}


def patchify(latents: Tensor, patch: int, order: PatchOrder) -> Tensor:
    """[B, C, H, W] → [B, (H/p)·(W/p), C·p·p]."""
    b, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent grid {h}x{w} is not divisible by patch size {patch}")
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch).permute(*_ROWS[order])
    return x.reshape(b, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(
    rows: Tensor, channels: int, patch: int, grid: tuple[int, int], order: PatchOrder
) -> Tensor:
    """Inverse of :func:`patchify`: [B, h·w, C·p·p] → [B, C, h·p, w·p] for the token ``grid``
    (h, w)."""
    b, (h, w) = rows.shape[0], grid
    inner = (channels, patch, patch) if order == "cpq" else (patch, patch, channels)
    x = rows.reshape(b, h, w, *inner).permute(*_IMAGE[order])
    return x.reshape(b, channels, h * patch, w * patch)


LATENTS = "latents"
"""Sample key under which the loader hands a processor a cached posterior (field → tensor)."""


def image_fields(samples: Sequence[Mapping[str, Any]], prefix: str = "") -> dict[str, Tensor]:
    """The batch's image tensors: ``{prefix}pixel_values`` stacked where the samples carry pixels,
    and ``{prefix}vae_<field>`` for each field of their cached posteriors. A run uses a latent
    cache for all its samples or for none, so a batch never mixes the two."""
    out: dict[str, Tensor] = {}
    if any("pixel_values" in s for s in samples):
        out[f"{prefix}pixel_values"] = torch.stack([s["pixel_values"] for s in samples])
    cached = [s[LATENTS] for s in samples if LATENTS in s]
    if cached and len(cached) != len(samples):
        raise ValueError("a batch mixes samples with and without cached latents")
    for field in cached[0] if cached else ():
        out[f"{prefix}vae_{field}"] = torch.stack([c[field] for c in cached])
    return out


def cached_posterior(batch: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor] | None:
    """The posterior fields :func:`image_fields` put in ``batch`` under ``prefix``; None when the
    batch carries pixels to encode instead."""
    head = f"{prefix}vae_"
    fields = {k[len(head) :]: v for k, v in batch.items() if k.startswith(head)}
    return fields or None
