"""Builders shared by the data_prep tests: tiny images, sources on disk, reading outputs back."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

import data_prep
from data_prep.cli import main
from data_prep.schema import Manifest

REPO = Path(__file__).resolve().parents[1]


def photo(width: int = 96, height: int = 72, seed: int = 0) -> Image.Image:
    """A small RGB image with a gradient and noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, np.full_like(x, 128)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str = "JPEG", **options: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A few hundred bytes of PNG whose header claims side x side RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )


def write_jsonl(path: Path, records: list[dict[str, Any] | str]) -> Path:
    """One line per record; strings are written verbatim (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def caption_corpus(root: Path, n: int, prefix: str = "img", seed: int = 0) -> Path:
    """``root/<prefix>.jsonl`` with n caption records over distinct small JPEGs."""
    (root / prefix).mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        photo(64 + i % 5 * 8, 64 + i % 3 * 8, seed=seed * 1000 + i).save(root / prefix / f"{i}.jpg")
        records.append({"image": f"{prefix}/{i}.jpg", "caption": f"{prefix} caption number {i}"})
    return write_jsonl(root / f"{prefix}.jsonl", records)


def shard(sources: str | list[str], output: Path, **options: Any) -> Manifest:
    """``data_prep.shard`` with small images allowed (``min_side=16``)."""
    return data_prep.shard(sources, output, **{"min_side": 16, **options})


def shard_cli(*args: str | Path) -> int:
    """Run ``python -m data_prep shard`` in this process (small images allowed); its exit status."""
    return main(["shard", "--min-side", "16", *map(str, args)])


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m data_prep ...`` in a subprocess (what a user runs)."""
    return subprocess.run(
        [sys.executable, "-m", "data_prep", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def files(out: Path) -> dict[str, bytes]:
    """Every file of an output directory, by name (for byte-identity checks)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def ledger(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def samples(out: Path) -> dict[str, dict[str, Any]]:
    """key -> {"json": parsed json, "ext": image extension, "image": bytes, "shard": name}."""
    found: dict[str, dict[str, Any]] = {}
    for shard_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard_path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                entry = found.setdefault(key, {"shard": shard_path.name})
                if ext == "json":
                    entry["json"] = json.loads(data)
                else:
                    entry["ext"], entry["image"] = ext, data
    return found


def skips_by_at(out: Path) -> dict[str, dict[str, Any]]:
    """Skipped ledger entries keyed by where they are in their source."""
    return {e["at"]: e for e in ledger(out) if e["status"] == "skipped"}
