"""Replay one step of a run: which samples it trained on, and its loss terms, recomputed.

    torchrun --nproc_per_node W -m pipeline.replay --run RUN_DIR --step N [--json FILE]

Launch it like the trainer (torchrun, srun, or one plain process), on any number of ranks that
can split the run's global batch: the batch order is defined on global sample slots and every
micro-batch's noise on its place in the step, so every rank rebuilds its share of step N's
batches, whatever the number of ranks the run had at that step. The weights step N saw come from
the newest checkpoint before it: the run is resumed there (or started afresh from its recipe when
no such checkpoint is kept) and trained on to step N exactly as it was, in memory; nothing in
RUN_DIR is written but a universal copy of the checkpoint when the number of ranks differs from
the one it was saved with. Rank 0 prints the keys and source directories of step N's samples on
every rank, the step's loss terms, and whether they equal ``metrics.jsonl``'s record of that step
(when that record covers step N alone, i.e. ``log.every`` was 1 there): bit for bit on the
checkpoint's number of ranks, within a relative 1e-5 on another (the sums run in another order).

Exit codes: 0 replayed (and equal where compared), 1 replayed but different from the log,
2 bad input (one line: a step past the run's last checkpoint, a missing run, a number of ranks
that cannot split the global batch, a data set that changed since the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pipeline import checkpoint
from pipeline.config import ConfigError
from pipeline.data import parse_dataset_spec
from pipeline.distributed import resolve_env
from pipeline.metrics import read_metrics
from pipeline.recipe import TrainConfig, load_train_config
from pipeline.train import LogInterval, Trainer

EXIT_DIFFERENT = 1
RESHARDED_TOLERANCE = 1e-5  # relative, when the checkpoint was saved by another number of ranks
EXIT_BAD_INPUT = 2


class ReplayError(Exception):
    """Bad input to the replay: the message is the whole story."""


def kept_checkpoints(run_dir: Path) -> list[int]:
    """Steps of the run's complete checkpoints (none newer than ``latest``), oldest first."""
    root = run_dir / checkpoint.CHECKPOINT_DIR
    latest = checkpoint.latest_tag(root) if root.is_dir() else None
    if latest is None:
        return []
    newest = checkpoint.step_of(latest)
    steps = (
        checkpoint.step_of(p.name)
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(checkpoint.TAG_PREFIX)
    )
    return sorted(s for s in steps if s <= newest)


def replay_config(run_dir: Path, step: int) -> tuple[TrainConfig, int]:
    """The recipe to replay ``step`` with (resuming from the newest checkpoint before it) and the
    step it resumes after (0: from the start)."""
    kept = kept_checkpoints(run_dir)
    if not kept:
        raise ReplayError(f"{run_dir}: no complete checkpoint (is this a run directory?)")
    if not 1 <= step <= kept[-1]:
        last = run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.tag_for(kept[-1])
        raise ReplayError(
            f"--step {step}: outside the run's checkpointed steps 1..{kept[-1]} (its last "
            f"checkpoint is {last})"
        )
    before = [s for s in kept if s < step]
    resume_after = before[-1] if before else 0
    source = kept[-1] if resume_after == 0 else resume_after
    root = run_dir / checkpoint.CHECKPOINT_DIR
    cfg = load_train_config(root / checkpoint.tag_for(source) / checkpoint.RECIPE_COPY)
    resume = str(root / checkpoint.tag_for(resume_after)) if resume_after else "none"
    cfg = dataclasses.replace(
        cfg,
        resume=resume,
        eval=dataclasses.replace(cfg.eval, every=0),
        log=dataclasses.replace(cfg.log, tensorboard=False),
    )
    return cfg, resume_after


def differs(replayed: Any, logged: Any, tolerance: float) -> bool:
    """Whether a replayed value differs from the logged one by more than ``tolerance``
    (relative; 0: bit for bit)."""
    if replayed == logged:
        return False
    if not (tolerance and isinstance(replayed, float) and isinstance(logged, float)):
        return True
    return abs(replayed - logged) > tolerance * max(abs(replayed), abs(logged))


