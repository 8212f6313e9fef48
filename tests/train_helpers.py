"""Launching real multi-rank training runs for the tests: one process per rank, as srun does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from data_prep.cli import main as data_prep
from pipeline.metrics import read_metrics
from pipeline.models.tiny_tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def make_data(root: Path, count: int = 48, seed: int = 0) -> Path:
    src, out = root / "synth", root / "shards"
    assert data_prep(["synth", "--output", str(src), "--count", str(count), "--seed", str(seed), "--size", "64"]) == 0
    assert data_prep(["shard", "--source", f"jsonl:{src}/synth.jsonl", "--output", str(out), "--shard-size", "16"]) == 0
    return out


def make_workspace(root: Path) -> dict[str, Path]:
    return {"shards": make_data(root), "tokenizer": make_tokenizer(root / "tokenizer")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Run:
    """``world`` trainer processes with the environment a launcher would give them."""

    def __init__(self, recipe: str, overrides: list[str], log_dir: Path, world: int = 2,
                 extra_env: dict[str, str] | None = None):
        port = str(free_port())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{r}.log" for r in range(world)]
        self.procs = []
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": str(ROOT), **(extra_env or {})}
            with open(self.logs[rank], "ab") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pipeline.train", "--config", recipe, *overrides],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 600) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"run timed out; logs:\n{self.output()}") from None
        return codes

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs)


def wait_for(predicate, run: Run, timeout: float = 300, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if any(p.poll() is not None for p in run.procs):
            raise AssertionError(f"a rank exited while waiting for {what}:\n{run.output()}")
        if time.monotonic() > deadline:
            run.kill()
            raise AssertionError(f"timed out waiting for {what}:\n{run.output()}")
        time.sleep(0.05)


def steps_logged(run_dir: Path) -> int:
    records = read_metrics(run_dir)
    return records[-1]["step"] if records else 0


LOSS_KEYS = ("loss", "loss_i2t", "loss_t2i", "kl_u", "suff_u", "align_u", "kl_g", "suff_g", "align_g", "lr",
             "grad_norm")


def loss_table(run_dir: Path) -> list[tuple]:
    """Per-step losses (every term, lr, grad norm) as logged, for bit-for-bit comparison."""
    return [(r["step"], *(r.get(k) for k in LOSS_KEYS)) for r in read_metrics(run_dir)]
