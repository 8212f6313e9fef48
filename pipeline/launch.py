"""Start N local trainer ranks as separate processes, with the environment a launcher gives them.

Used by the demo and the tests: each rank gets ``RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT`` (as srun/torchrun would provide) and its own log file; signals go to every rank,
as srun forwards them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.distributed import free_port
from pipeline.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]


class LocalRun:
    """``world`` processes of ``python -m pipeline.train --config RECIPE OVERRIDES`` (or of
    ``python -m MODULE OVERRIDES`` when ``recipe`` is None, e.g. ``pipeline.replay``)."""

    def __init__(
        self,
        recipe: str | None,
        overrides: list[str],
        log_dir: Path,
        world: int = 2,
        extra_env: dict[str, str] | None = None,
        module: str = "pipeline.train",
    ):
        args = overrides if recipe is None else ["--config", recipe, *overrides]
        port = str(free_port())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.logs = [log_dir / f"rank{r}.log" for r in range(world)]
        self.procs: list[subprocess.Popen] = []
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "OMP_NUM_THREADS": "1",
                "PYTHONPATH": str(ROOT),
                **(extra_env or {}),
            }
            with open(self.logs[rank], "ab") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *args],
                        cwd=ROOT,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )

    def wait(self, timeout: float = 900) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise TimeoutError(
                    f"trainer ranks still running after {timeout:.0f} s:\n{self.output()}"
                ) from None
        return codes

    def signal(self, signum: int) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()

    def wait_until(self, predicate: Callable[[], bool], what: str, timeout: float = 600) -> None:
        """Poll ``predicate`` while every rank is alive; fails (and kills the ranks) otherwise."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a rank exited while waiting for {what}:\n{self.output()}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"timed out waiting for {what}:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in self.logs)


def steps_logged(run_dir: Path) -> int:
    records = read_metrics(run_dir)
    return records[-1]["step"] if records else 0
