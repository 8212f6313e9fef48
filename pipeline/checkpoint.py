"""Checkpoints: DeepSpeed state + the trainer's state, a manifest, an atomic ``latest`` marker,
and DeepSpeed's universal format for a resume on another number of ranks.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000020/          DeepSpeed's files (model states, ZeRO-2 optimizer partitions)
                            + trainer_state.json (step, ranks, accumulation, loader state)
                            + config.yaml (the resolved recipe)
                            + manifest.json (every other file's size, and sha256 up to 64 MiB;
                            not config.yaml, which a user may edit, e.g. a moved data path)
    latest                  the tag of the newest COMPLETE checkpoint, written last
    universal/step_00000020/  a checkpoint (of this run, or the one ``resume`` names) converted
                            by DeepSpeed's ds_to_universal when the run resumes on another number
                            of ranks; removed by retention once this run has a newer checkpoint

A save writes everything (each file fsynced), waits for every rank, writes the manifest and only
then replaces ``latest`` (write to a temporary file, fsync, rename); so a crash at any point of a
save leaves ``latest`` naming the previous complete checkpoint. A save that fails (a full disk)
removes what it wrote and raises :class:`SaveError` on every rank, ``latest`` untouched.
``resume=auto`` verifies the checkpoint ``latest`` names against its manifest and falls back to
the newest older one that verifies (saying so in one line); an explicit ``resume=PATH`` to a
damaged checkpoint is an error. Retention then removes the oldest tags beyond ``keep_last`` in a
background thread of rank 0, off the ranks' critical path (:class:`Retention`). No random state
is saved: every random draw of a step is seeded from (seed, step, micro-batch).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RECIPE_COPY = "config.yaml"  # the resolved recipe, for people and replay: editable, not verified
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
HASH_LIMIT = 64 * 2**20  # files up to this size get a sha256 in the manifest; larger: size only
UNIVERSAL_DIR = "universal"
SOURCE_FILE = "converted_from"  # in a universal copy: the checkpoint it was made from
TAG_PREFIX = "step_"
# fault injection for tests: "crash_in_save:STEP" (rank 0 dies after writing its files), or
# "enospc_in_save:STEP:RANK" (that rank's writes fail as on a full disk)
FAULT_ENV = "INFOTOK_FAULT"
NOT_A_CHECKPOINT = "not a run directory, checkpoints directory or step_* checkpoint"


class SaveError(Exception):
    """A checkpoint could not be written: raised on every rank with the same one-line message,
    after the partial checkpoint was removed; ``latest`` still names the previous one."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def step_of(tag: str) -> int:
    return int(tag.removeprefix(TAG_PREFIX))


def is_tag(name: str) -> bool:
    """``step_<digits>``: a checkpoint's name (``step_00000008.partial`` and the like are not)."""
    return name.startswith(TAG_PREFIX) and name.removeprefix(TAG_PREFIX).isdigit()


def tags(root: Path) -> list[str]:
    """The checkpoint directories of ``root``, oldest first."""
    return sorted((p.name for p in root.iterdir() if p.is_dir() and is_tag(p.name)), key=step_of)


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


def _named_in_latest(root: Path) -> str | None:
    marker = root / LATEST
    return marker.read_text().strip() if marker.is_file() else None


def latest_tag(root: Path) -> str | None:
    """The tag ``latest`` names, if it and its directory exist."""
    tag = _named_in_latest(root)
    if tag is not None and not (root / tag).is_dir():
        raise FileNotFoundError(f"{root / LATEST} names {tag!r} but {root / tag} does not exist")
    return tag


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: Path) -> None:
    """``manifest.json``: every file of the checkpoint with its size, and its sha256 when it
    is at most :data:`HASH_LIMIT` (the small files, cheap to hash; never the multi-GB states).
    The recipe copy is left out: nothing a resume loads, and users edit it."""
    files = {}
    unverified = {step_dir / MANIFEST, step_dir / RECIPE_COPY}
    for path in sorted(step_dir.rglob("*")):
        if path.is_file() and path not in unverified:
            size = path.stat().st_size
            entry: dict[str, Any] = {"size": size}
            if size <= HASH_LIMIT:
                entry["sha256"] = _sha256(path)
            files[path.relative_to(step_dir).as_posix()] = entry
    manifest = {"format": MANIFEST_FORMAT, "files": files}
    _atomic_write(step_dir / MANIFEST, json.dumps(manifest, indent=1).encode())


