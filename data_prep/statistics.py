"""The ``stats`` command: what a dataset directory holds, from its manifest and json members."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data_prep.manifest import read_manifest
from data_prep.records import REASONS
from data_prep.schema import JSON_EXTENSION, ROLE_ASSISTANT, TASK_I2T, TASKS

_BAR_WIDTH = 40


def run(out_dir: Path) -> str:
    """Print the report of ``out_dir`` and return it."""
    manifest = read_manifest(out_dir)
    per_source: dict[str, Counter[str]] = {}
    longer_side: Counter[int] = Counter()
    text_length: dict[str, Counter[int]] = {task: Counter() for task in TASKS}
    for shard in tqdm(manifest["shards"], desc="stats", unit="shard", disable=None):
        with tarfile.open(out_dir / shard["name"], mode="r:") as tar:
            for member in tar:
                if not member.name.endswith("." + JSON_EXTENSION):
                    continue
                sample = json.loads(tar.extractfile(member).read())
                per_source.setdefault(sample["source"], Counter())[sample["task"]] += 1
                longer_side[_bucket(max(sample["width"], sample["height"]))] += 1
                text_length[sample["task"]][_bucket(_text_length(sample))] += 1
    totals = manifest["totals"]
    lines = [
        f"{out_dir}: {totals['shards']} shards, {totals['samples']} samples, {totals['bytes'] / 1e6:.1f} MB; "
        f"{totals['records']} input records, {totals['skipped']} skipped",
        "",
        "samples per task:",
        *(f"  {task:<6}{totals['tasks'][task]:>10}" for task in TASKS),
        "",
        "per source:",
        f"  {'source':<24}"
        + "".join(f"{t:>10}" for t in TASKS)
        + f"{'skipped':>10}{'not taken':>11}  --take",
    ]
    for name, info in manifest["sources"].items():
        counts = per_source.get(name, Counter())
        lines.append(
            f"  {name:<24}"
            + "".join(f"{counts[t]:>10}" for t in TASKS)
            + f"{info['skipped']:>10}{info.get('not_taken', 0):>11}  {info.get('take', '-')}"
        )
    lines += ["", "skipped by reason:" if manifest["skipped"] else "skipped: none"]
    lines += [
        f"  {reason:<20}{n:>8}  {REASONS.get(reason, '')}"
        for reason, n in manifest["skipped"].items()
    ]
    lines += ["", "image size (longer side, px):", *_histogram(longer_side)]
    for task in TASKS:
        if text_length[task]:
            what = "assistant turns" if task == TASK_I2T else "prompt"
            lines += [
                "",
                f"text length, {task} {what} (characters):",
                *_histogram(text_length[task]),
            ]
    report = "\n".join(lines)
    print(report)
    return report


def _text_length(sample: dict) -> int:
    if sample["task"] == TASK_I2T:
        return sum(len(m["content"]) for m in sample["messages"] if m["role"] == ROLE_ASSISTANT)
    return len(sample["prompt"])


def _bucket(value: int) -> int:
    """Lower edge of the power-of-two bucket holding ``value`` (0 for 0)."""
    return 1 << (value.bit_length() - 1) if value > 0 else 0


def _histogram(counts: Counter[int]) -> list[str]:
    if not counts:
        return ["  (no samples)"]
    peak = max(counts.values())
    return [
        f"  {low:>7} - {max(2 * low - 1, 0):<7}{counts[low]:>9}  {'#' * max(1, round(_BAR_WIDTH * counts[low] / peak))}"
        for low in sorted(counts)
    ]
