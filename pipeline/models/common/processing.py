"""Per-sample choices shared by the family processors."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from PIL import Image


def keyed_fraction(*parts: object) -> float:
    """A uniform number in [0, 1) hashed from ``parts`` joined by ``:``: stateless, so a resumed run
    makes the same per-sample choices."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def prompt_dropped(sample: Mapping[str, Any], seed: int, probability: float) -> bool:
    """Whether a T2I sample's prompt is dropped for classifier-free guidance, keyed on its
    ``__key__`` (or prompt)."""
    if probability == 0:
        return False
    return keyed_fraction(seed, sample.get("__key__", sample["prompt"])) < probability


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → PIL images (Harmon's and OpenUni's ``clamp(127.5·x + 128, 0, 255)``)."""
    array = (
        torch.clamp(127.5 * images.float() + 128.0, 0, 255)
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in array]