def _file_damage(path: Path, entry: dict[str, Any]) -> str | None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"missing, the manifest lists {entry['size']} bytes"
    if size != entry["size"]:
        return f"{size} bytes, the manifest says {entry['size']}"
    if "sha256" in entry and _sha256(path) != entry["sha256"]:
        return "its sha256 differs from the manifest's"
    return None


def damage(step_dir: Path) -> str | None:
    """What is wrong with checkpoint ``step_dir`` by its manifest (the first listed file that is
    missing, of another size or, where the manifest has one, another sha256); None when nothing
    is. Files the manifest does not list are not looked at. A checkpoint without a manifest
    (written before manifests existed) has nothing to check it against: None."""
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if manifest["format"] != MANIFEST_FORMAT:
            return (
                f"{MANIFEST}: format {manifest['format']!r}, this trainer reads {MANIFEST_FORMAT}"
            )
        for name, entry in manifest["files"].items():
            problem = _file_damage(step_dir / name, entry)
            if problem is not None:
                return f"{name}: {problem}"
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST}: unreadable ({type(e).__name__}: {e})"
    return None


def _newest_intact(root: Path, below: int) -> str | None:
    """The newest checkpoint of ``root`` before step ``below`` that :func:`damage` passes."""
    for tag in reversed(tags(root)):
        if step_of(tag) < below and damage(root / tag) is None:
            return tag
    return None


def find_checkpoint(path: Path) -> tuple[Path, str] | None:
    """(checkpoints root, tag) of a run directory, its ``checkpoints`` directory (their latest
    checkpoint) or one ``step_*`` directory; None if ``path`` is none of these."""
    for root in (path / CHECKPOINT_DIR, path):
        if (root / LATEST).is_file():
            return root, latest_tag(root)
    if path.is_dir() and path.name.startswith(TAG_PREFIX):
        return path.parent, path.name
    return None


def resolve_resume(
    run_dir: Path, resume: str, notice: Callable[[str], None] | None = None
) -> tuple[Path, str] | None:
    """``none`` -> None; ``auto`` -> the run's latest checkpoint, or the newest older one when
    that one is damaged (``notice`` gets the one line that says so), or None; else a checkpoint
    path (see :func:`find_checkpoint`), which must not be damaged. Only reads: every rank calls
    it and they agree."""
    if resume == "none":
        return None
    if resume == "auto":
        root = run_dir / CHECKPOINT_DIR
        tag = latest_tag(root)
        return _intact_or_older(root, tag, notice) if tag else None
    found = find_checkpoint(Path(resume))
    if found is None:
        raise FileNotFoundError(f"resume={resume}: {NOT_A_CHECKPOINT}")
    problem = damage(found[0] / found[1])
    if problem is not None:
        raise ValueError(f"resume={resume}: {found[0] / found[1]} is damaged: {problem}")
    return found


def _intact_or_older(
    root: Path, tag: str, notice: Callable[[str], None] | None
) -> tuple[Path, str]:
    problem = damage(root / tag)
    if problem is None:
        return root, tag
    older = _newest_intact(root, step_of(tag))
    if older is None:
        raise ValueError(
            f"resume=auto: {root / tag} is damaged ({problem}) and no older checkpoint in {root} "
            "is intact; restore the file, or start over with resume=none"
        )
    if notice is not None:
        notice(f"{tag} is damaged ({problem}); resuming from {older}")
    return root, older


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


