"""Checkpoints: DeepSpeed state + client state, per-rank RNG files, an atomic ``latest`` marker.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000020/          DeepSpeed's files (model states, ZeRO-2 optimizer partitions)
                            + rank_00000.pt, rank_00001.pt ... (each rank's RNG states)
    latest                  the tag of the newest COMPLETE checkpoint, written last

A save writes everything, waits for every rank, and only then replaces ``latest`` (write to a
temporary file, fsync, rename); so a crash at any point of a save leaves ``latest`` naming the
previous complete checkpoint. Retention then removes the oldest tags beyond ``keep_last`` in a
background thread of rank 0, off the ranks' critical path (:class:`Retention`).
"""

from __future__ import annotations

import os
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
TAG_PREFIX = "step_"
FAULT_ENV = "INFOTOK_FAULT"  # fault injection for tests: "crash_in_save:STEP"
NOT_A_CHECKPOINT = "not a run directory, checkpoints directory or step_* checkpoint"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix(TAG_PREFIX))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_tag(root: Path) -> str | None:
    """The tag ``latest`` names, if it and its directory exist."""
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text().strip()
    if not (root / tag).is_dir():
        raise FileNotFoundError(f"{marker} names {tag!r} but {root / tag} does not exist")
    return tag


def find_checkpoint(path: Path) -> tuple[Path, str] | None:
    """(checkpoints root, tag) of a run directory, its ``checkpoints`` directory (their latest
    checkpoint) or one ``step_*`` directory; None if ``path`` is none of these."""
    for root in (path / CHECKPOINT_DIR, path):
        if (root / LATEST).is_file():
            return root, latest_tag(root)
    if path.is_dir() and path.name.startswith(TAG_PREFIX):
        return path.parent, path.name
    return None


def resolve_resume(run_dir: Path, resume: str) -> tuple[Path, str] | None:
    """``none`` -> None; ``auto`` -> the run's latest checkpoint or None; else a checkpoint path
    (see :func:`find_checkpoint`)."""
    if resume == "none":
        return None
    if resume == "auto":
        root = run_dir / CHECKPOINT_DIR
        tag = latest_tag(root)
        return (root, tag) if tag else None
    found = find_checkpoint(Path(resume))
    if found is None:
        raise FileNotFoundError(f"resume={resume}: {NOT_A_CHECKPOINT}")
    return found


def locate(path: Path, step: int | None = None) -> tuple[Path, str]:
    """(checkpoints root, tag) under ``path``: its latest checkpoint, or the one of ``step``."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: {NOT_A_CHECKPOINT}")
    root, tag = found
    if step is not None:
        tag = tag_for(step)
        if not (root / tag).is_dir():
            available = sorted(p.name for p in root.iterdir() if p.name.startswith(TAG_PREFIX))
            raise FileNotFoundError(
                f"{root / tag} does not exist (available: {', '.join(available)})"
            )
    return root, tag


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Retention:
    """Keeps the newest ``keep_last`` complete checkpoints of ``root``: after each save, rank 0
    deletes the older ones in a background thread while training goes on."""

    def __init__(self, root: Path, keep_last: int) -> None:
        self.root, self.keep_last = root, keep_last
        self._thread: threading.Thread | None = None

    def prune_in_background(self) -> None:
        self.wait()
        self._thread = threading.Thread(
            target=prune, args=(self.root, self.keep_last), name="checkpoint-retention", daemon=True
        )
        self._thread.start()

    def wait(self) -> None:
        """Until the last pruning has finished (before the process exits)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def save(
    engine,
    root: Path,
    step: int,
    client_state: dict[str, Any],
    rank_state: dict[str, Any],
    retention: Retention,
) -> str:
    """Save a complete checkpoint for ``step`` on every rank; returns its tag."""
    tag = tag_for(step)
    rank = dist.get_rank()
    root.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rank_file = root / tag / f"rank_{rank:05d}.pt"
    tmp = rank_file.with_name(rank_file.name + ".tmp")
    torch.save(rank_state, tmp)
    os.replace(tmp, rank_file)
    _maybe_inject_fault(step)
    dist.barrier()
    if rank == 0:
        _atomic_write(root / LATEST, tag.encode())
    dist.barrier()
    if rank == 0:
        retention.prune_in_background()
    return tag


def load(engine, root: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load DeepSpeed state into ``engine``; returns (client state, this rank's state)."""
    rank_file = root / tag / f"rank_{dist.get_rank():05d}.pt"
    if not rank_file.is_file():
        raise FileNotFoundError(
            f"{rank_file} is missing: was the checkpoint written with a different world size?"
        )
    _, client_state = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if client_state is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")
    return client_state, torch.load(rank_file, weights_only=False)


def prune(root: Path, keep_last: int) -> None:
    """Remove the oldest checkpoints beyond ``keep_last``; never the one ``latest`` names."""
    current = latest_tag(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    complete = [t for t in tags if current is not None and step_of(t) <= step_of(current)]
    for tag in complete[:-keep_last] if keep_last > 0 else []:
        if tag != current:
            shutil.rmtree(root / tag, ignore_errors=True)


def _maybe_inject_fault(step: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"crash_in_save:{step}":
        os._exit(13)
