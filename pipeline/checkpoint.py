"""Checkpoints: DeepSpeed state + the trainer's state, an atomic ``latest`` marker, and
DeepSpeed's universal format for a resume on another number of ranks.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000020/          DeepSpeed's files (model states, ZeRO-2 optimizer partitions)
                            + trainer_state.json (step, ranks, accumulation, loader state)
                            + config.yaml (the resolved recipe)
    latest                  the tag of the newest COMPLETE checkpoint, written last
    universal/step_00000020/  a checkpoint (of this run, or the one ``resume`` names) converted
                            by DeepSpeed's ds_to_universal when the run resumes on another number
                            of ranks; removed by retention once this run has a newer checkpoint

A save writes everything, waits for every rank, and only then replaces ``latest`` (write to a
temporary file, fsync, rename); so a crash at any point of a save leaves ``latest`` naming the
previous complete checkpoint. Retention then removes the oldest tags beyond ``keep_last`` in a
background thread of rank 0, off the ranks' critical path (:class:`Retention`). No random state
is saved: every random draw of a step is seeded from (seed, step, micro-batch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
UNIVERSAL_DIR = "universal"
SOURCE_FILE = "converted_from"  # in a universal copy: the checkpoint it was made from
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


def save(engine, root: Path, step: int, files: dict[str, str], retention: Retention) -> str:
    """Save a complete checkpoint for ``step`` on every rank, with ``files`` (name -> text,
    written by rank 0) beside DeepSpeed's; returns its tag."""
    tag = tag_for(step)
    rank = dist.get_rank()
    root.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    if rank == 0:
        for name, text in files.items():
            _atomic_write(root / tag / name, text.encode())
    _maybe_inject_fault(step)
    dist.barrier()
    if rank == 0:
        _atomic_write(root / LATEST, tag.encode())
    dist.barrier()
    if rank == 0:
        retention.prune_in_background()
    return tag


def read_trainer_state(root: Path, tag: str) -> dict[str, Any]:
    """The trainer's state saved with checkpoint ``tag`` (one clear error when it is missing)."""
    path = root / tag / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is missing: {root / tag} is not a complete checkpoint of this trainer"
        ) from None
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load(engine, root: Path, tag: str) -> None:
    """Load DeepSpeed's state of ``root/tag`` into ``engine`` (native, or universal when the
    engine was built with ``load_universal``)."""
    loaded, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {root / tag}")


class ConversionError(Exception):
    """The universal conversion of a checkpoint failed; the checkpoint itself is untouched."""


def universal_copy(root: Path, tag: str, into: Path, workers: int = 4) -> Path:
    """``into/tag``: checkpoint ``root/tag`` in DeepSpeed's universal format (loadable on any
    number of ranks), converted now unless an earlier conversion of the same checkpoint finished.
    The conversion only reads the checkpoint and writes to a temporary directory renamed when
    complete, so a failure half-way leaves nothing behind but its message."""
    source = str((root / tag).resolve())
    target = into / tag
    marker = target / SOURCE_FILE
    if marker.is_file() and marker.read_text() == source:
        return target
    partial = into / f"{tag}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    into.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        source,
        "--output_folder",
        str(partial),
        "--inject_missing_state",
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (partial / "zero").is_dir():
        shutil.rmtree(partial, ignore_errors=True)
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise ConversionError(
            f"converting {root / tag} to DeepSpeed's universal format failed (exit "
            f"{done.returncode}: {last}); the checkpoint is unchanged"
        )
    (partial / SOURCE_FILE).write_text(source)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target


def prune(root: Path, keep_last: int) -> None:
    """Remove the oldest checkpoints beyond ``keep_last``; never the one ``latest`` names."""
    current = latest_tag(root)
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(TAG_PREFIX))
    complete = [t for t in tags if current is not None and step_of(t) <= step_of(current)]
    for tag in complete[:-keep_last] if keep_last > 0 else []:
        if tag != current:
            shutil.rmtree(root / tag, ignore_errors=True)
    universal = root / UNIVERSAL_DIR
    if universal.is_dir() and current is not None:
        for copy in universal.iterdir():
            if copy.is_dir() and step_of(copy.name.removesuffix(".partial")) < step_of(current):
                shutil.rmtree(copy, ignore_errors=True)


def _maybe_inject_fault(step: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"crash_in_save:{step}":
        os._exit(13)
