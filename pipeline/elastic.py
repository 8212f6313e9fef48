"""How a run's global batch is split into ranks x accumulation x micro-batch, on a fresh start
and on a resume that may run on another number of ranks than the checkpoint was written with.

A run keeps its global batch (samples per optimizer step, per stream) for its whole life: on a
resume the accumulation is recomputed for the new number of ranks, the micro-batch per rank
stays. When the checkpoint's global batch cannot be split over the new ranks, the resume is
refused with one line, unless ``allow_global_batch_change`` lets the recipe's batch take over.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError
from pipeline.data import STREAMS
from pipeline.recipe import TrainConfig, grad_accum_for


@dataclass(frozen=True)
class BatchSplit:
    """The split of this start; ``changes`` says, for the log, what differs from the checkpoint."""

    world_size: int
    grad_accum: int
    global_batch: dict[str, int]  # samples per optimizer step, per enabled stream
    saved_world_size: int | None = None  # None: a fresh start
    changes: str | None = None

    @property
    def total(self) -> int:
        return sum(self.global_batch.values())

    @property
    def resharded(self) -> bool:
        """True when the checkpoint was written by another number of ranks."""
        return self.saved_world_size not in (None, self.world_size)


def global_batch_of(cfg: TrainConfig, world_size: int, grad_accum: int) -> dict[str, int]:
    return {
        s: cfg.data.micro_batch(s) * world_size * grad_accum
        for s in STREAMS
        if cfg.data.micro_batch(s) > 0
    }


def _describe(batch: Mapping[str, int]) -> str:
    return " + ".join(f"{n} {s}" for s, n in batch.items())


def _accum_keeping(cfg: TrainConfig, world_size: int, batch: Mapping[str, int]) -> int | None:
    """The accumulation that gives ``batch`` on ``world_size`` ranks, or None if none does."""
    if set(batch) != set(global_batch_of(cfg, world_size, 1)):
        return None
    accums = set()
    for stream, n in batch.items():
        accum, rest = divmod(n, cfg.data.micro_batch(stream) * world_size)
        if rest or accum == 0:
            return None
        accums.add(accum)
    return accums.pop() if len(accums) == 1 else None


def split_batch(
    cfg: TrainConfig, world_size: int, saved: Mapping[str, Any] | None, where: str = ""
) -> BatchSplit:
    """The split for a start on ``world_size`` ranks; ``saved`` is the checkpoint's trainer
    state (None on a fresh start). Raises ConfigError with one line when it cannot be kept."""
    recipe_accum = grad_accum_for(cfg, world_size)
    recipe_batch = global_batch_of(cfg, world_size, recipe_accum)
    if saved is None:
        return BatchSplit(world_size, recipe_accum, recipe_batch)
    saved_world, saved_accum = int(saved["world_size"]), int(saved["grad_accum"])
    saved_batch = dict(saved["loader"]["global_batch"])
    explicit = cfg.data.global_batch
    accum = _accum_keeping(cfg, world_size, saved_batch)
    if explicit is not None and explicit != sum(saved_batch.values()):
        accum = None  # the recipe asks for another global batch than the run had
    was = f"{saved_world} rank(s) x {saved_accum} accumulation"
    if accum is not None:
        changes = None
        if (saved_world, saved_accum) != (world_size, accum):
            changes = (
                f"ranks {saved_world} -> {world_size}, gradient accumulation {saved_accum} -> "
                f"{accum}; global batch kept ({_describe(saved_batch)} per step)"
            )
        return BatchSplit(world_size, accum, saved_batch, saved_world, changes)
    if cfg.allow_global_batch_change:
        changes = (
            f"ranks {saved_world} -> {world_size}, gradient accumulation {saved_accum} -> "
            f"{recipe_accum}; global batch CHANGED from {_describe(saved_batch)} to "
            f"{_describe(recipe_batch)} per step (allow_global_batch_change)"
        )
        return BatchSplit(world_size, recipe_accum, recipe_batch, saved_world, changes)
    micro = ", ".join(f"{cfg.data.micro_batch(s)} {s}" for s in saved_batch)
    wanted = (
        f"data.global_batch={explicit} asks for another"
        if explicit is not None and explicit != sum(saved_batch.values())
        else f"{world_size} rank(s) with a micro-batch of {micro} cannot split it"
    )
    raise ConfigError(
        f"resume: {where or 'the checkpoint'} was trained with a global batch of "
        f"{_describe(saved_batch)} per step ({was}); {wanted}. Run on a number of ranks "
        "that divides it, or set allow_global_batch_change=true to continue with "
        f"{_describe(recipe_batch)} per step"
    )
