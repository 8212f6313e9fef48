"""One shard file: a reproducible tar written under a temporary name and renamed when complete.

Header fields that would vary between runs (mtime, owner) are fixed and members are written in
sample order, each sample's members sorted by extension (webdataset's ``TarWriter`` does that),
so the same samples always give the same bytes. The sha256 and size are taken while writing.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import webdataset

MTIME = 0
OWNER = "data_prep"
TMP_SUFFIX = ".tmp"


class _Hashing:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, file):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)


class ShardFile:
    """Usage: ``add`` samples, then ``commit`` (rename into place) or ``abort`` (remove)."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(path.name + TMP_SUFFIX)
        self._file = open(self.tmp, "wb")
        self._out = _Hashing(self._file)
        self._tar = webdataset.TarWriter(
            self._out, encoder=False, mtime=MTIME, user=OWNER, group=OWNER
        )

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Write one sample: ``members`` maps extensions (``jpg``, ``json``) to bytes."""
        self._tar.write({"__key__": key, **members})

    def commit(self) -> tuple[int, str]:
        """Finish the tar, make it durable, move it to its final name; returns (bytes, sha256)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        return self._out.size, self._out.sha256.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)
