"""Random-access index of a WebDataset shard: where each sample's members lie inside the tar.

``shard-000000.tar`` gets a sidecar ``shard-000000.tar.idx.json`` listing, in tar order, every
sample's key, task and member byte ranges. ``data_prep`` writes it next to each shard; the loader
reads it (or builds it in memory for shards that lack one) so it can read any sample with one seek,
which is what makes the data order a pure function of the step and resume O(1).

Part of the shard format (with ``data_prep.schema``); standard library only.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_prep.schema import JSON_EXTENSION

INDEX_SUFFIX = ".idx.json"
INDEX_VERSION = 1


@dataclass(frozen=True)
class IndexedSample:
    key: str
    task: str | None  # None when the json member is missing or unreadable
    members: dict[str, tuple[int, int]]  # extension -> (data offset, size) inside the tar


def index_path(shard: str | Path) -> Path:
    return Path(str(shard) + INDEX_SUFFIX)


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the base name up to its first dot, the extension the rest."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext


def build_index(shard: str | Path) -> tuple[list[IndexedSample], str | None]:
    """Scan the tar headers (seeking over data) and read each json member for its task.

    Returns the samples found and, for a damaged tar, a description of where reading stopped.
    """
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    error = None
    with open(shard, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if info.isfile():
                        key, ext = split_member_name(info.name)
                        groups.setdefault(key, {})[ext] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            error = f"tar unreadable after {sum(len(m) for m in groups.values())} members: {e}"
        size = os.fstat(f.fileno()).st_size
        samples = []
        for key, members in groups.items():
            samples.append(
                IndexedSample(key, _task_of(f, members.get(JSON_EXTENSION), size), members)
            )
    return samples, error


def _task_of(f, location: tuple[int, int] | None, file_size: int) -> str | None:
    if location is None or location[0] + location[1] > file_size:
        return None
    f.seek(location[0])
    try:
        task = json.loads(f.read(location[1])).get("task")
    except (ValueError, AttributeError):
        return None
    return task if isinstance(task, str) else None


def write_index(shard: str | Path) -> Path:
    """Build the sidecar index of ``shard`` and write it atomically next to it."""
    samples, error = build_index(shard)
    if error:
        raise ValueError(f"{shard}: {error}")
    path = index_path(shard)
    tmp = path.with_name(path.name + ".tmp")
    payload = {
        "version": INDEX_VERSION,
        "samples": [
            [s.key, s.task, {ext: list(loc) for ext, loc in sorted(s.members.items())}]
            for s in samples
        ],
    }
    tmp.write_text(json.dumps(payload, separators=(",", ":")))
    os.replace(tmp, path)
    return path


def read_index(shard: str | Path) -> tuple[list[IndexedSample], str | None]:
    """The sidecar index when present and readable, else a fresh scan of the tar."""
    path = index_path(shard)
    try:
        payload = json.loads(path.read_text())
        if payload.get("version") == INDEX_VERSION:
            return [
                IndexedSample(key, task, {ext: (loc[0], loc[1]) for ext, loc in members.items()})
                for key, task, members in payload["samples"]
            ], None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        pass
    return build_index(shard)
