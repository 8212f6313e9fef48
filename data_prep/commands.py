"""The commands as Python functions: :func:`synth`, :func:`shard`, :func:`verify`, :func:`stats`.

``python -m data_prep`` is a thin layer over them: each flag is the argument of the same name
(``--shard-size`` is ``shard_size``, the repeated ``--source`` is ``sources``, DIR is ``path``),
with the default of these signatures. Each function prints what its command prints
(progress, a summary) and raises :class:`~data_prep.errors.CommandError` with a one-line message
when it cannot run at all. The modules doing the work are imported on first use, so that
``import data_prep`` and ``--help`` stay fast.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from data_prep.errors import CommandError
from data_prep.schema import TASKS, Manifest

StrPath = str | os.PathLike[str]

LIMITS: dict[str, tuple[int, int | None]] = {
    "count": (1, None),
    "size": (64, None),
    "shard_size": (1, None),
    "max_side": (0, None),
    "min_side": (1, None),
    "quality": (1, 100),
    "workers": (1, None),
}
"""The smallest and largest (None: unbounded) value of each integer argument."""


def default_workers() -> int:
    """The CPUs this process may run on: what ``workers=None`` stands for."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def out_of_range(name: str, value: int) -> str | None:
    """Why ``value`` is not allowed for the integer argument ``name``; None when it is."""
    low, high = LIMITS[name]
    if value < low:
        return f"{value} is below the minimum {low}"
    if high is not None and value > high:
        return f"{value} is above the maximum {high}"
    return None


def synth(
    output: StrPath, count: int, *, seed: int = 0, size: int = 256, layout: str = "free"
) -> Path:
    """Draw ``count`` scenes of ``size`` px into ``output``; returns the jsonl source it wrote.

    ``output/synth.jsonl`` + ``output/images/``: question/answer, caption and prompt records with
    their ground truth under ``meta``. Record ``i`` depends only on ``(seed, i)``. ``layout``:
    ``"free"`` or ``"grid"`` (see ``python -m data_prep synth --help``).
    """
    from data_prep import synthetic
    from data_prep.scenes import LAYOUTS

    _check_ints(count=count, size=size)
    _check_choice("layout", layout, LAYOUTS)
    return synthetic.run(Path(output), count, seed, size, layout)


def shard(
    sources: str | Sequence[str],
    output: StrPath,
    *,
    task: str = "i2t",
    shard_size: int = 2000,
    max_side: int = 1024,
    min_side: int = 64,
    image_format: str = "keep",
    quality: int = 90,
    check: str = "decode",
    workers: int | None = None,
    seed: int = 0,
    resume: bool = False,
    image_root: StrPath | None = None,
    image_column: str = "image",
    text_column: str | None = None,
    take: Sequence[str] = (),
) -> Manifest:
    """Write ``sources`` as shards + manifest + ledger into ``output``; returns the manifest.

    ``sources``: one or more ``[NAME=]KIND:PATH`` strings, KIND one of jsonl, llava, folder, hf,
    wds; ``take``: ``NAME=N`` or ``NAME=FRACTION`` sub-samples of sources.
    The other arguments are the flags of ``python -m data_prep shard`` (see its ``--help``);
    ``workers=None`` uses every CPU available. The same inputs and seed give byte-identical
    output whatever ``workers`` is; ``resume=True`` finishes an interrupted run.
    """
    from data_prep import sharding
    from data_prep.images import CHECKS, IMAGE_FORMATS

    specs = [sources] if isinstance(sources, str) else list(sources)
    if not specs:
        raise CommandError("sources: at least one [NAME=]KIND:PATH is needed")
    workers = default_workers() if workers is None else workers
    _check_ints(
        shard_size=shard_size,
        max_side=max_side,
        min_side=min_side,
        quality=quality,
        workers=workers,
    )
    _check_choice("task", task, TASKS)
    _check_choice("image_format", image_format, IMAGE_FORMATS)
    _check_choice("check", check, CHECKS)
    return sharding.run(
        sharding.ShardArgs(
            sources=specs,
            output=Path(output),
            task=task,
            shard_size=shard_size,
            max_side=max_side,
            min_side=min_side,
            image_format=image_format,
            quality=quality,
            check=check,
            workers=workers,
            seed=seed,
            resume=resume,
            image_root=None if image_root is None else Path(image_root),
            image_column=image_column,
            text_column=text_column,
            take=list(take),
        )
    )


def verify(path: StrPath, *, workers: int | None = None) -> list[str]:
    """Re-check the dataset directory ``path`` against its manifest; returns the problems found.

    Every shard's size and sha256, every json and image, the counts and keys; each problem is
    also printed on its own line. ``workers=None`` uses every CPU available.
    """
    from data_prep import verification

    workers = default_workers() if workers is None else workers
    _check_ints(workers=workers)
    return verification.run(Path(path), workers)


def stats(path: StrPath) -> str:
    """Print and return the report of the dataset directory ``path``.

    Samples per task and source, skip reasons, histograms of image size and text length.
    """
    from data_prep import statistics

    return statistics.run(Path(path))


def _check_ints(**values: int) -> None:
    for name, value in values.items():
        problem = out_of_range(name, value)
        if problem:
            raise CommandError(f"{name}: {problem}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise CommandError(f"{name}: {value!r} is not one of {', '.join(choices)}")
