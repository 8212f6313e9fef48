"""Training metrics: ``RUN_DIR/metrics.jsonl`` (one JSON object per record), TensorBoard and,
optionally, Weights & Biases."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from pipeline.wandb_log import WandbConfig, WandbSink

METRICS_FILE = "metrics.jsonl"
LOSS_TERMS = (  # the total, the two task losses and the InfoTok terms of each branch
    "loss",
    "loss_i2t",
    "loss_t2i",
    "kl_u",
    "kl_g",
    "suff_u",
    "suff_g",
    "align_u",
    "align_g",
)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if path.exists()
        else []
    )


class StepLog:
    """A JSONL file of per-step records in the run dir (``skipped_steps.jsonl``,
    ``samples.jsonl``). Written by rank 0; on resume the lines past the resumed step are dropped,
    as in ``metrics.jsonl``."""

    def __init__(self, path: Path, *, enabled: bool, truncate_after: int) -> None:
        self.path = path
        self.enabled = enabled
        if enabled and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= truncate_after
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class MetricsLog:
    """Written by one rank. On resume, records past the resumed step (logged after the checkpoint
    by a run that then died) are dropped, so every step appears exactly once."""

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        truncate_after: int,
        wandb: WandbConfig | None = None,
        config: dict[str, Any] | None = None,
    ):
        """``config``: the resolved recipe as a plain dict, stored as the W&B run's config."""
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if r["step"] <= truncate_after]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=truncate_after + 1)
        if wandb is not None and wandb.project is not None:
            self._wandb = WandbSink.open(wandb, run_dir, config)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = {
            key: value
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(step, scalars)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close()


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory since the last call, in GiB (allocated and reserved); empty on CPU."""
    if device.type != "cuda":
        return {}
    stats = {
        "gpu_mem_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "gpu_mem_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }
    torch.cuda.reset_peak_memory_stats(device)
    return stats


def throughput(
    flops_per_sample: float, samples_per_gpu: float, seconds: float, peak_tflops: float | None
) -> dict[str, float]:
    """``tflops_per_gpu`` of a step of ``samples_per_gpu`` samples per GPU taking ``seconds``, and
    ``mfu`` against the device's bf16 peak when it is known."""
    tflops = flops_per_sample * samples_per_gpu / seconds / 1e12
    return {"tflops_per_gpu": tflops} | ({"mfu": tflops / peak_tflops} if peak_tflops else {})
