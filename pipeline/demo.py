"""The whole path on the embedded default: tiny Show-o2, synthetic data, 2 CPU ranks, DeepSpeed.

data_prep synth -> data_prep shard -> train tiny_showo2 with InfoTok csa on 2 ranks (ZeRO-2, gloo)
-> stop it mid-run with SIGUSR1 (as SLURM's warning signal would) -> resume with resume=auto ->
export -> evaluate on held-out scenes -> summary. An uninterrupted run of the same recipe is the
reference for the resume check.

    python -m pipeline.demo [--workdir runs/demo] [--steps 24] [--samples 192]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import data_prep
from pipeline.export import export
from pipeline.launch import LocalRun, steps_logged
from pipeline.metrics import read_metrics
from pipeline.models.common.tiny_tokenizer import make_tokenizer
from pipeline.train import EXIT_STOPPED

RECIPE = "configs/tiny_showo2.yaml"
TERMS = ("loss", "loss_i2t", "loss_t2i", "kl_u", "suff_u", "align_u", "kl_g", "suff_g", "align_g")


def _train(overrides: list[str], log_dir: Path, stop_at: int | None = None) -> list[int]:
    run = LocalRun(RECIPE, overrides, log_dir)
    if stop_at is not None:
        run_dir = Path(next(o for o in overrides if o.startswith("run_dir=")).split("=", 1)[1])
        run.wait_until(lambda: steps_logged(run_dir) >= stop_at, f"step {stop_at}")
        run.signal(signal.SIGUSR1)
    codes = run.wait()
    expected = EXIT_STOPPED if stop_at is not None else 0
    if codes != [expected] * len(codes):
        raise SystemExit(f"trainer exited with {codes}, expected {expected}:\n{run.output()}")
    return codes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path("runs/demo"), help="everything is written here"
    )
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of the run")
    parser.add_argument("--samples", type=int, default=192, help="synthetic scenes to generate")
    args = parser.parse_args(argv)
    began = time.monotonic()
    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)

    print(
        f"[1/6] data: {args.samples} synthetic scenes -> WebDataset shards (+ held-out scenes)",
        flush=True,
    )
    for name, count, seed in (("shards", args.samples, 0), ("heldout", 48, 1)):
        source = data_prep.synth(work / f"{name}-src", count, seed=seed, size=64)
        data_prep.shard([f"jsonl:{source}"], work / name, shard_size=64)
    tokenizer = make_tokenizer(work / "tokenizer")
    common = [
        f"data.i2t=[{work / 'shards'}]",
        f"data.t2i=[{work / 'shards'}]",
        f"model.tokenizer_path={tokenizer}",
        f"steps={args.steps}",
        f"checkpoint.every={max(1, args.steps // 4)}",
    ]

    stop_at = args.steps // 2
    run_dir = work / "run"
    print(
        f"[2/6] train tiny_showo2 (InfoTok csa, 2 ranks, DeepSpeed ZeRO-2 on CPU); SIGUSR1 at step {stop_at}",
        flush=True,
    )
    _train(common + [f"run_dir={run_dir}"], work / "logs" / "interrupted", stop_at=stop_at)
    stopped = steps_logged(run_dir)
    print(
        f"[3/6] stopped after step {stopped} (exit {EXIT_STOPPED}, checkpoint saved); resuming with resume=auto",
        flush=True,
    )
    _train(common + [f"run_dir={run_dir}"], work / "logs" / "resumed")

    print("[4/6] reference: the same recipe without interruption", flush=True)
    reference_dir = work / "reference"
    _train(common + [f"run_dir={reference_dir}"], work / "logs" / "reference")
    resumed, reference = read_metrics(run_dir), read_metrics(reference_dir)
    identical = [{k: r.get(k) for k in TERMS} for r in resumed] == [
        {k: r.get(k) for k in TERMS} for r in reference
    ]
    steps = [r["step"] for r in resumed]

    print("[5/6] export (InfoTok heads dropped)", flush=True)
    summary = export(run_dir, work / "exported")

    print("[6/6] evaluate on held-out scenes", flush=True)
    evaluation = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "--model",
            str(run_dir),
            "--data",
            str(work / "heldout"),
            "--output",
            str(work / "eval"),
            "--samples",
            "16",
            "--batches",
            "4",
        ],
        capture_output=True,
        text=True,
    )
    if evaluation.returncode != 0:
        raise SystemExit(f"evaluation failed:\n{evaluation.stderr[-4000:]}")

    first, last = resumed[0], resumed[-1]
    print("\nloss terms          step 1    step", last["step"])
    for term in TERMS:
        print(f"  {term:<14} {first[term]:>9.4f} {last[term]:>9.4f}")
    print(
        f"\nresume check: steps 1..{steps[-1]} each logged once ({steps == list(range(1, args.steps + 1))}); "
        f"every loss term bit-identical to the uninterrupted run: {identical}"
    )
    print(
        f"exported step {summary['step']}: {summary['kept']} model tensors kept, {summary['dropped']} InfoTok "
        f"tensors dropped"
    )
    print(
        f"outputs: shards {work / 'shards'}\n         run     {run_dir} (metrics.jsonl, checkpoints/)"
        f"\n         model   {work / 'exported'}\n         report  {work / 'eval' / 'report.md'}"
        f"\n         logs    {work / 'logs'}"
    )
    print(f"done in {time.monotonic() - began:.0f} s")
    if not identical:
        raise SystemExit("resume check failed: the resumed run differs from the uninterrupted one")


if __name__ == "__main__":
    main()
