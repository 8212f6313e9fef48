"""Show-o2 modules that have no ``transformers`` / ``diffusers`` class.

Attribute names follow the released checkpoint (e.g. ``proj``, ``mlp.0``, ``adaLN_modulation.1``,
``self_attn.q_norm``); the transformer pieces (MLP, RMSNorm, RoPE) are ``transformers`` Llama
classes, which the official flow head copies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, apply_rotary_pos_emb

from pipeline.models.showo2.config import FlowHeadConfig


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch × patch`` convolution: latents [B, C, H, W] → tokens [B, HW/p², D]."""

    def __init__(self, in_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t ∈ [0, 1] (t is not rescaled) followed by a 2-layer MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x·(1+scale)+shift`` in float32, as the official head does."""
    return (x.float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def flow_llama_config(cfg: FlowHeadConfig) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        mlp_bias=False,
        attention_bias=False,
        hidden_act="silu",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position_embeddings,
        },
    )


class FlowAttention(nn.Module):
    """Grouped-query attention with per-head RMS qk-norm and RoPE, under an additive mask."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        width = config.hidden_size
        self.q_proj = nn.Linear(width, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(width, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, width, bias=False)
        self.q_norm = LlamaRMSNorm(self.head_dim)
        self.k_norm = LlamaRMSNorm(self.head_dim)

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        b, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2))
        k = self.k_norm(self.k_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *rope)
        repeat = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class ModulatedAttentionBlock(nn.Module):
    """A pre-norm transformer block whose image positions are adaLN-modulated by the timestep.

    ``image_span`` [B, L, 1] is 1 inside each sample's image (time token included), 0 on text,
    where the block acts as a plain transformer layer (shift = scale = 0, gate = 1).
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = FlowAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(config.hidden_size, 6 * config.hidden_size)
        )

    def forward(
        self,
        x: Tensor,
        t_emb: Tensor,
        image_span: Tensor,
        mask: Tensor,
        rope: tuple[Tensor, Tensor],
    ) -> Tensor:
        chunks = self.adaLN_modulation(t_emb)[:, None, :].chunk(6, dim=-1)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (c * image_span for c in chunks)
        h = modulate(self.input_layernorm(x), shift_a, scale_a)
        x = x + (1 + gate_a - image_span) * self.self_attn(h, mask, rope)
        h = modulate(self.post_attention_layernorm(x), shift_m, scale_m)
        return x + (1 + gate_m - image_span) * self.mlp(h)


class FinalLayer(nn.Module):
    """Modulated RMSNorm + linear map to one latent patch (p·p·C values) per position."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = LlamaRMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, t_emb: Tensor, image_span: Tensor) -> Tensor:
        shift, scale = (
            c * image_span for c in self.adaLN_modulation(t_emb)[:, None, :].chunk(2, dim=-1)
        )
        return self.linear(modulate(self.norm_final(x), shift, scale))
