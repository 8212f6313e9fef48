"""The ``shard`` command: sources -> shuffled plan -> shards in parallel -> ledger -> manifest.

Determinism: records are ordered by a seeded hash of their key and cut into slices of
``--shard-size``; shard i holds the records of slice i that pass the checks (skips make it a
little smaller). A shard is therefore a function of its slice only, whatever ``--workers`` is.

Resume: each finished shard is renamed into place and then gets a part file
(``.data_prep/parts/shard-N.json``: its manifest entry and ledger lines). ``--resume`` redoes
every shard without a part file; the ledger and manifest are assembled from the parts at the
end (manifest last), and the work directory is removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.errors import CommandError
from data_prep.images import ImageOptions, PreparedImage, prepare
from data_prep.manifest import LedgerWriter, build_manifest, manifest_bytes, write_atomic
from data_prep.records import REASONS, Record, Skip, compact_json, skipped, written
from data_prep.sampling import Take, TakeCount, chosen, parse_takes
from data_prep.schema import (
    JSON_EXTENSION,
    LEDGER_FILE,
    MANIFEST_FILE,
    SHARD_GLOB,
    TASKS,
    LedgerEntry,
    Manifest,
    ManifestShard,
    shard_name,
)
from data_prep.shard_index import write_index
from data_prep.shardfile import TMP_SUFFIX, ShardFile
from data_prep.sources import (
    ImageReader,
    ScanOptions,
    SourceSpec,
    open_hf_tables,
    parse_specs,
    scan,
)

WORK_DIR = ".data_prep"  # in-progress state inside the output directory
LOCK_WAIT_S = 10  # a killed run's workers may take a moment to exit and release the lock
_SLOTS = ["written", *REASONS]  # progress counters: samples written, then skips by reason

Progress = Callable[[str], None]  # called with "written" or a skip reason, once per record


@dataclass(frozen=True)
class ShardArgs:
    """The arguments of :func:`data_prep.shard`, checked and with defaults filled in."""

    sources: list[str]
    output: Path
    task: str
    shard_size: int
    max_side: int
    min_side: int
    image_format: str
    quality: int
    check: str
    workers: int
    seed: int
    resume: bool
    image_root: Path | None
    image_column: str
    text_column: str | None
    take: list[str]


@dataclass(frozen=True)
class ShardJob:
    index: int
    records: list[Record]


@dataclass(frozen=True)
class WriterContext:
    out_dir: Path
    parts_dir: Path
    image: ImageOptions
    reader: ImageReader


def run(args: ShardArgs) -> Manifest:
    """Write the dataset directory ``args.output``; returns its manifest."""
    started = time.monotonic()
    specs = parse_specs(args.sources)
    takes = parse_takes(args.take, [s.label for s in specs])
    out = args.output.absolute()
    work = out / WORK_DIR
    arguments = _arguments(args, specs, takes)
    finished = _prepare_output(out, args.resume, arguments)
    if finished is not None:
        return finished
    with _exclusive(work, out):
        image_root = args.image_root.absolute() if args.image_root else None
        scan_opts = ScanOptions(
            args.task,
            image_root,
            args.image_column,
            args.text_column,
            work / "hf-cache",
            takes,
            args.seed,
            args.workers,
        )
        tables = open_hf_tables(specs, scan_opts)
        records, scan_skips, counts = _scan_all(specs, scan_opts, tables)
        records.sort(
            key=lambda r: hashlib.blake2b(f"{args.seed}:{r.key}".encode(), digest_size=16).digest()
        )
        _check_plan(work, arguments, records)
        jobs = [
            ShardJob(i, records[start : start + args.shard_size])
            for i, start in enumerate(range(0, len(records), args.shard_size))
        ]
        image_opts = ImageOptions(
            args.max_side, args.min_side, args.image_format, args.quality, args.check
        )
        _write_shards(
            jobs, WriterContext(out, work / "parts", image_opts, ImageReader(tables)), args.workers
        )
        shards, ledger = _assemble(out, work / "parts", len(jobs), scan_skips)
        manifest = build_manifest(
            arguments,
            shards,
            ledger,
            {s.label: (s.kind, str(s.path)) for s in specs},
            {label: (str(take), counts[label]) for label, take in takes.items()},
        )
        write_atomic(out / MANIFEST_FILE, manifest_bytes(manifest))
        shutil.rmtree(work)
    _summary(out, manifest, time.monotonic() - started)
    return manifest


def _write_shards(jobs: list[ShardJob], ctx: WriterContext, workers: int) -> None:
    """Every shard that a previous, interrupted run did not finish; in parallel if asked."""
    done = _finished_parts(ctx.out_dir, ctx.parts_dir, len(jobs))
    todo = [job for job in jobs if job.index not in done]
    if done:
        print(f"resuming: {len(done)} of {len(jobs)} shards already written", flush=True)
    total = sum(len(job.records) for job in jobs)
    with tqdm(
        total=total,
        initial=total - sum(len(job.records) for job in todo),
        unit="sample",
        desc="shard",
        dynamic_ncols=True,
        disable=None,
    ) as bar:
        if min(workers, len(todo)) > 1:
            _run_pool(todo, ctx, workers, bar)
        else:
            _run_here(todo, ctx, bar)


@contextmanager
def _exclusive(work: Path, out: Path) -> Iterator[None]:
    """One run per output directory; the lock dies with the run (and its workers), even on kill -9."""
    try:
        (work / "parts").mkdir(parents=True, exist_ok=True)
        lock = open(work / "lock", "w")
    except OSError as e:
        raise CommandError(f"--output {out}: cannot write there ({e.strerror})") from None
    with lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"--output {out}: another data_prep shard run is writing there"
                    ) from None
                time.sleep(0.1)
        yield


def _arguments(args: ShardArgs, specs: list[SourceSpec], takes: dict[str, Take]) -> dict[str, Any]:
    """The arguments that determine the output (not --workers, --resume or --output)."""
    return {
        "sources": [f"{s.label}={s.kind}:{s.path}" for s in specs],
        "take": {label: str(take) for label, take in takes.items()},
        "task": args.task,
        "shard_size": args.shard_size,
        "max_side": args.max_side,
        "min_side": args.min_side,
        "image_format": args.image_format,
        "quality": args.quality,
        "check": args.check,
        "seed": args.seed,
        "image_root": str(args.image_root.absolute()) if args.image_root else None,
        "image_column": args.image_column,
        "text_column": args.text_column,
    }


def _prepare_output(out: Path, resume: bool, arguments: dict[str, Any]) -> Manifest | None:
    """Create or check the output directory; the manifest when a resumed run is already complete."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"--output {out}: cannot create directory ({e.strerror})") from None
    ours = [p.name for p in (out / MANIFEST_FILE, out / LEDGER_FILE, out / WORK_DIR) if p.exists()]
    ours += sorted(p.name for p in out.glob(SHARD_GLOB + "*"))
    if ours and not resume:
        raise CommandError(
            f"--output {out} already holds data_prep output ({', '.join(ours[:3])}); "
            "pass --resume to finish that run, or choose an empty directory"
        )
    if resume and (out / MANIFEST_FILE).exists() and not (out / WORK_DIR).exists():
        manifest = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8"))
        previous = manifest.get("arguments")
        if previous != arguments:
            raise CommandError(
                f"--resume: {out} was finished with different arguments ({_diff(previous, arguments)})"
            )
        print(f"{out} is already complete; nothing to do")
        return manifest
    return None


