"""The ``verify`` command: re-read a dataset directory and check it against manifest and ledger."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from data_prep.latents import verify_caches
from data_prep.manifest import read_ledger, read_manifest
from data_prep.schema import (
    IMAGE_EXTENSIONS,
    IMAGE_TOKEN,
    JSON_EXTENSION,
    LEDGER_FILE,
    MANIFEST_FILE,
    ROLE_ASSISTANT,
    ROLE_SYSTEM,
    ROLE_USER,
    SHARD_GLOB,
    TASK_I2T,
    TASKS,
    ManifestShard,
)

_FORMATS = {"jpg": ("JPEG", "MPO"), "png": ("PNG",), "webp": ("WEBP",)}  # MPO: a camera JPEG
_MAX_LISTED = 5  # keys shown per ledger/shard mismatch


@dataclass
class ShardReport:
    name: str
    problems: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    tasks: Counter[str] = field(default_factory=Counter)


def run(out_dir: Path, workers: int) -> list[str]:
    """Check ``out_dir``, print each problem and a summary; returns the problems."""
    manifest = read_manifest(out_dir)
    problems = _stray_files(out_dir, manifest["shards"])
    check = partial(check_shard, out_dir)
    shards = manifest["shards"]
    reports = list(
        tqdm(
            _check_all(check, shards, workers),
            total=len(shards),
            desc="verify",
            unit="shard",
            disable=None,
        )
    )
    for report in reports:
        problems += report.problems
    problems += _check_totals(manifest, reports)
    problems += _check_ledger(out_dir, manifest, reports)
    cache_problems, cache_summaries = verify_caches(out_dir, shards)
    problems += cache_problems
    samples = sum(len(r.keys) for r in reports)
    for line in problems:
        print(line)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {out_dir}")
    else:
        print(
            f"verify: OK: {len(shards)} shards, {samples} samples, sha256 and sizes match, every json "
            f"parses and every image decodes; ledger accounts for {manifest['totals']['records']} records"
        )
    for line in cache_summaries:  # the caches found intact
        print(line)
    return problems


def _check_all(
    check: Callable[[ManifestShard], ShardReport], shards: list[ManifestShard], workers: int
) -> Iterator[ShardReport]:
    if workers > 1 and len(shards) > 1:
        with multiprocessing.get_context().Pool(min(workers, len(shards))) as pool:
            yield from pool.imap(check, shards)
    else:
        yield from map(check, shards)


def _stray_files(out_dir: Path, shards: list[ManifestShard]) -> list[str]:
    listed = {s["name"] for s in shards}
    problems = [
        f"{p.name}: in the directory but not in {MANIFEST_FILE}"
        for p in sorted(out_dir.glob(SHARD_GLOB))
        if p.name not in listed
    ]
    problems += [
        f"{p.name}: leftover of an interrupted run (finish it with shard --resume)"
        for p in sorted(out_dir.glob(SHARD_GLOB + ".tmp"))
    ]
    return problems


def check_shard(out_dir: Path, entry: ManifestShard) -> ShardReport:
    """Everything about one shard: size, sha256, members, json and images, counts per task."""
    name = entry["name"]
    report = ShardReport(name)
    path = out_dir / name
    if not path.is_file():
        report.problems.append(f"{name}: listed in {MANIFEST_FILE} but missing")
        return report
    data = path.read_bytes()
    if len(data) != entry["bytes"]:
        report.problems.append(f"{name}: {len(data)} bytes, {MANIFEST_FILE} says {entry['bytes']}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        report.problems.append(f"{name}: sha256 {digest}, {MANIFEST_FILE} says {entry['sha256']}")
    try:
        samples = _samples(data)
    except (tarfile.TarError, EOFError, ValueError) as e:
        report.problems.append(f"{name}: not a readable tar ({e})")
        return report
    seen: set[str] = set()
    for key, members in samples:
        if key in seen:
            report.problems.append(f"{name}: {key}: key appears more than once in the shard")
        seen.add(key)
        report.keys.append(key)
        for problem in _check_sample(members, report):
            report.problems.append(f"{name}: {key}: {problem}")
    for task in TASKS:
        if report.tasks[task] != entry["tasks"].get(task, 0):
            report.problems.append(
                f"{name}: {report.tasks[task]} {task} samples, {MANIFEST_FILE} says "
                f"{entry['tasks'].get(task, 0)}"
            )
    if len(report.keys) != entry["samples"]:
        report.problems.append(
            f"{name}: {len(report.keys)} samples, {MANIFEST_FILE} says {entry['samples']}"
        )
    return report


def _samples(data: bytes) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` in tar order; a key split across the tar counts twice."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            content = tar.extractfile(member).read() if member.isfile() else b""
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = content
    return samples


def _check_sample(members: dict[str, bytes], report: ShardReport) -> list[str]:
    images = [ext for ext in members if ext in IMAGE_EXTENSIONS]
    problems = [
        f"unexpected member .{ext}"
        for ext in members
        if ext not in (*IMAGE_EXTENSIONS, JSON_EXTENSION)
    ]
    if len(images) != 1:
        problems.append(
            f"{len(images)} image members (expected one of {', '.join(IMAGE_EXTENSIONS)})"
        )
    if JSON_EXTENSION not in members:
        return [*problems, "no json member"]
    try:
        sample = json.loads(members[JSON_EXTENSION].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return [*problems, f"json does not parse ({e})"]
    problems += _check_json(sample)
    if problems or not images:
        return problems
    report.tasks[sample["task"]] += 1
    ext = images[0]
    try:
        with Image.open(io.BytesIO(members[ext])) as img:
            img.load()
            size, fmt, mode = img.size, img.format, img.mode
    except Exception as e:  # Pillow signals corrupt data with many exception types
        return [f".{ext} does not decode ({type(e).__name__}: {e})"]
    if fmt not in _FORMATS[ext]:
        problems.append(f".{ext} member holds {fmt} data")
    if size != (sample["width"], sample["height"]):
        problems.append(
            f"image is {size[0]}x{size[1]}, json says {sample['width']}x{sample['height']}"
        )
    if mode != "RGB":
        problems.append(f"image mode is {mode}, not RGB")
    return problems


def _check_json(sample: Any) -> list[str]:
    if not isinstance(sample, dict):
        return ["json is not an object"]
    missing = [k for k in ("task", "source", "width", "height") if k not in sample]
    if missing:
        return [f"json lacks {', '.join(missing)}"]
    if sample["task"] not in TASKS:
        return [f"json task {sample['task']!r} is not one of {', '.join(TASKS)}"]
    if not all(isinstance(sample[k], int) and sample[k] > 0 for k in ("width", "height")):
        return ["json width/height are not positive integers"]
    if sample["task"] == TASK_I2T:
        return _check_messages(sample.get("messages"))
    if not isinstance(sample.get("prompt"), str) or not sample["prompt"].strip():
        return ["t2i json has no prompt"]
    return []


def _check_messages(messages: Any) -> list[str]:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    ):
        return ["i2t json messages is not a list of {role, content}"]
    roles = [m.get("role") for m in messages if m.get("role") != ROLE_SYSTEM]
    if len(roles) < 2 or roles != [ROLE_USER, ROLE_ASSISTANT] * (len(roles) // 2):
        return [f"i2t roles are {'/'.join(map(str, roles))}, not user/assistant pairs"]
    first_user = next(m for m in messages if m["role"] == ROLE_USER)
    if not first_user["content"].startswith(IMAGE_TOKEN):
        return [f"first user turn does not start with {IMAGE_TOKEN}"]
    return []


def _check_totals(manifest: dict[str, Any], reports: list[ShardReport]) -> list[str]:
    totals = manifest["totals"]
    found = Counter()
    for report in reports:
        found.update(report.tasks)
    problems = [
        f"{MANIFEST_FILE}: totals.tasks.{t} is {totals['tasks'].get(t)}, shards hold {found[t]}"
        for t in TASKS
        if totals["tasks"].get(t) != found[t]
    ]
    samples = sum(s["samples"] for s in manifest["shards"])
    if totals["samples"] != samples:
        problems.append(
            f"{MANIFEST_FILE}: totals.samples is {totals['samples']}, shards list {samples}"
        )
    if totals["skipped"] != sum(manifest["skipped"].values()):
        problems.append(
            f"{MANIFEST_FILE}: totals.skipped is {totals['skipped']}, reasons add up to "
            f"{sum(manifest['skipped'].values())}"
        )
    seen: dict[str, str] = {}
    for report in reports:
        for key in report.keys:
            if seen.setdefault(key, report.name) != report.name:
                problems.append(f"{report.name}: key {key} also in {seen[key]}")
    return problems


def _check_ledger(out_dir: Path, manifest: dict[str, Any], reports: list[ShardReport]) -> list[str]:
    """Every written sample is in the ledger at its shard, and the counts add up."""
    problems: list[str] = []
    by_shard: dict[str, set[str]] = {}
    skipped: Counter[str] = Counter()
    records = 0
    try:
        for number, entry in read_ledger(out_dir):
            records += 1
            if entry.get("status") == "written":
                by_shard.setdefault(entry.get("shard", "?"), set()).add(entry.get("key"))
            elif entry.get("status") == "skipped":
                skipped[entry.get("reason", "?")] += 1
            else:
                problems.append(f"{LEDGER_FILE} line {number}: status {entry.get('status')!r}")
    except json.JSONDecodeError as e:
        return [f"{LEDGER_FILE}: line {records + 1} is not JSON ({e})"]
    for report in reports:
        in_ledger, in_shard = by_shard.pop(report.name, set()), set(report.keys)
        for keys, what in (
            (in_shard - in_ledger, "in the shard, not in the ledger"),
            (in_ledger - in_shard, "in the ledger, not in the shard"),
        ):
            if keys:
                listed = ", ".join(sorted(keys)[:_MAX_LISTED]) + (
                    " ..." if len(keys) > _MAX_LISTED else ""
                )
                problems.append(f"{report.name}: {len(keys)} key(s) {what}: {listed}")
    problems += [
        f"{LEDGER_FILE}: {len(keys)} samples written to {name}, which is not in {MANIFEST_FILE}"
        for name, keys in sorted(by_shard.items())
    ]
    if dict(skipped) != manifest["skipped"]:
        problems.append(
            f"{LEDGER_FILE}: skips by reason {dict(sorted(skipped.items()))}, "
            f"{MANIFEST_FILE} says {manifest['skipped']}"
        )
    if records != manifest["totals"]["records"]:
        problems.append(
            f"{LEDGER_FILE}: {records} records, {MANIFEST_FILE} says {manifest['totals']['records']}"
        )
    return problems
