"""The Qwen2.5 decoder that Show-o2, Harmon and OpenUni (InternVL3) build their LLM from: its
config section and the ``transformers`` config made from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from transformers import Qwen2Config

from pipeline.config import param


@dataclass
class QwenConfig:
    """Qwen2.5 decoder (``transformers`` ``Qwen2ForCausalLM``); defaults: Qwen2.5-1.5B-Instruct.

    A family whose released LLM differs subclasses it with its own defaults.
    """

    vocab_size: int | None = param(151936, gt=0, help="embedding rows; null = len(tokenizer)")
    hidden_size: int = param(1536, gt=0)
    intermediate_size: int = param(8960, gt=0)
    num_hidden_layers: int = param(28, gt=0)
    num_attention_heads: int = param(12, gt=0)
    num_key_value_heads: int = param(2, gt=0)
    rms_norm_eps: float = param(1e-6, gt=0)
    rope_theta: float = param(1e6, gt=0)
    max_position_embeddings: int = param(32768, gt=0)
    tie_word_embeddings: bool = param(True, help="whether lm_head shares embed_tokens' weight")


def qwen2_config(
    llm: QwenConfig,
    vocab_size: int,
    attn_implementation: str,
    rope_parameters: dict[str, Any] | None = None,
) -> Qwen2Config:
    """``Qwen2Config`` for ``Qwen2ForCausalLM``; RoPE is the default kind unless
    ``rope_parameters`` says."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_hidden_layers,
        num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.num_key_value_heads,
        rms_norm_eps=llm.rms_norm_eps,
        max_position_embeddings=llm.max_position_embeddings,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": llm.rope_theta},
        tie_word_embeddings=llm.tie_word_embeddings,
        use_sliding_window=False,
        attn_implementation=attn_implementation,
    )