def _scan_all(
    specs: list[SourceSpec], opts: ScanOptions, tables: dict[str, Any]
) -> tuple[list[Record], list[LedgerEntry], dict[str, TakeCount]]:
    """All records of all sources that ``--take`` keeps, with duplicates (same task, image and
    text) skipped; and what ``--take`` kept and left out of each source."""
    records: list[Record] = []
    skips: list[LedgerEntry] = []
    counts: dict[str, TakeCount] = {}
    first: dict[str, Record] = {}
    for spec in specs:
        found: list[Record] = []
        for item in tqdm(
            scan(spec, opts, tables), desc=f"scan {spec.label}", unit="record", disable=None
        ):
            if isinstance(item, TakeCount):  # a wds source took its sub-sample itself
                counts[spec.label] = item
            elif isinstance(item, Record):
                found.append(item)
            else:
                skips.append(item)
        take = opts.takes.get(spec.label)
        if take is not None and spec.label not in counts:
            keep = chosen([r.key for r in found], take, opts.seed, spec.label)
            counts[spec.label] = TakeCount(len(keep), len(found) - len(keep))
            found = [r for r in found if r.key in keep]
        for item in found:
            if item.identity in first:
                earlier = first[item.identity]
                dup = Skip(
                    "duplicate",
                    f"same task, image and text as {earlier.source} {earlier.at} ({earlier.key})",
                )
                skips.append(skipped(item.source, item.at, dup, item.key))
            else:
                first[item.identity] = item
                records.append(item)
    return records, skips, counts