def logged_record(run_dir: Path, step: int) -> dict[str, Any] | None:
    """``metrics.jsonl``'s record of ``step`` when it covers that step alone."""
    records = read_metrics(run_dir)
    for previous, record in zip([{"step": 0}, *records], records):
        if record["step"] == step and previous["step"] == step - 1:
            return record
    return None


def replay(run_dir: Path, step: int) -> dict[str, Any] | None:
    """Replays ``step`` on every rank; rank 0 gets the report (others None)."""
    cfg, resume_after = replay_config(run_dir, step)
    layout = resolve_env()
    try:
        trainer = Trainer(cfg, layout)
    except ConfigError:  # a global batch these ranks cannot split: its own line
        raise
    except ValueError as e:  # the loader's fingerprint: the data set changed since the run
        raise ReplayError(f"{run_dir}: {e}") from None
    for _ in range(trainer.start, step):
        result = trainer.train_step()
    interval = LogInterval(trainer.dev)
    norm = trainer.guard.norm if result.applied else None
    interval.add_step(result.terms, result.tokens, result.skipped_samples, result.applied, norm)
    record, _ = interval.reduce()
    everyone: list[Any] = [None] * layout.world_size
    dist.all_gather_object(everyone, result.samples)
    if layout.rank != 0:
        return None
    terms = {k: v for k, v in record.items() if k not in ("seconds", "tokens_per_s")}
    terms["lr"] = trainer.engine.get_lr()[0]
    logged = logged_record(run_dir, step)
    compared = None
    tolerance = RESHARDED_TOLERANCE if trainer.split.resharded else 0.0
    if logged is not None:
        compared = {
            k: [v, logged.get(k)] for k, v in terms.items() if differs(v, logged.get(k), tolerance)
        }
    datasets = {
        stream: [str(parse_dataset_spec(spec)[0]) for spec in getattr(cfg.data, stream)]
        for stream in ("i2t", "t2i")
    }
    samples = [
        {
            "rank": rank,
            "micro_step": micro,
            "samples": {
                stream: [
                    {"key": key, "source": datasets[stream][source]}
                    for key, source in zip(batch["keys"][stream], batch["sources"][stream])
                ]
                for stream in batch["keys"]
            },
        }
        for rank, micro_steps in enumerate(everyone)
        for micro, batch in enumerate(micro_steps)
    ]
    return {
        "step": step,
        "resumed_after": resume_after,
        "world_size": layout.world_size,
        "tolerance": tolerance,
        "terms": terms,
        "samples": samples,
        "logged": logged,
        "differences": compared,
    }


def print_report(report: dict[str, Any]) -> None:
    start = f"checkpoint step {report['resumed_after']}" if report["resumed_after"] else "step 0"
    print(f"[replay] step {report['step']} on {report['world_size']} rank(s), from {start}")
    for entry in report["samples"]:
        for stream, samples in entry["samples"].items():
            for sample in samples:
                print(
                    f"  rank {entry['rank']} micro-step {entry['micro_step']} {stream}: "
                    f"{sample['key']}  ({sample['source']})"
                )
    for name, value in sorted(report["terms"].items()):
        if isinstance(value, float):
            print(f"  {name:<16} {value!r}")
    if report["differences"] is None:
        print("[replay] metrics.jsonl has no record of this step alone; nothing compared")
    elif report["differences"]:
        print(f"[replay] DIFFERENT from metrics.jsonl (replayed, logged): {report['differences']}")
    else:
        same = "bit for bit" if not report["tolerance"] else f"within {report['tolerance']:g}"
        print(f"[replay] every term equals metrics.jsonl {same}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, type=Path, help="the run directory (run_dir)")
    parser.add_argument("--step", required=True, type=int, help="the step to replay (1-based)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    try:
        report = replay(args.run, args.step)
    except (ReplayError, ConfigError) as e:
        if resolve_env().rank == 0:
            print(f"replay: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    if report is not None:
        print_report(report)
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    code = EXIT_DIFFERENT if report is not None and report["differences"] else 0
    if dist.is_initialized():
        dist.barrier()  # the ranks leave together: one tearing gloo down early can abort another
    # Without the interpreter's teardown: destroying the engine's and the process group's C++
    # threads at exit can abort a rank ("terminate called without an active exception") after
    # its report is out. Nothing is left to write.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
