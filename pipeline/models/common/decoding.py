"""Greedy decoding with a KV cache: the loop every family's ``answer`` runs after the prompt."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def greedy_decode(
    hidden: Tensor,
    step: Callable[[Tensor], Tensor],
    lm_head: nn.Module,
    eos: int,
    max_new_tokens: int,
) -> list[list[int]]:
    """Token ids of each row up to (without) ``eos``.

    ``hidden`` [B, L, D] are the last hidden states of the (cached) prompts; ``step(next_ids [B])``
    feeds one token per row through the LLM with the family's cache, mask and positions and
    returns the new hidden states [B, 1, D]. Finished rows keep emitting ``eos``; the loop stops
    when every row has finished or after ``max_new_tokens``.
    """
    generated = []
    finished = torch.zeros(len(hidden), dtype=torch.bool, device=hidden.device)
    for _ in range(max_new_tokens):
        next_ids = lm_head(hidden[:, -1]).argmax(-1).masked_fill(finished, eos)
        generated.append(next_ids)
        finished |= next_ids == eos
        if bool(finished.all()):
            break
        hidden = step(next_ids)
    rows = torch.stack(generated, dim=1).tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


def decode_texts(tokenizer: PreTrainedTokenizerBase, rows: list[list[int]]) -> list[str]:
    """The text of each row of token ids, special tokens dropped."""
    return [tokenizer.decode(row, skip_special_tokens=True) for row in rows]