def _check_plan(work: Path, arguments: dict[str, Any], records: list[Record]) -> None:
    """Record what this output is made of, or check a resumed run still matches it."""
    digest = hashlib.sha256("\n".join(r.key for r in records).encode()).hexdigest()
    plan = {"arguments": arguments, "records": len(records), "keys_sha256": digest}
    path = work / "plan.json"
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous["arguments"] != arguments:
            raise CommandError(
                f"--resume: {work.parent} was started with different arguments "
                f"({_diff(previous['arguments'], arguments)})"
            )
        if previous["keys_sha256"] != digest:
            raise CommandError(
                f"--resume: the inputs changed since {work.parent} was started "
                f"({previous['records']} usable records then, {len(records)} now)"
            )
        return
    write_atomic(path, compact_json(plan).encode())


def _diff(before: dict[str, Any] | None, now: dict[str, Any]) -> str:
    before = before or {}
    keys = [k for k in now if before.get(k) != now[k]]
    return "; ".join(f"{k}: {before.get(k)!r} then, {now[k]!r} now" for k in keys) or "unknown"


def _finished_parts(out: Path, parts: Path, count: int) -> set[int]:
    """Indices of shards that are complete; leftovers of interrupted shards are removed."""
    for tmp in [*out.glob(SHARD_GLOB + TMP_SUFFIX), *parts.glob("*" + TMP_SUFFIX)]:
        tmp.unlink()
    done = set()
    for index in range(count):
        part = parts / f"{shard_name(index)}.json"
        try:
            shard = json.loads(part.read_text(encoding="utf-8"))["shard"]
        except (
            OSError,
            ValueError,
            KeyError,
        ):  # absent, or torn by a machine crash: redo the shard
            continue
        tar = out / shard["name"]
        if tar.exists() and tar.stat().st_size == shard["bytes"]:
            done.add(index)
    return done


def write_shard(job: ShardJob, ctx: WriterContext, progress: Progress) -> None:
    """Write one shard and then its part file (the proof that the shard is complete)."""
    name = shard_name(job.index)
    shard = ShardFile(ctx.out_dir / name)
    entries: list[LedgerEntry] = []
    tasks = dict.fromkeys(TASKS, 0)
    try:
        for record in job.records:
            try:
                image = prepare(ctx.reader.read(record.image), ctx.image)
            except Skip as skip:
                entries.append(skipped(record.source, record.at, skip, record.key))
                progress(skip.reason)
                continue
            shard.add(
                record.key, {image.ext: image.data, JSON_EXTENSION: sample_json(record, image)}
            )
            entries.append(written(record, name))
            tasks[record.task] += 1
            progress("written")
        size, sha256 = shard.commit()
        write_index(ctx.out_dir / name)  # the loader's random-access index, before the part file
    except BaseException:
        shard.abort()
        raise
    info: ManifestShard = {
        "name": name,
        "samples": sum(tasks.values()),
        "tasks": tasks,
        "bytes": size,
        "sha256": sha256,
    }
    part = compact_json({"shard": info, "ledger": entries}).encode()
    write_atomic(
        ctx.parts_dir / f"{name}.json", part, durable=False
    )  # resume re-checks it, see _finished_parts


def sample_json(record: Record, image: PreparedImage) -> bytes:
    body = json.loads(record.text)
    body.update(task=record.task, source=record.source, width=image.width, height=image.height)
    if record.meta is not None:
        body["meta"] = json.loads(record.meta)
    return compact_json(body).encode()


