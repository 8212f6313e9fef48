"""Workspaces (shards, tokenizer) and per-step loss tables for the trainer tests."""

from __future__ import annotations

import math
from pathlib import Path

from data_prep import shard, synth
from pipeline.launch import ROOT, LocalRun as Run, steps_logged  # noqa: F401 (used by the tests)
from pipeline.metrics import read_metrics
from pipeline.models.common.tiny_tokenizer import make_tokenizer


def make_data(root: Path, count: int = 48, seed: int = 0) -> Path:
    src, out = root / "synth", root / "shards"
    source = synth(src, count, seed=seed, size=64)
    shard([f"jsonl:{source}"], out, shard_size=16)
    return out


def make_workspace(root: Path) -> dict[str, Path]:
    return {"shards": make_data(root), "tokenizer": make_tokenizer(root / "tokenizer")}


def wait_for(predicate, run: Run, timeout: float = 300, what: str = "condition") -> None:
    try:
        run.wait_until(predicate, what, timeout)
    except (RuntimeError, TimeoutError) as e:
        raise AssertionError(str(e)) from None


LOSS_KEYS = (
    "loss",
    "loss_i2t",
    "loss_t2i",
    "kl_u",
    "suff_u",
    "align_u",
    "kl_g",
    "suff_g",
    "align_g",
    "lr",
    "grad_norm",
)


def loss_table(run_dir: Path) -> list[tuple]:
    """Per-step losses (every term, lr, grad norm) as logged, for bit-for-bit comparison."""
    return [(r["step"], *(r.get(k) for k in LOSS_KEYS)) for r in read_metrics(run_dir)]


def assert_losses_close(run_dir: Path, reference_dir: Path, steps: int, rel_tol: float) -> None:
    """Every step 1..steps logged once, each loss term, lr and grad norm within ``rel_tol``
    (relative) of the reference run's: the check for runs that sum in another order."""
    got, expected = read_metrics(run_dir), read_metrics(reference_dir)
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    assert [r["step"] for r in expected] == list(range(1, steps + 1))
    for a, b in zip(got, expected):
        for key in LOSS_KEYS:
            assert math.isclose(a[key], b[key], rel_tol=rel_tol, abs_tol=1e-12), (
                f"step {a['step']} {key}: {a[key]} vs {b[key]}"
            )
