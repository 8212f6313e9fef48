"""Text targets shared by the families: the label convention, padding, the answer cross-entropy,
the answer tokens InfoTok's sufficiency decoder reads, and pooled text features."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE = -100
"""Label of a position that is not an answer token (PyTorch's cross-entropy ``ignore_index``)."""
IMAGE_PLACEHOLDER = "<image>"
"""Where a conversation's image goes (DESIGN §3: I2T user turns hold one)."""


def pad_rows(rows: Sequence[Tensor], value: int | bool, *, left: bool = False) -> Tensor:
    """1-D tensors padded with ``value`` to the longest (on the right, or the left) and stacked."""
    length = max(len(r) for r in rows)
    pads = [(length - len(r), 0) if left else (0, length - len(r)) for r in rows]
    return torch.stack([F.pad(r, p, value=value) for r, p in zip(rows, pads)])


def answer_loss(
    lm_head: nn.Module, hidden: Tensor, labels: Tensor, max_answer: int | None = None
) -> Tensor:
    """Next-token cross-entropy over the answer tokens: ``hidden`` [B, L, D] at position i predicts
    ``labels`` [B, L] at i + 1; only labels that are not :data:`IGNORE` count (``loss_i2t``).

    ``max_answer`` bounds each row's answer tokens (default L - 1: every position); a caller that
    knows a tighter bound from shapes saves logits. The answer positions are gathered in order to
    the front of ``B * max_answer`` rows and the rest ignored: fixed shapes, no host sync, and the
    same sum in the same order as over the answer tokens alone.
    """
    targets = labels[:, 1:]
    width = targets.shape[1]
    count = len(labels) * min(width if max_answer is None else max_answer, width)
    order = valid_first(targets.reshape(-1) != IGNORE, count)
    logits = lm_head(hidden[:, :-1][order // width, order % width])
    return F.cross_entropy(logits.float(), targets.reshape(-1)[order], ignore_index=IGNORE)


def answer_tokens(labels: Tensor, length: int | None = None) -> tuple[Tensor, Tensor]:
    """``answer_ids`` / ``answer_mask`` [B, length]: the tokens of each row whose label is not
    :data:`IGNORE`, left-aligned and right-padded with 0.

    ``length`` must be at least the longest answer: a bound known from shapes keeps the training
    step free of host syncs; None reads the longest answer's length to the host.
    """
    valid = labels != IGNORE
    if length is None:
        length = max(int(valid.sum(1).max()), 1)
    order = valid_first(valid, length)
    mask = valid.gather(1, order)
    return labels.gather(1, order).clamp_min(0).masked_fill(~mask, 0), mask


def valid_first(valid: Tensor, length: int) -> Tensor:
    """Indices along the last dim of ``valid``: its True positions in order, then the False ones,
    cut to the first ``length``."""
    return torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[..., :length]


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B, L, D] over positions where ``mask`` [B, L] is True (pooled ``text_*``)."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1)


def left_pad_prompts(
    sequences: Sequence[dict[str, Tensor | int]], pad_id: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Prompts of one image each, left-padded for batched decoding: token ids [B, L], each
    prompt's ``image_offset`` moved by its padding [B], and the mask of real tokens [B, L]."""
    rows = [s["input_ids"] for s in sequences]
    ids = pad_rows(rows, pad_id, left=True).to(device)
    pads = torch.tensor([ids.shape[1] - len(r) for r in rows], device=device)
    offsets = torch.tensor([s["image_offset"] for s in sequences], device=device) + pads
    valid = torch.arange(ids.shape[1], device=device)[None] >= pads[:, None]
    return ids, offsets, valid
