"""What rank 0 prints while it trains: a start banner, one line per metrics record, validation
lines, skipped steps and a final line. Plain text that reads well in a SLURM ``%x-%j.out``; when
stdout is a terminal a tqdm bar also counts the steps."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from pipeline.metrics import LOSS_TERMS


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


class ConsoleProgress:
    def __init__(
        self, *, enabled: bool, total_steps: int, start_step: int, stream: TextIO | None = None
    ) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.start = start_step
        self.stream = stream or sys.stdout
        self.began = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, unit="step", file=sys.stderr, leave=False
            )

    def _print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def banner(
        self,
        *,
        recipe: str,
        family: str,
        world_size: int,
        trainable: int,
        frozen: int,
        samples_per_step: int,
        grad_accum: int,
        groups: list[str],
        changes: str | None = None,
    ) -> None:
        resume = f"resuming after step {self.start}" if self.start else "starting at step 0"
        self._print(
            f"[train] {recipe}: {family}, {world_size} rank(s), {self.total} steps of "
            f"{samples_per_step} samples; {resume}"
        )
        self._print(
            f"[train] global batch {samples_per_step} = {world_size} rank(s) x {grad_accum} "
            f"micro-step(s) x {samples_per_step // (world_size * grad_accum)} samples"
        )
        if changes:
            self._print(f"[train] resume: {changes}")
        self._print(f"[train] parameters: {_count(trainable)} trained, {_count(frozen)} frozen")
        for line in groups:
            self._print(f"[train]   group {line}")

    def step(self, record: dict[str, Any]) -> None:
        """One metrics record (the means over the steps since the last one)."""
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
        done = record["step"] - self.start
        left = (time.monotonic() - self.began) / max(done, 1) * (self.total - record["step"])
        parts = [f"step {record['step']}/{self.total}"]
        parts += [f"{k} {record[k]:.4f}" for k in LOSS_TERMS if k in record]
        parts.append(f"lr {record['lr']:.3g}")
        if record.get("grad_norm") is not None:
            parts.append(f"grad {record['grad_norm']:.3g}")
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
        parts.append(f"{_count(record['tokens_per_s'])} tok/s")
        if "mfu" in record:
            parts.append(f"MFU {record['mfu']:.1%}")
        if "gpu_mem_allocated_gib" in record:
            parts.append(f"mem {record['gpu_mem_allocated_gib']:.1f} GiB")
        if record.get("nonfinite"):
            parts.append("SKIPPED STEP(S)")
        parts.append(f"ETA {_duration(left)}")
        self._print("[train] " + " | ".join(parts))
        held_out = [f"{k[4:]} {v:.4f}" for k, v in record.items() if k.startswith("val/")]
        if held_out:
            self._print(f"[val] step {record['step']}: " + " | ".join(held_out))

    def skipped(self, step: int, reason: str) -> None:
        self._print(f"[train] step {step} skipped: {reason} (see skipped_steps.jsonl)")

    def finish(self, step: int, outcome: str) -> None:
        if self.bar is not None:
            self.bar.close()
        elapsed = _duration(time.monotonic() - self.began)
        self._print(f"[train] {outcome} at step {step}/{self.total} after {elapsed}")
