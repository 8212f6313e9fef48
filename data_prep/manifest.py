"""``manifest.json`` and ``ledger.jsonl``: building them after a run, reading them back."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_prep import __version__
from data_prep.errors import CommandError
from data_prep.records import compact_json
from data_prep.sampling import TakeCount
from data_prep.schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LEDGER_FILE,
    MANIFEST_FILE,
    TASKS,
    LedgerEntry,
    Manifest,
    ManifestShard,
    ManifestSource,
)


def write_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one.

    ``durable`` also survives a machine crash (fsync before the rename).
    """
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class LedgerWriter:
    """Streams ledger entries to ``ledger.jsonl`` and tallies them for the manifest."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / LEDGER_FILE
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "w", encoding="utf-8")
        self.skipped: Counter[str] = Counter()
        self.by_source: dict[str, Counter[str]] = {}

    def write(self, entries: Iterable[LedgerEntry]) -> None:
        for entry in entries:
            self._file.write(compact_json(entry) + "\n")
            counts = self.by_source.setdefault(entry["source"], Counter())
            counts[entry["status"]] += 1
            if entry["status"] == "skipped":
                self.skipped[entry["reason"]] += 1

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self.path)


def build_manifest(
    arguments: dict[str, Any],
    shards: list[ManifestShard],
    ledger: LedgerWriter,
    sources: dict[str, tuple[str, str]],
    takes: dict[str, tuple[str, TakeCount]],
) -> Manifest:
    """``sources`` maps each label to (kind, path), in command-line order; ``takes`` the labels
    with a ``--take`` to (its value, what it kept and left out)."""
    tasks = {task: sum(s["tasks"][task] for s in shards) for task in TASKS}
    per_source: dict[str, ManifestSource] = {}
    for name, (kind, path) in sources.items():
        counts = ledger.by_source.get(name, Counter())
        per_source[name] = {
            "kind": kind,
            "path": path,
            "records": counts["written"] + counts["skipped"],
            "samples": counts["written"],
            "skipped": counts["skipped"],
        }
        if name in takes:
            value, (taken, not_taken) = takes[name]
            per_source[name].update(take=value, taken=taken, not_taken=not_taken)
    samples = sum(tasks.values())
    skipped = sum(ledger.skipped.values())
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "data_prep_version": __version__,
        "arguments": arguments,
        "shards": shards,
        "totals": {
            "records": samples + skipped,
            "samples": samples,
            "skipped": skipped,
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "tasks": tasks,
        },
        "skipped": dict(sorted(ledger.skipped.items())),
        "sources": per_source,
    }


def manifest_bytes(manifest: Manifest) -> bytes:
    return (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()


def read_manifest(out_dir: Path) -> Manifest:
    """The manifest of a dataset directory; CommandError naming the problem if unusable."""
    path = out_dir / MANIFEST_FILE
    if not out_dir.is_dir():
        raise CommandError(f"{out_dir}: no such directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CommandError(
            f"{path}: missing (not a data_prep output, or the shard run has not finished)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"{path}: unreadable ({e})") from None
    for key in ("format", "shards", "totals", "skipped"):
        if not isinstance(manifest, dict) or key not in manifest:
            raise CommandError(f"{path}: not a data_prep manifest (no {key!r})")
    if manifest["format"] != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise CommandError(
            f"{path}: format {manifest['format']!r} v{manifest.get('format_version')} is not "
            f"{FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return manifest


def read_ledger(out_dir: Path) -> Iterable[tuple[int, LedgerEntry]]:
    """``(line number, entry)`` for every line of the ledger; CommandError if it is missing."""
    path = out_dir / LEDGER_FILE
    try:
        f = open(path, encoding="utf-8")
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            yield number, json.loads(line)
