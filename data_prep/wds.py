"""The ``wds:`` source kind: WebDataset tar shards as they are published, read in place.

``--source NAME=wds:PATH``: PATH is a directory (its ``*.tar`` files, recursively), a glob
(``'/data/blip3o/*.tar'``) or one tar. The published layouts this reads:

* BLIP3o pretraining sets and BLIP3o-60k: ``<key>.jpg`` + ``<key>.txt`` (the caption);
* text-to-image-2M: ``<key>.jpg`` + ``<key>.json`` with a ``prompt`` field;
* img2dataset output: ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json`` (``caption``, ``url``,
  ``status``...), a ``.parquet`` beside each tar (not read).

Samples are the members grouped by key the WebDataset way (the base name up to its first dot).
The image is the first of ``jpg``, ``jpeg``, ``png``, ``webp`` present; the text is the ``.json``'s
``--text-column`` when given, else the ``.json``'s text (``messages``/``conversations`` for I2T,
``prompt`` for T2I, ``caption``/``text`` by ``--task``) when it has one, else the ``.txt``.

Tars stream through ``--workers`` processes, one tar each. Listing a tar reads its headers only
(``tarfile`` seeks over member data). Then, for the samples kept (all of them, or those ``--take``
chooses by ``<tar>:<key>``; a count ``--take`` first lists every tar once to find its N smallest
draws), the small text members are read; a record points at its image member by (tar,
offset, size), and the shard workers read and check those bytes as they read image files. Every
member is accounted for: a key without an image (``no_image_member``) or without text
(``no_text_member``), a member that is not a regular file (``unreadable_member``), a member cut off
by the end of a truncated tar (``truncated_tar``, and one entry for the tar itself) each get a
ledger entry naming the tar and the key.
"""

from __future__ import annotations

import contextlib
import glob
import heapq
import itertools
import multiprocessing
import os
import tarfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from data_prep.records import (
    Record,
    Skip,
    TarMember,
    json_object,
    make_record,
    meta_field,
    parse_text,
    skipped,
)
from data_prep.sampling import Take, TakeCount, chosen, draw
from data_prep.schema import LedgerEntry
from data_prep.shard_index import split_member_name

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("json", "txt")


@dataclass(frozen=True)
class Listed:
    """One key of a tar, from its headers: members as ``ext -> (data offset, size)``."""

    key: str
    members: dict[str, tuple[int, int]]
    problem: tuple[str, str] | None  # (skip reason, detail) known from the headers alone


@dataclass(frozen=True)
class TarListing:
    path: str
    name: str  # relative to the source's directory: part of every record's id
    samples: list[Listed]
    error: str | None  # where a damaged tar stopped being readable


def tar_files(path: Path) -> list[Path]:
    """The tars of a ``wds:`` PATH: a directory's ``*.tar`` (recursively), a glob, or one file."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*.tar") if p.is_file())
    if path.is_file():
        return [path]
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def list_tar(path: str, name: str) -> TarListing:
    """Every key of one tar from its headers, without reading member data."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    odd: dict[str, str] = {}
    error = None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if info.isdir():
                        continue
                    key, ext = split_member_name(info.name)
                    if not info.isfile():
                        odd.setdefault(key, f"{info.name} is not a regular file")
                        continue
                    groups.setdefault(key, {})[ext.lower()] = (info.offset_data, info.size)
        except (tarfile.TarError, EOFError, OSError) as e:
            error = f"unreadable after {sum(map(len, groups.values()))} members ({e})"
    samples = []
    for key in dict.fromkeys([*groups, *odd]):
        members = groups.get(key, {})
        samples.append(Listed(key, members, _problem(name, key, members, odd.get(key), size)))
    return TarListing(path, name, samples, error)


def _problem(
    tar: str, key: str, members: Mapping[str, tuple[int, int]], odd: str | None, size: int
) -> tuple[str, str] | None:
    where = f"{tar}: {key}"
    if any(offset + length > size for offset, length in members.values()):
        return "truncated_tar", f"{where}: a member ends past the end of the tar"
    if odd is not None:
        return "unreadable_member", f"{where}: {odd}"
    if not any(e in members for e in IMAGE_EXTENSIONS):
        found = ", ".join(sorted(members)) or "nothing"
        return "no_image_member", f"{where}: no {'/'.join(IMAGE_EXTENSIONS)} ({found})"
    if not any(e in members for e in TEXT_EXTENSIONS):
        return "no_text_member", f"{where}: no .txt or .json"
    return None


@dataclass(frozen=True)
class ReadJob:
    """One tar to list and read into records: every sample, each with ``fraction``'s chance, or
    the ``keep`` ids a count ``--take`` chose."""

    path: str
    name: str
    source: str
    default_task: str
    text_column: str | None
    seed: int
    fraction: float | None
    keep: frozenset[str] | None


def _candidates(listing: TarListing) -> list[str]:
    """Ids (``<tar>:<key>``) of the samples a ``--take`` chooses among: those with an image and
    text (the others are defects, always in the ledger)."""
    return [f"{listing.name}:{s.key}" for s in listing.samples if s.problem is None]


