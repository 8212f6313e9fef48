"""Source kinds (``jsonl``, ``llava``, ``folder``, ``hf``, ``wds``): parse ``--source`` and list
records.

Scanning reads only text; images are read by the shard workers through :class:`ImageReader`.
Every input record comes out of :func:`scan` exactly once, as a :class:`Record` or as a skipped
ledger entry.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep import hf
from data_prep.errors import CommandError
from data_prep.records import (
    HfRow,
    ImageRef,
    Record,
    Skip,
    TarMember,
    image_field,
    json_object,
    label,
    make_record,
    meta_field,
    parse_text,
    skipped,
)
from data_prep.sampling import Take, TakeCount
from data_prep.schema import LedgerEntry
from data_prep.wds import scan_wds, tar_files

KINDS = ("jsonl", "llava", "folder", "hf", "wds")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SIDECAR_SUFFIXES = (".json", ".txt")  # a .json sidecar wins over a .txt one


@dataclass(frozen=True)
class SourceSpec:
    label: str  # names the source in sample json, keys, the ledger and stats
    kind: str
    path: Path  # absolute


@dataclass(frozen=True)
class ScanOptions:
    default_task: str  # for records that are a plain caption
    image_root: Path | None  # base of relative image paths (default: the source file's folder)
    image_column: str  # hf sources
    text_column: str | None  # hf and wds sources; None: interpret columns like jsonl fields
    cache_dir: Path  # where hf parquet sources are converted to Arrow
    takes: Mapping[str, Take]  # --take, by source label
    seed: int  # of --take's draws
    workers: int  # wds sources list and read their tars in this many processes


def parse_specs(specs: list[str]) -> list[SourceSpec]:
    """``[NAME=]KIND:PATH`` strings to specs with unique labels; CommandError if unusable."""
    out: list[SourceSpec] = []
    for text in specs:
        head, sep, path_text = text.partition(":")
        name, eq, kind = head.rpartition("=")
        if not sep or not path_text:
            raise CommandError(
                f"--source {text!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}"
            )
        if kind not in KINDS:
            raise CommandError(
                f"--source {text!r}: unknown source kind {kind!r} (expected one of {', '.join(KINDS)})"
            )
        path = Path(path_text).expanduser().absolute()
        _check_path(text, kind, path)
        base = label(name) if eq else label(path.stem if path.is_file() else path.name)
        taken = {s.label for s in out}
        if eq and base in taken:
            raise CommandError(
                f"--source {text!r}: the name {base!r} is already used by another --source"
            )
        unique, n = base, 2
        while unique in taken:
            unique, n = f"{base}_{n}", n + 1
        out.append(SourceSpec(unique, kind, path))
    return out


def _check_path(text: str, kind: str, path: Path) -> None:
    if kind == "wds":
        if not tar_files(path):
            raise CommandError(f"--source {text!r}: no .tar file at {path}")
        return
    if not path.exists():
        raise CommandError(f"--source {text!r}: {path} does not exist")
    if kind in ("jsonl", "llava") and not path.is_file():
        raise CommandError(f"--source {text!r}: {path} is not a file")
    if kind == "folder" and not path.is_dir():
        raise CommandError(f"--source {text!r}: {path} is not a directory")
    if not os.access(path, os.R_OK):
        raise CommandError(f"--source {text!r}: {path} is not readable")


def open_hf_tables(specs: list[SourceSpec], opts: ScanOptions) -> dict[str, hf.Table]:
    """The tables of the hf sources, by label (opened once; scanning and workers share them)."""
    return {
        spec.label: hf.open_table(
            spec.path,
            opts.image_column,
            opts.cache_dir,
            opts.image_root or (spec.path if spec.path.is_dir() else spec.path.parent),
        )
        for spec in specs
        if spec.kind == "hf"
    }


def scan(
    spec: SourceSpec, opts: ScanOptions, tables: Mapping[str, hf.Table]
) -> Iterator[Record | LedgerEntry | TakeCount]:
    """Every record of one source, in source order. A wds source applies its ``--take`` itself
    (before reading any text) and ends with what it kept and left out (a ``TakeCount``)."""
    if spec.kind == "hf":
        return _scan_hf(spec, opts, tables[spec.label])
    if spec.kind == "wds":
        return scan_wds(
            spec.path,
            spec.label,
            default_task=opts.default_task,
            text_column=opts.text_column,
            take=opts.takes.get(spec.label),
            seed=opts.seed,
            workers=opts.workers,
        )
    scanners = {"jsonl": _scan_jsonl, "llava": _scan_llava, "folder": _scan_folder}
    return scanners[spec.kind](spec, opts)


def _scan_jsonl(spec: SourceSpec, opts: ScanOptions) -> Iterator[Record | LedgerEntry]:
    base = opts.image_root or spec.path.parent
    with open(spec.path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            at = f"line {number}"
            try:
                yield _record(spec, at, json_object(raw, f"line {number}"), base, opts)
            except Skip as skip:
                yield skipped(spec.label, at, skip)


def _scan_llava(spec: SourceSpec, opts: ScanOptions) -> Iterator[Record | LedgerEntry]:
    try:
        items = json.loads(spec.path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"{spec.path}: not a LLaVA JSON file ({e})") from None
    if not isinstance(items, list):
        raise CommandError(
            f"{spec.path}: a LLaVA file is a JSON array of records, got {type(items).__name__}"
        )
    base = opts.image_root or spec.path.parent
    for index, item in enumerate(items):
        at = f"index {index}"
        if isinstance(item, dict) and "id" in item:
            at += f" (id {item['id']})"
        try:
            if not isinstance(item, dict):
                raise Skip("bad_json", f"expected an object, got {type(item).__name__}")
            if "conversations" not in item:
                raise Skip("missing_field", "no 'conversations' field")
            fields = {k: item[k] for k in ("image", "conversations", "meta") if k in item}
            yield _record(spec, at, fields, base, opts)
        except Skip as skip:
            yield skipped(spec.label, at, skip)


def _scan_folder(spec: SourceSpec, opts: ScanOptions) -> Iterator[Record | LedgerEntry]:
    images: dict[str, list[str]] = {}
    sidecars: dict[str, dict[str, str]] = {}
    for rel in _walk(spec.path):
        stem, suffix = posixpath.splitext(rel)
        if suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(stem, []).append(rel)
        elif suffix.lower() in SIDECAR_SUFFIXES:
            sidecars.setdefault(stem, {})[suffix.lower()] = rel
    for stem in sorted(images.keys() | sidecars.keys()):
        found = sidecars.get(stem, {})
        sidecar = found.get(".json") or found.get(".txt")
        if stem not in images:
            skip = Skip("missing_image", f"{sidecar} has no image file next to it")
            yield skipped(spec.label, sidecar, skip)
            continue
        for rel in images[stem]:
            try:
                if sidecar is None:
                    raise Skip("missing_text", f"no {stem}.txt or {stem}.json next to {rel}")
                fields = dict(_read_sidecar(spec.path / sidecar, sidecar))
                fields["image"] = rel
                yield _record(spec, rel, fields, spec.path, opts)
            except Skip as skip:
                yield skipped(spec.label, rel, skip)


def _walk(root: Path) -> list[str]:
    """Relative POSIX paths of all non-hidden files under ``root``, sorted."""
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel_dir = Path(directory).relative_to(root).as_posix()
        found.extend(
            posixpath.join(rel_dir, f) if rel_dir != "." else f
            for f in files
            if not f.startswith(".")
        )
    return sorted(found)


def _read_sidecar(path: Path, rel: str) -> Mapping[str, Any]:
    raw = path.read_bytes()
    if rel.lower().endswith(".json"):
        return json_object(raw, rel)
    try:
        return {"caption": raw.decode("utf-8")}
    except UnicodeDecodeError as e:
        raise Skip(
            "bad_encoding", f"{rel} is not UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None


def _scan_hf(
    spec: SourceSpec, opts: ScanOptions, table: hf.Table
) -> Iterator[Record | LedgerEntry]:
    for split, row, fields in table.rows(opts.text_column):
        at = f"{split}/row {row}" if split else f"row {row}"
        try:
            if table.kind == "path":  # a column of file paths: behaves like a jsonl source
                yield _record(spec, at, fields, table.base, opts)
                continue
            task, text = parse_text(fields, opts.default_task)
            ref = HfRow(spec.label, split, row)
            yield make_record(
                source=spec.label,
                at=at,
                task=task,
                text=text,
                image=ref,
                image_name=f"{split}:{row}",
                meta=meta_field(fields),
            )
        except Skip as skip:
            yield skipped(spec.label, at, skip)


def _record(
    spec: SourceSpec, at: str, fields: Mapping[str, Any], base: Path, opts: ScanOptions
) -> Record:
    """A record whose image is a file path, relative to ``base`` unless absolute."""
    name = image_field(fields)
    task, text = parse_text(fields, opts.default_task)
    path = os.path.normpath(os.path.join(base, name))
    return make_record(
        source=spec.label,
        at=at,
        task=task,
        text=text,
        image=path,
        image_name=posixpath.normpath(name),
        meta=meta_field(fields),
    )


class ImageReader:
    """Fetches a record's encoded image bytes, inside shard workers."""

    def __init__(self, tables: Mapping[str, hf.Table]):
        self.tables = tables  # hf source label -> its table (pickles by file reference)

    def read(self, ref: ImageRef) -> bytes:
        if isinstance(ref, TarMember):
            return read_member(ref)
        if isinstance(ref, HfRow):
            value = self.tables[ref.source].image(ref.split, ref.row)
            if isinstance(value, bytes):
                return value
            ref = value
        return read_file(ref)


def read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Skip("missing_image", f"{path}: no such file") from None
    except OSError as e:
        raise Skip("unreadable_image", f"{path}: {e.strerror or e}") from None


def read_member(ref: TarMember) -> bytes:
    try:
        with open(ref.tar, "rb") as f:
            f.seek(ref.offset)
            data = f.read(ref.size)
    except OSError as e:
        raise Skip("unreadable_image", f"{ref.tar}: {e.strerror or e}") from None
    if len(data) != ref.size:
        raise Skip("truncated_tar", f"{ref.tar}: the member at byte {ref.offset} is cut short")
    return data
