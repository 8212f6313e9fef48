"""Latent caches on the training side: the model's cache identity, and whether a run reads its
datasets' caches (format: ``data_prep.latents``; written by ``python -m data_prep encode``).

A run uses the caches when every dataset whose images the model's frozen VAE encodes has one
whose identity is the model's own (``data.latent_cache=auto``, the default). A dataset without a
cache makes the run encode on the fly (with a notice when others have one); a cache that exists
but does not match (another VAE, dtype, resolution or crop rule, or other shards) stops the run
with one line: latents of another VAE would train the model on wrong targets without a sign.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data_prep.errors import CommandError
from data_prep.latents import (
    cache_dir,
    dataset_manifest_sha256,
    identity_difference,
    identity_digest,
    read_cache_manifest,
)
from pipeline.config import ConfigError
from pipeline.models.base import MLLMAdapter

PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LatentSource:
    """What the loader needs to read cached latents instead of encoding images."""

    directories: dict[str, Path]
    """Dataset directory (as the recipe names it) → its cache directory."""
    tasks: frozenset[str]
    """Tasks whose samples carry cached latents."""
    decode_images: frozenset[str]
    """Tasks whose images are still decoded (another encoder needs the pixels)."""


def weights_sha256(module: nn.Module) -> str:
    """sha256 over every tensor of ``module``'s state dict: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def model_identity(adapter: MLLMAdapter, precision: str) -> dict[str, Any]:
    """What the latents of ``adapter``'s frozen VAE depend on (``data_prep.latents``): the weights
    as built (before any cast), the dtype training runs the VAE in, the preprocessing, the tasks."""
    vae = adapter.get_submodule(adapter.FROZEN_MODULE)
    return {
        "family": adapter.family,
        "vae": {
            "class": type(vae).__name__,
            "sha256": weights_sha256(vae),
            "dtype": str(PRECISION_DTYPES[precision]).removeprefix("torch."),
        },
        "preprocessing": adapter.processor.vae_preprocessing(),
        "tasks": sorted(adapter.LATENT_TASKS),
    }


def latent_source(
    datasets: dict[str, list[Path]],
    adapter: MLLMAdapter,
    precision: str,
    mode: str,
    notice: Callable[[str], None] | None = None,
) -> LatentSource | None:
    """The caches a run reads, or None to encode on the fly; ``datasets`` maps each enabled
    stream (task) to its dataset directories. Raises ``ConfigError`` on a mismatched cache, and
    on a missing one when ``mode`` is ``required``."""
    if mode == "off":
        return None
    tasks = frozenset(t for t in adapter.LATENT_TASKS if datasets.get(t))
    paths = list(dict.fromkeys(p for t in sorted(tasks) for p in datasets[t]))
    identity: dict[str, Any] | None = None
    found: dict[str, Path] = {}
    missing: list[Path] = []
    for path in paths:
        directory = cache_dir(path, adapter.family)
        try:
            manifest = read_cache_manifest(directory)
        except CommandError as e:
            raise ConfigError(f"data: {e}") from None
        if manifest is None:
            missing.append(path)
            continue
        identity = identity or model_identity(adapter, precision)
        if manifest.get("identity_sha256") != identity_digest(identity):
            raise ConfigError(
                f"data: {directory} was encoded for another VAE or preprocessing "
                f"({identity_difference(manifest.get('identity', {}), identity)}); encode it "
                "again (python -m data_prep encode --overwrite) or set data.latent_cache=off"
            )
        if manifest.get("dataset_manifest_sha256") != dataset_manifest_sha256(path):
            raise ConfigError(
                f"data: {directory} was encoded from other shards than {path}'s manifest lists; "
                "encode it again (python -m data_prep encode --overwrite)"
            )
        found[str(path)] = directory
    if missing:
        if mode == "required":
            raise ConfigError(
                f"data.latent_cache=required but {missing[0]} has no latent cache "
                f"({cache_dir(missing[0], adapter.family)}); run python -m data_prep encode"
            )
        if found and notice is not None:
            names = ", ".join(map(str, missing))
            notice(f"not used: {names} has no cache; every image is encoded on the fly")
        return None
    if not found:
        return None
    if notice is not None:
        notice(f"reading the VAE latents of {len(found)} dataset(s) from their caches")
    return LatentSource(found, tasks, frozenset(adapter.processor.pixels_with_latents) & tasks)
