"""Small constant tensors made on the device without a host sync."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def filled(values: Sequence[float], device: torch.device) -> Tensor:
    """``torch.tensor(values, device=device)`` (float32) without a blocking host-to-device copy:
    one fill kernel per value, so a training step that needs the constants does not wait."""
    return torch.stack([torch.full((), v, dtype=torch.float32, device=device) for v in values])
