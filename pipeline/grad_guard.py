"""The gradient guard: an optimizer step whose global gradient norm is not finite, or above
``optim.skip_grad_norm_above``, updates nothing.

DeepSpeed's ZeRO optimizer already computes the global norm (all-reduced over the ranks) before
its update and skips the whole step, gradients of every micro-step included, when that norm is
not finite (its overflow check; the LR schedule does not advance then). The guard hands it an
infinite norm when the real one is above the threshold, so an exploding gradient takes the same
path, and keeps the real norm for the log. Nothing is read back to the host here.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

SKIPPED_STEPS_FILE = "skipped_steps.jsonl"
FAULT_ENV = "INFOTOK_FAULT"  # test hook: "grad:STEP:FACTOR" scales step STEP's first micro-loss


def injected_fault() -> tuple[int, float] | None:
    """(step, factor) from ``INFOTOK_FAULT=grad:STEP:FACTOR``: the tests' way to give one step an
    infinite (``inf``) or huge (e.g. ``1e6``) gradient."""
    kind, _, rest = os.environ.get(FAULT_ENV, "").partition(":")
    if kind != "grad":
        return None
    step, _, factor = rest.partition(":")
    return int(step), float(factor)


class GradGuard:
    """Installed on a DeepSpeed ZeRO optimizer (``engine.optimizer``)."""

    def __init__(self, optimizer: Any, threshold: float) -> None:
        self.threshold = threshold
        self.norm: Tensor | None = None  # the last step's real global norm (unscaled)
        measure = optimizer.scaled_global_norm

        def guarded(*args: Any, **kwargs: Any) -> Tensor:
            scaled = measure(*args, **kwargs)
            self.norm = scaled.detach() / optimizer.loss_scale
            if threshold > 0:
                too_large = scaled > threshold * optimizer.loss_scale
                scaled = torch.where(too_large, torch.full_like(scaled, float("inf")), scaled)
            return scaled

        optimizer.scaled_global_norm = guarded

    def reason(self, norm: float) -> str:
        if norm != norm or norm in (float("inf"), float("-inf")):
            return "non-finite gradient norm"
        return f"gradient norm {norm:.4g} above optim.skip_grad_norm_above={self.threshold:g}"