def smallest_draws(job: ReadJob, count: int) -> list[tuple[int, str]]:
    """The ``count`` smallest (draw, id) of one tar's candidates (headers only)."""
    ids = _candidates(list_tar(job.path, job.name))
    return heapq.nsmallest(count, ((draw(job.seed, job.source, i), i) for i in ids))


def _smallest(args: tuple[ReadJob, int]) -> list[tuple[int, str]]:
    return smallest_draws(*args)


def read_records(job: ReadJob) -> tuple[list[Record | LedgerEntry], int, int]:
    """Records (or ledger entries) of one tar's kept samples, in tar order; the number of
    candidates and of those kept."""
    listing, out = list_tar(job.path, job.name), []
    ids = _candidates(listing)
    keep = job.keep
    if job.fraction is not None:
        keep = frozenset(chosen(ids, Take(fraction=job.fraction), job.seed, job.source))
    with open(listing.path, "rb") as f:
        for sample in listing.samples:
            at = f"{listing.name}:{sample.key}"
            if sample.problem is None and keep is not None and at not in keep:
                continue
            try:
                if sample.problem is not None:
                    raise Skip(*sample.problem)
                out.append(_record(f, sample, at, job))
            except Skip as skip:
                out.append(skipped(job.source, at, skip))
    if listing.error is not None:
        out.append(
            skipped(
                job.source, listing.name, Skip("truncated_tar", f"{listing.name}: {listing.error}")
            )
        )
    return out, len(ids), len(ids) if keep is None else len(keep & set(ids))


def _record(f: Any, sample: Listed, at: str, job: ReadJob) -> Record:
    texts = {
        ext: _read(f, sample.members[ext], at, ext)
        for ext in TEXT_EXTENSIONS
        if ext in sample.members
    }
    fields: dict[str, Any] = {}
    if "json" in texts:
        fields = json_object(texts["json"], f"{at}.json")
    if job.text_column is not None:
        if job.text_column not in fields:
            raise Skip("missing_field", f"{at}.json has no {job.text_column!r} field")
        fields = {"caption": fields[job.text_column], "meta": fields.get("meta")}
        fields = {k: v for k, v in fields.items() if v is not None}
    try:
        task, text = parse_text(fields, job.default_task)
    except Skip:
        if "txt" not in texts:
            raise
        task, text = parse_text({"caption": _utf8(texts["txt"], f"{at}.txt")}, job.default_task)
    ext = next(e for e in IMAGE_EXTENSIONS if e in sample.members)
    offset, size = sample.members[ext]
    return make_record(
        source=job.source,
        at=at,
        task=task,
        text=text,
        image=TarMember(job.path, offset, size),
        image_name=f"{job.name}/{sample.key}.{ext}",
        meta=meta_field(fields),
    )


def _read(f: Any, location: tuple[int, int], at: str, ext: str) -> bytes:
    offset, size = location
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise Skip("truncated_tar", f"{at}.{ext}: cut short")
    return data


def _utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("bad_encoding", f"{where} is not UTF-8 (byte {e.start})") from None


def scan_wds(
    root: Path,
    source: str,
    *,
    default_task: str,
    text_column: str | None,
    take: Take | None,
    seed: int,
    workers: int,
) -> Iterator[Record | LedgerEntry | TakeCount]:
    """Every record of a ``wds:`` source (the kept ones, with ``take``), in tar and key order,
    then what ``take`` kept and left out (a ``TakeCount``). Tars stream through ``workers``
    processes: memory holds one tar's listing per worker (and a count ``take``'s chosen ids)."""
    tars = tar_files(root)
    names = [str(t.relative_to(root)) if root.is_dir() else t.name for t in tars]
    fraction = take.fraction if take is not None else None
    jobs = [
        ReadJob(str(t), n, source, default_task, text_column, seed, fraction, None)
        for t, n in zip(tars, names)
    ]
    candidates = kept = 0
    with _pool(workers, len(jobs)) as pool:
        run = pool.imap if pool is not None else map
        if take is not None and take.count is not None:  # the N smallest draws of all tars
            per_tar = run(_smallest, [(job, take.count) for job in jobs])
            best = heapq.nsmallest(take.count, itertools.chain.from_iterable(per_tar))
            keep: dict[str, set[str]] = {}
            for _, at in best:
                keep.setdefault(at.rpartition(":")[0], set()).add(at)
            jobs = [replace(j, keep=frozenset(keep.get(j.name, ()))) for j in jobs]
        for items, found, taken in run(read_records, jobs):
            candidates, kept = candidates + found, kept + taken
            yield from items
    yield TakeCount(kept, candidates - kept)


def _pool(workers: int, tasks: int) -> Any:
    """A process pool when there is more than one tar and worker, else nothing to enter."""
    if min(workers, tasks) > 1:
        return multiprocessing.get_context().Pool(min(workers, tasks))
    return contextlib.nullcontext()
