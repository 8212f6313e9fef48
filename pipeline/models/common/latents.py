"""Latent images as rows of patches: row n of ``[B, N, P]`` is the ``p×p`` patch under token n of
the raster token grid. The families' released heads lay a patch's ``P = C·p·p`` values out in two
orders: channels first (``"cpq"``: MAR/Harmon) or pixels first (``"pqc"``: Show-o2, OpenUni)."""

from __future__ import annotations

from typing import Literal

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
