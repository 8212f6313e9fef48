"""The Qwen2.5 decoder config that Show-o2, Harmon and OpenUni (InternVL3) build their LLM from."""

from __future__ import annotations

from typing import Any, Protocol

from transformers import Qwen2Config


class QwenOptions(Protocol):
    """The fields of a family's ``llm`` config section."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool


def qwen2_config(llm: QwenOptions, vocab_size: int, attn_implementation: str,
                 rope_parameters: dict[str, Any] | None = None) -> Qwen2Config:
    """``Qwen2Config`` for ``Qwen2ForCausalLM``; RoPE is the default kind unless ``rope_parameters`` says."""
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
