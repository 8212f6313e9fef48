"""Raw held-out samples (image + json with ``meta``) read straight from data_prep shards, in order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.data import ShardReader, SampleError, decode_sample, parse_dataset_spec, read_manifest


def iter_samples(datasets: Sequence[str], task: str) -> Iterator[dict[str, Any]]:
    """Every readable ``task`` sample of the datasets, shard by shard (unreadable ones are skipped)."""
    reader = ShardReader()
    for spec in datasets:
        path, _ = parse_dataset_spec(spec)
        try:
            spans = read_manifest(Path(path), task)
        except ValueError:  # no samples of this task in the dataset
            continue
        for span in spans:
            for j in range(span.count):
                try:
                    key, members = reader.read(span.path, task, j)
                    yield decode_sample(key, members, task)
                except SampleError:
                    continue


def benchmark_samples(datasets: Sequence[str], task: str, limit: int) -> list[dict[str, Any]]:
    """Up to ``limit`` samples of ``task`` that carry synthetic ground truth (``meta.kind``)."""
    wanted = {"i2t": "qa", "t2i": "t2i"}[task]
    out = []
    for sample in iter_samples(datasets, task):
        if sample.get("meta", {}).get("kind") == wanted:
            out.append(sample)
            if len(out) == limit:
                break
    return out


def question_and_answer(sample: dict[str, Any]) -> tuple[str, str]:
    """The first user turn without its image placeholder, and the first assistant turn."""
    messages = sample["messages"]
    user = next(m["content"] for m in messages if m["role"] == "user")
    answer = next(m["content"] for m in messages if m["role"] == "assistant")
    return user.replace("<image>", "").strip(), answer