class _Counts:
    """Records done so far, by outcome; drives the progress bar."""

    def __init__(self, bar: tqdm):
        self.bar = bar
        self.values = [0] * len(_SLOTS)
        self.seen = 0
        self.shown_at = 0.0

    def refresh(self, values: list[int], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.shown_at < 0.1:
            return
        self.shown_at = now
        total = sum(values)
        self.bar.update(total - self.seen)
        self.seen = total
        skips = {name: n for name, n in zip(_SLOTS[1:], values[1:], strict=True) if n}
        if skips:
            top = ", ".join(f"{k} {v}" for k, v in sorted(skips.items(), key=lambda kv: -kv[1])[:3])
            self.bar.set_postfix_str(f"skipped {sum(skips.values())} ({top})", refresh=False)


def _run_here(jobs: list[ShardJob], ctx: WriterContext, bar: tqdm) -> None:
    counts = _Counts(bar)

    def progress(outcome: str) -> None:
        counts.values[_SLOTS.index(outcome)] += 1
        counts.refresh(counts.values)

    for job in jobs:
        write_shard(job, ctx, progress)
    counts.refresh(counts.values, force=True)


_worker_ctx: WriterContext | None = None
_worker_counts: Any = None
_worker_parent = 0


def _init_worker(ctx: WriterContext, shared_counts: Any) -> None:
    global _worker_ctx, _worker_counts, _worker_parent
    signal.signal(
        signal.SIGINT, signal.SIG_IGN
    )  # the parent handles Ctrl-C and terminates the pool
    _worker_ctx, _worker_counts, _worker_parent = ctx, shared_counts, os.getppid()


def _count_in_worker(outcome: str) -> None:
    if (
        os.getppid() != _worker_parent
    ):  # the parent was killed: stop before finishing a shard it no longer owns
        os._exit(1)
    with _worker_counts.get_lock():
        _worker_counts[_SLOTS.index(outcome)] += 1


def _pool_job(job: ShardJob) -> None:
    assert _worker_ctx is not None
    write_shard(job, _worker_ctx, _count_in_worker)


def _run_pool(jobs: list[ShardJob], ctx: WriterContext, workers: int, bar: tqdm) -> None:
    methods = multiprocessing.get_all_start_methods()
    mp = multiprocessing.get_context(
        "fork" if "fork" in methods else "spawn"
    )  # fork: no re-imports
    shared = mp.Array("q", len(_SLOTS))
    finished: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    counts = _Counts(bar)
    with mp.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(ctx, shared)) as pool:
        for job in jobs:
            pool.apply_async(_pool_job, (job,), callback=finished.put, error_callback=finished.put)
        remaining = len(jobs)
        while remaining:
            try:
                outcome = finished.get(timeout=0.2)
            except queue.Empty:
                outcome = None
            else:
                if outcome is not None:
                    raise outcome
                remaining -= 1
            counts.refresh(list(shared), force=not remaining)


def _assemble(
    out: Path, parts: Path, count: int, scan_skips: list[LedgerEntry]
) -> tuple[list[ManifestShard], LedgerWriter]:
    """Write the ledger (scan skips, then every shard's records in order); return the shard list."""
    ledger = LedgerWriter(out)
    ledger.write(scan_skips)
    shards: list[ManifestShard] = []
    for index in range(count):
        part = json.loads((parts / f"{shard_name(index)}.json").read_text(encoding="utf-8"))
        shards.append(
            {k: part["shard"][k] for k in ManifestShard.__annotations__}
        )  # readable key order
        ledger.write(part["ledger"])
    ledger.close()
    return shards, ledger


def _summary(out: Path, manifest: dict[str, Any], seconds: float) -> None:
    totals = manifest["totals"]
    tasks = ", ".join(f"{t} {n}" for t, n in totals["tasks"].items())
    print(
        f"{totals['records']} records -> {totals['samples']} samples ({tasks}) in {totals['shards']} shards, "
        f"{totals['bytes'] / 1e6:.1f} MB, {seconds:.1f} s"
    )
    if totals["skipped"]:
        reasons = ", ".join(f"{k} {v}" for k, v in manifest["skipped"].items())
        print(f"skipped {totals['skipped']}: {reasons} (details: {out / LEDGER_FILE})")
    for name, source in manifest["sources"].items():
        if "take" in source:
            print(
                f"--take {name}={source['take']}: took {source['taken']} of "
                f"{source['taken'] + source['not_taken']} records ({source['not_taken']} left "
                "out, counted, not in the ledger)"
            )
    print(f"wrote {out / MANIFEST_FILE}")