def _reason(error: BaseException) -> str:
    """The OS error behind ``error`` (torch.save reports a failed write as a RuntimeError whose
    context is the OSError), else ``error`` itself; one line."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.errno is not None:
        return f"[Errno {cause.errno}] {cause.strerror}"
    return " ".join(f"{type(error).__name__}: {error}".split())


class GuardedWrites:
    """Stands in for the engine's checkpoint engine (and its copy of the recovery scripts): a
    write that fails is remembered, not raised, and the rank's later writes of the save are
    skipped. So a rank whose disk is full still goes through every collective and barrier of
    DeepSpeed's ``save_checkpoint`` like the others, and all of them reach the one point where
    :func:`save` compares their outcomes. Files are written through a Python file object and
    fsynced: a full disk shows as its OSError (not at a later close), and ``latest`` only ever
    moves to files that are on disk."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failure: str | None = None
        self.fault: OSError | None = None

    def __getattr__(self, name: str) -> Any:  # create, commit, load, is_decoupled, ...
        return getattr(self.inner, name)

    def begin(self, fault: OSError | None) -> None:
        self.failure, self.fault = None, fault

    def attempt(self, where: str, write: Callable[[], Any]) -> None:
        if self.failure is not None:
            return
        try:
            write()
        except Exception as e:  # noqa: BLE001 - reported by save() on every rank
            self.failure = f"{_reason(e)} ({os.path.basename(where)})"

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.attempt(path, lambda: self.inner.makedirs(path, exist_ok=exist_ok))

    def save(self, state_dict: dict[str, Any], path: str) -> None:
        self.attempt(path, lambda: self._write(state_dict, path))

    def _write(self, state_dict: dict[str, Any], path: str) -> None:
        from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

        if self.fault is not None:
            raise self.fault
        if type(self.inner) is not TorchCheckpointEngine:
            self.inner.save(state_dict, path)
            return
        with open(path, "wb") as f:
            torch.save(
                state_dict, f, _use_new_zipfile_serialization=self.inner.zipfile_serialization
            )
            f.flush()
            os.fsync(f.fileno())


def _guard(engine) -> GuardedWrites:
    """The engine's :class:`GuardedWrites`, installed at its first save."""
    writes = engine.checkpoint_engine
    if not isinstance(writes, GuardedWrites):
        writes = engine.checkpoint_engine = GuardedWrites(writes)
        copy = engine._copy_recovery_script  # rank 0 copies zero_to_fp32.py into the root
        engine._copy_recovery_script = lambda path: writes.attempt(path, lambda: copy(path))
    return writes


def save(engine, root: Path, step: int, files: dict[str, str], retention: Retention) -> str:
    """Save a complete checkpoint for ``step`` on every rank, with ``files`` (name -> text,
    written by rank 0) beside DeepSpeed's; returns its tag. When any rank's write fails, every
    rank raises the same :class:`SaveError` once the partial checkpoint is removed. The ranks
    agree by one all-gather every rank reaches: no write raises before it."""
    tag = tag_for(step)
    rank = dist.get_rank()
    writes = _guard(engine)
    writes.begin(_injected_write_fault(step, rank))
    if rank == 0:
        retention.wait()
        writes.attempt(str(root), lambda: _make_room(root, tag))
    dist.barrier()  # a stale directory of this tag is gone before any rank writes
    engine.save_checkpoint(str(root), tag=tag, client_state={}, save_latest=False)
    if rank == 0:
        writes.attempt(TRAINER_STATE, lambda: _write_files(root / tag, files))
    _maybe_inject_fault(step)
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, writes.failure)  # every rank is done writing
    problems = [f"rank {r}: {failure}" for r, failure in enumerate(failures) if failure]
    outcome: list[str | None] = [None]
    if rank == 0:
        if not problems:
            writes.attempt(MANIFEST, lambda: _commit(root, tag))
            if writes.failure:
                problems.append(f"rank 0: {writes.failure}")
        if problems:
            outcome[0] = _give_up(engine, root, tag, problems, retention.keep_last)
    dist.broadcast_object_list(outcome, src=0)  # latest has moved, or the save failed
    if outcome[0] is not None:
        raise SaveError(outcome[0])
    if rank == 0:
        retention.prune_in_background()
    return tag


