"""Held-out losses per term, the rate of the shared tokens, and the (pooled z_u, text_u) pairs for CKA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data import STREAMS, DataConfig, TwoStreamLoader, parse_dataset_spec, read_manifest
from pipeline.eval.loading import EvalModel


@dataclass
class HeldOut:
    losses: dict[str, float]  # mean over batches of every term (MLLM losses, InfoTok terms)
    batches: int
    samples: dict[str, int]
    pooled_tokens: np.ndarray  # [n, D] mean over tokens of z_u
    text: np.ndarray  # [n, T] pooled text features of the same I2T samples
    notes: list[str] = field(default_factory=list)


def _stream_totals(datasets: Sequence[str]) -> dict[str, int]:
    totals = {}
    for stream in STREAMS:
        total = 0
        for spec in datasets:
            try:
                total += sum(s.count for s in read_manifest(parse_dataset_spec(spec)[0], stream))
            except ValueError:
                pass
        totals[stream] = total
    return totals


@torch.no_grad()
def evaluate_heldout(
    model: EvalModel, datasets: Sequence[str], *, batch_size: int, max_batches: int, seed: int = 0
) -> HeldOut:
    """One pass over at most ``max_batches`` batches, no sample seen twice (epoch 0 of every stream)."""
    totals = _stream_totals(datasets)
    sizes = {s: batch_size if totals[s] >= batch_size else 0 for s in STREAMS}
    if not any(sizes.values()):
        raise ValueError(
            f"{', '.join(datasets)}: fewer than {batch_size} samples of either task ({totals})"
        )
    batches = min(max_batches, *(totals[s] // sizes[s] for s in STREAMS if sizes[s]))
    cfg = DataConfig(
        i2t=list(datasets),
        t2i=list(datasets),
        micro_batch_i2t=sizes["i2t"],
        micro_batch_t2i=sizes["t2i"],
        num_workers=0,
        shuffle_block=1 << 30,
        seed=seed,
    )
    adapter = model.adapter
    loader = TwoStreamLoader(cfg, adapter.processor, adapter.collate)
    torch.manual_seed(seed)  # the regularizer's reparameterisation noise
    generator = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {}
    pooled, text = [], []
    for _, item in zip(range(batches), loader):
        out = adapter(item["inputs"], generator=generator)
        _, terms = model.objective.loss_terms(out)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if out.z_u is not None and out.text_u is not None:
            pooled.append(out.z_u.float().mean(dim=1).numpy())
            text.append(out.text_u.float().numpy())
    notes = (
        []
        if model.objective.has_heads
        else [
            "no trained InfoTok heads (exported model or mode off): InfoTok terms and the rate are not reported"
        ]
    )
    width = adapter.infotok_dims()["token_dim"]
    return HeldOut(
        losses={k: v / batches for k, v in sorted(sums.items())},
        batches=batches,
        samples={s: sizes[s] * batches for s in STREAMS},
        pooled_tokens=np.concatenate(pooled) if pooled else np.zeros((0, width)),
        text=np.concatenate(text) if text else np.zeros((0, width)),
        notes=notes,
    )
