"""The MAR encoder/decoder of Harmon (``src/models/mar/mar.py`` in wusize/Harmon).

Attribute names are the released checkpoint's keys under ``mar.``. The transformer blocks are
timm 0.9 ``vision_transformer.Block`` (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``) written here so that timm is not needed.

Layouts: ``tokens`` [B, N, C] are VAE latent patches in raster order; ``mask`` [B, N] is True
where a token is masked (dropped from the encoder, predicted by the decoder). The encoder sequence
is ``buffer_size`` buffer tokens (``fake_latent``) followed by the kept image tokens; in training
it has a fixed length, padded with masked tokens that attention ignores (the kept count is random
and would otherwise be read back from the device).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.harmon.config import MARConfig
from pipeline.models.harmon.diffloss import DiffLoss


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        q, k, v = (
            self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block (LayerNorm eps 1e-6, qkv bias, GELU MLP, dropout on attention and projections)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        """``attn_mask``: None or [B, 1, 1, L], False at keys no token may attend to."""
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def resize_grid(table: Tensor, side: int, grid: tuple[int, int]) -> Tensor:
    """[1, side², D] raster position table → [1, h·w, D]: bilinear (align_corners=False) when the grid differs."""
    if grid == (side, side):
        return table
    square = table.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(square, size=grid, mode="bilinear", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


def keep_mask(mask: Tensor, buffer_size: int) -> Tensor:
    """[B, buffer + N] True for the buffers and the unmasked tokens (the encoder's sequence)."""
    return torch.cat([mask.new_ones(mask.shape[0], buffer_size), ~mask], dim=1)


def slot_valid(mask: Tensor, buffer_size: int, slots: int) -> Tensor:
    """[B, buffer + slots] True where the fixed-length encoder sequence of :func:`kept_first`
    holds a buffer or a kept token, False at its padding."""
    kept = buffer_size + (~mask).sum(dim=1, keepdim=True)
    return torch.arange(buffer_size + slots, device=mask.device)[None] < kept


def kept_first(mask: Tensor, buffer_size: int, slots: int) -> Tensor:
    """[B, buffer + slots] positions in the buffer-first sequence: the buffers and the kept tokens
    in raster order, then masked tokens as padding (a stable sort: fixed shape, no host sync)."""
    dropped = (~keep_mask(mask, buffer_size)).to(torch.uint8)
    return torch.sort(dropped, dim=1, stable=True).indices[:, : buffer_size + slots]


def sample_mask_ratio(
    mask_ratio_min: float, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """One draw of N(1, 0.25²) truncated to [mask_ratio_min, 1] (official ``stats.truncnorm``), by
    inverse CDF: a 0-d float64 tensor on ``device`` (reading it would stall the device)."""
    start = torch.full((), (mask_ratio_min - 1.0) / 0.25, dtype=torch.float64, device=device)
    low = torch.special.ndtr(start)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=device)
    return 1.0 + 0.25 * torch.special.ndtri(low + u * (0.5 - low))


def max_kept(length: int, mask_ratio_min: float) -> int:
    """The most tokens :func:`training_mask` keeps: ``N − ceil(N·mask_ratio_min)``."""
    return length - math.ceil(length * mask_ratio_min)


def random_orders(
    batch: int, length: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """A uniformly random permutation of the token indices per sample [B, N]."""
    return torch.rand(batch, length, generator=generator, device=device).argsort(dim=1)


def mask_first(orders: Tensor, count: int | Tensor) -> Tensor:
    """[B, N] True at the first ``count`` positions of each order (``count`` may be a device
    tensor: each position's rank in its order is compared with it)."""
    ranks = torch.arange(orders.shape[1], device=orders.device).expand_as(orders)
    return torch.empty_like(orders).scatter(1, orders, ranks) < count


def training_mask(
    batch: int,
    length: int,
    mask_ratio_min: float,
    generator: torch.Generator | None,
    device: torch.device,
) -> Tensor:
    """The T2I training mask: one ratio per batch, ``ceil(N·ratio)`` random tokens masked per sample.

    Draws from ``generator``: the ratio, then the orders. The count stays on the device: the float64
    product and ceil equal Python's on the same ratio. It is clamped to keep at most
    :func:`max_kept` tokens, which only a ratio rounded below ``mask_ratio_min`` would exceed.
    """
    ratio = sample_mask_ratio(mask_ratio_min, generator, device)
    orders = random_orders(batch, length, generator, device)
    count = torch.ceil(ratio * length).long().clamp_min(length - max_kept(length, mask_ratio_min))
    return mask_first(orders, count)


class MAR(nn.Module):
    """MAR encoder + decoder + diffusion head. ``class_emb`` (ImageNet labels) is unused by Harmon but
    is part of the released checkpoints; it is frozen. The learned position tables hold
    ``position_side``² image positions (resized to each image's token grid)."""

    def __init__(
        self,
        cfg: MARConfig,
        token_dim: int,
        position_side: int,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.position_side = position_side
        self.gradient_checkpointing = gradient_checkpointing
        enc, dec, seq = cfg.encoder_embed_dim, cfg.decoder_embed_dim, position_side**2
        self.class_emb = nn.Embedding(cfg.class_num, enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, enc))
        self.z_proj = nn.Linear(token_dim, enc)
        self.z_proj_ln = nn.LayerNorm(enc, eps=1e-6)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq + cfg.buffer_size, enc))
        self.encoder_blocks = nn.ModuleList(
            Block(enc, cfg.encoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.encoder_depth)
        )
        self.encoder_norm = nn.LayerNorm(enc, eps=1e-6)
        self.decoder_embed = nn.Linear(enc, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, seq + cfg.buffer_size, dec))
        self.decoder_blocks = nn.ModuleList(
            Block(dec, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, seq, dec))
        self._init_weights()
        self.diffloss = DiffLoss(token_dim, dec, cfg, gradient_checkpointing)
        self.class_emb.requires_grad_(False)

    def _init_weights(self) -> None:
        """Official ``initialize_weights``: N(0, 0.02) embeddings, xavier linears, unit LayerNorms."""
        for p in (
            self.class_emb.weight,
            self.fake_latent,
            self.mask_token,
            self.encoder_pos_embed_learned,
            self.decoder_pos_embed_learned,
            self.diffusion_pos_embed_learned,
        ):
            nn.init.normal_(p, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _positions(self, table: Tensor, grid: tuple[int, int], buffers: bool) -> Tensor:
        """Position embeddings for a token grid; the image part is resized, buffers are kept."""
        buffer, image = table.split(
            [self.cfg.buffer_size if buffers else 0, self.position_side**2], dim=1
        )
        return torch.cat([buffer, resize_grid(image, self.position_side, grid)], dim=1)

    def _run(self, blocks: nn.ModuleList, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        for block in blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attn_mask, use_reentrant=False)
            else:
                x = block(x, attn_mask)
        return x

    def forward_encoder(
        self, tokens: Tensor, mask: Tensor | None, grid: tuple[int, int], slots: int | None = None
    ) -> Tensor:
        """Tokens [B, N, C] → encoder features [B, buffer + S, E].

        Without ``mask`` every token is kept (S = N). With it the kept tokens follow the buffers in
        raster order; ``slots`` fixes S (training: no host sync, fixed shapes) by padding with
        masked tokens that attention ignores (:func:`slot_valid`); without ``slots``, S is the kept
        count, read on the host (equal across the batch; inference).
        """
        x = self.z_proj(tokens.to(self.z_proj.weight.dtype))
        b, n, width = x.shape
        buffers = self.fake_latent.expand(b, self.cfg.buffer_size, width)
        x = torch.cat([buffers, x], dim=1) + self._positions(
            self.encoder_pos_embed_learned, grid, buffers=True
        )
        x = self.z_proj_ln(x)
        attn_mask = None
        if mask is not None:
            if slots is not None:
                attn_mask = slot_valid(mask, self.cfg.buffer_size, slots)[:, None, None]
            else:
                slots = n - int(mask[0].sum())
            index = kept_first(mask, self.cfg.buffer_size, slots)
            x = x.gather(1, index[..., None].expand(-1, -1, width))
        return self.encoder_norm(self._run(self.encoder_blocks, x, attn_mask))

    def forward_decoder(self, x: Tensor, mask: Tensor, grid: tuple[int, int]) -> Tensor:
        """Encoder-side features [B, buffer + S, E] (the layout of :meth:`forward_encoder`, padded
        or not) → diffusion conditions [B, N, D] for every token; masked ones get ``mask_token``."""
        x = self.decoder_embed(x)
        keep = keep_mask(mask, self.cfg.buffer_size)
        # A kept position's slot in the encoder sequence is its rank among the kept positions.
        slot = (keep.long().cumsum(dim=1) - 1).clamp_min(0)
        x = x.gather(1, slot[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.where(keep[..., None], x, self.mask_token.to(x.dtype))
        x = x + self._positions(self.decoder_pos_embed_learned, grid, buffers=True)
        x = self.decoder_norm(self._run(self.decoder_blocks, x))[:, self.cfg.buffer_size :]
        return x + self._positions(self.diffusion_pos_embed_learned, grid, buffers=False)
