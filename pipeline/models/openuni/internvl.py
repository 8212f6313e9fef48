"""InternVL3 in its released key layout: InternViT ``vision_model``, pixel shuffle, ``mlp1``, Qwen2.5.

``transformers`` ships InternViT only as ``InternVLVisionModel``, whose parameters are renamed
(``embeddings.cls_token``, ``encoder.layer.N.attention.q_proj``, ``lambda_1``, ...), so the
released InternVL3 checkpoints (``vision_model.embeddings.class_embedding``,
``vision_model.encoder.layers.N.attn.qkv``, ``ls1``, ``norm1``, ...) would not load into it.
The InternViT blocks are written here with the original attribute names; the LLM is the
``transformers`` ``Qwen2ForCausalLM``, as in InternVL's own code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from pipeline.models.openuni.config import LLMConfig, VisionConfig
from pipeline.models.common.qwen import qwen2_config


def _norm(cfg: VisionConfig, width: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return LlamaRMSNorm(width, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(width, eps=cfg.layer_norm_eps)


class InternVisionEmbeddings(nn.Module):
    """Class token + 14×14 patch convolution + learned positions (bicubic-resized to other grids)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.grid = cfg.grid_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size
        )
        self.position_embedding = nn.Parameter(torch.randn(1, self.grid**2 + 1, cfg.hidden_size))

    def _grid_positions(self, height: int, width: int) -> Tensor:
        grid = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return grid
        square = grid.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        resized = F.interpolate(square, size=(height, width), mode="bicubic", align_corners=False)
        return resized.flatten(2).transpose(1, 2).to(grid.dtype)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        height, width = patches.shape[-2:]
        tokens = torch.cat(
            [self.class_embedding.expand(len(pixels), -1, -1), patches.flatten(2).transpose(1, 2)],
            1,
        )
        positions = torch.cat(
            [self.position_embedding[:, :1], self._grid_positions(height, width)], dim=1
        )
        return tokens + positions


class InternAttention(nn.Module):
    """Bidirectional multi-head attention with a fused ``qkv`` and optional full-width qk RMS norm."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.qk_normalization = cfg.qk_normalization
        if cfg.qk_normalization:
            self.q_norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
            self.k_norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.qk_normalization:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (
            t.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class InternMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class InternVisionEncoderLayer(nn.Module):
    """Pre-norm block with layer scale: ``x + ls1·attn(norm1 x)``, ``x + ls2·mlp(norm2 x)``.

    InternVL3's ``drop_path_rate`` (stochastic depth, 0.1 in its config) is a training-time
    regulariser of InternVL's own fine-tuning; it is not applied here, so a step is a pure
    function of the weights, the batch and the generator.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attn = InternAttention(cfg)
        self.mlp = InternMLP(cfg)
        self.norm1 = _norm(cfg, cfg.hidden_size)
        self.norm2 = _norm(cfg, cfg.hidden_size)
        self.ls1 = nn.Parameter(cfg.initializer_factor * torch.ones(cfg.hidden_size))
        self.ls2 = nn.Parameter(cfg.initializer_factor * torch.ones(cfg.hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x).to(x.dtype)) * self.ls1
        return x + self.mlp(self.norm2(x).to(x.dtype)) * self.ls2


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            InternVisionEncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)
        )


class InternVisionModel(nn.Module):
    """InternViT: pixels [B, 3, S, S] → hidden states [B, 1 + (S/p)², D] of the last layer."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)
        self.gradient_checkpointing = False

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings(pixels)
        for layer in self.encoder.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


def pixel_shuffle(x: Tensor, scale: float) -> Tensor:
    """InternVL ``pixel_shuffle`` (``ps_version`` v2): [B, H, W, C] → [B, H·s, W·s, C/s²].

    Output cell (i, j) concatenates input cells (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)
    (for s = 0.5), so token i·W·s + j covers the image region of rows 2i…2i+1, columns 2j…2j+1.
    """
    b, h, w, c = x.shape
    x = x.reshape(b, h, round(w * scale), round(c / scale)).permute(0, 2, 1, 3)
    x = x.reshape(b, round(w * scale), round(h * scale), round(c / scale**2))
    return x.permute(0, 2, 1, 3).contiguous()


def internvl_qwen2_config(cfg: LLMConfig, vocab_size: int, attn_implementation: str) -> Qwen2Config:
    """The InternVL3 LLM's config: default RoPE, or dynamic NTK scaling when ``rope_dynamic_factor`` is set."""
    rope = None
    if cfg.rope_dynamic_factor is not None:
        rope = {
            "rope_type": "dynamic",
            "rope_theta": cfg.rope_theta,
            "factor": cfg.rope_dynamic_factor,
        }
    return qwen2_config(cfg, vocab_size, attn_implementation, rope)


class InternVLRotaryEmbedding(Qwen2RotaryEmbedding):
    """Qwen2 RoPE whose dynamic NTK update can be decided from a bound instead of the positions.

    ``transformers``' ``dynamic_rope_update`` reads ``max(position_ids) + 1`` on the host at every
    call: a device sync, and a data-dependent value under fake tensors. While ``bound`` is set
    (:meth:`InternVLChat.positions_below`) the caller guarantees every position is below it; if
    the bound fits ``max_position_embeddings`` and no longer sequence grew the frequencies, the
    update would change nothing, so the frequencies are used as they are, with no read.
    """

    bound: int | None = None

    def forward(self, x: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        original = self.original_max_seq_len
        unchanged = (
            self.bound is not None
            and self.bound <= original
            and isinstance(self.max_seq_len_cached, int)
            and self.max_seq_len_cached == original
        )
        if unchanged:
            return Qwen2RotaryEmbedding.forward.__wrapped__(self, x, position_ids)
        return super().forward(x, position_ids)


class InternVLChat(nn.Module):
    """``InternVLChatModel``'s modules: ``vision_model``, ``mlp1`` and ``language_model``."""

    def __init__(
        self,
        vision: VisionConfig,
        llm: LLMConfig,
        vocab_size: int,
        downsample_ratio: float,
        attn_implementation: str = "sdpa",
    ) -> None:
        super().__init__()
        self.downsample_ratio = downsample_ratio
        merged = vision.hidden_size * round(1 / downsample_ratio) ** 2
        self.vision_model = InternVisionModel(vision)
        width = llm.hidden_size
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(merged), nn.Linear(merged, width), nn.GELU(), nn.Linear(width, width)
        )
        self.language_model = Qwen2ForCausalLM(
            internvl_qwen2_config(llm, vocab_size, attn_implementation)
        )
        self.reset_rotary_embedding()

    def reset_rotary_embedding(self) -> None:
        """A fresh :class:`InternVLRotaryEmbedding` (its buffers are in no checkpoint)."""
        self.language_model.model.rotary_emb = InternVLRotaryEmbedding(self.language_model.config)

    @contextmanager
    def positions_below(self, bound: int) -> Iterator[None]:
        """LLM calls inside promise position ids below ``bound`` (whole sequences, no cache)."""
        rotary = self.language_model.model.rotary_emb
        rotary.bound = bound
        try:
            yield
        finally:
            rotary.bound = None

    def extract_feature(self, pixels: Tensor) -> Tensor:
        """``V_enc``: ViT-normalised pixels [B, 3, S, S] → visual tokens [B, (S/p·r)², D_llm]."""
        hidden = self.vision_model(pixels)[:, 1:]
        side = round(hidden.shape[1] ** 0.5)
        grid = pixel_shuffle(hidden.reshape(len(hidden), side, side, -1), self.downsample_ratio)
        return self.mlp1(grid.flatten(1, 2))