def _make_room(root: Path, tag: str) -> None:
    """Remove a directory ``tag`` left by an earlier run (a damaged checkpoint a resume fell back
    from, a save that crashed, a checkpoint past the one an explicit resume named). If ``latest``
    names it, it first names the newest intact older checkpoint (or is removed when there is
    none): it always names a complete checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / tag).exists():
        return
    if _named_in_latest(root) == tag:
        older = _newest_intact(root, step_of(tag))
        if older is None:
            (root / LATEST).unlink()
        else:
            _atomic_write(root / LATEST, older.encode())
    shutil.rmtree(root / tag)


def _write_files(step_dir: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        _atomic_write(step_dir / name, text.encode())


def _commit(root: Path, tag: str) -> None:
    write_manifest(root / tag)
    _atomic_write(root / LATEST, tag.encode())


def _give_up(engine, root: Path, tag: str, problems: list[str], keep_last: int) -> str:
    """Remove the partial checkpoint (every rank is done with it); the one-line message. Never
    raises: the other ranks wait for this message."""
    failed = f"saving {root / tag} failed: {problems[0]}"
    if len(problems) > 1:
        failed += f" (and {len(problems) - 1} more)"
    try:
        (root / f"{LATEST}.tmp").unlink(missing_ok=True)
        if _named_in_latest(root) != tag:
            shutil.rmtree(root / tag, ignore_errors=True)
        return f"{failed}; {_after_failure(engine, root, tag, keep_last)}"
    except Exception as e:  # noqa: BLE001 - the disk is in trouble: say so, still one line
        return f"{failed}; cleaning up after it failed too: {_reason(e)}"


def _after_failure(engine, root: Path, tag: str, keep_last: int) -> str:
    """What a checkpoint needs, what is free, what is left."""
    previous = _named_in_latest(root)
    if previous is not None and (root / previous).is_dir():
        need, basis = _size_of(root / previous), f"the size of {previous}"
        named = f"{LATEST} still names {previous}"
    else:
        need, basis = _estimate(engine), "estimated from the model and its Adam state"
        named = f"there is no {LATEST}: no checkpoint is complete yet"
    stat = os.statvfs(root)
    removed = f"removed the partial {tag}; " if previous != tag else ""
    return (
        f"a checkpoint needs about {_human(need)} ({basis}) and "
        f"{_human(stat.f_bavail * stat.f_frsize)} is free there (checkpoint.keep_last="
        f"{keep_last}: that many complete ones stay while a new one is written); {removed}{named}"
    )


def _size_of(step_dir: Path) -> int:
    return sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())


def _estimate(engine) -> int:
    """Bytes of a checkpoint of ``engine`` before there is one to measure: the parameters (tied
    ones once) and buffers, the frozen parameters again when they are not on the CPU (ZeRO-2
    also saves CPU copies of them), and fp32 weights and two Adam moments per trained one."""
    params = list(engine.module.parameters())
    weights = sum(t.numel() * t.element_size() for t in [*params, *engine.module.buffers()])
    copies = sum(
        p.numel() * p.element_size() for p in params if not p.requires_grad and not p.is_cpu
    )
    trained = sum(p.numel() for p in params if p.requires_grad)
    return weights + copies + 12 * trained


def _human(size: float) -> str:
    units = ["bytes", "KiB", "MiB", "GiB", "TiB"]
    unit = 0
    while size >= 1024 and unit < len(units) - 1:
        size, unit = size / 1024, unit + 1
    return f"{size:.0f} bytes" if unit == 0 else f"{size:.1f} {units[unit]}"


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
    """Remove the oldest checkpoints beyond ``keep_last``; never the one ``latest`` names, nor
    any newer one (a damaged checkpoint a resume fell back from, replaced when its step is saved
    again). Names other than ``step_<digits>`` are left alone."""
    current = latest_tag(root)
    if current is None:
        return
    complete = [t for t in tags(root) if step_of(t) <= step_of(current)]
    for tag in complete[:-keep_last] if keep_last > 0 else []:
        if tag != current:
            shutil.rmtree(root / tag, ignore_errors=True)
    universal = root / UNIVERSAL_DIR
    if universal.is_dir():
        for copy in universal.iterdir():
            name = copy.name.removesuffix(".partial")
            if copy.is_dir() and is_tag(name) and step_of(name) < step_of(current):
                shutil.rmtree(copy, ignore_errors=True)


def _maybe_inject_fault(step: int) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault == f"crash_in_save:{step}":
        os._exit(13)


def _injected_write_fault(step: int, rank: int) -> OSError | None:
    if os.environ.get(FAULT_ENV, "") == f"enospc_in_save:{step}:{rank}":
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None
