"""The InfoTok regularizer (paper Section 3.2, Eqs. 7-10).

Per branch b in {u (understanding), g (generation)}, on the shared visual tokens z_b [B, N, D]:

    f_b(z_b) -> q(z~ | I) = N(mu, diag(sigma^2)) over ``latent_dim`` dims per token   (Eq. 4)
    z~ = mu + sigma * eps                                                             (reparam.)
    L_b = KL(q || N(0, I))  -  beta_b * log p(Y_b | z~)  -  alpha_b * I^(mean(mu), T_b)  (Eq. 10)

and L_InfoTok = L_u + L_g (Eq. 6). The regularizer returns ``total = lam * L_InfoTok``, the amount
the trainer adds to the MLLM loss (Eq. 11), and every term separately for logging.

Normalisation (so that no term grows with resolution, answer length or latent channels):
``kl_b`` is nats per visual token (summed over the latent dims, averaged over tokens and batch);
``suff_u`` is nats per answer token; ``suff_g`` is nats per latent element; ``align_b`` is
Eq. 9's estimate (mean log-softmax of the positive pair, <= 0; the MI bound is align + log K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import param

BRANCHES = ("u", "g")
_IGNORE = -100
"""Target of a padding position: ``F.cross_entropy``'s default ``ignore_index``."""


@dataclass
class InfoTokConfig:
    """InfoTok hyper-parameters. The paper publishes no values; each default says why it is set so."""

    mode: Literal["off", "cs", "csa"] = param(
        "csa", help="off: plain fine-tuning; cs: compactness+sufficiency; csa: + alignment (Tab. 5)"
    )
    lam: float = param(
        0.1,
        ge=0,
        help="lambda of Eq. 11; at init the regularizer is then O(1) next to L_MLLM (~1-3 nats)",
    )
    beta_u: float = param(
        1.0,
        ge=0,
        help="sufficiency weight, understanding; 1 weighs a nat of answer likelihood like a nat of rate",
    )
    beta_g: float = param(
        1.0,
        ge=0,
        help="sufficiency weight, generation (per latent element, so independent of VAE channels)",
    )
    alpha_u: float = param(
        1.0, ge=0, help="alignment weight, understanding; InfoNCE is O(log batch) nats"
    )
    alpha_g: float = param(1.0, ge=0, help="alignment weight, generation")
    tau: float = param(0.07, gt=0, help="InfoNCE temperature; CLIP's initial value")
    latent_dim: int = param(
        64,
        ge=1,
        help="d, Gaussian dims per token; small against D (1536-3584) so the bottleneck binds",
    )
    gather_negatives: bool = param(
        True, help="use every rank's texts as InfoNCE negatives (more negatives = tighter bound)"
    )
    logvar_limit: float = param(
        10.0, gt=0, help="log-variance is soft-clamped to +-limit so extreme inputs stay finite"
    )
    decoder_hidden: int = param(256, ge=8, help="width of the lightweight sufficiency decoders")
    decoder_heads: int = param(
        4, ge=1, help="attention heads of the answer decoder's cross-attention"
    )
    vocab_rank: int = param(
        64,
        ge=1,
        help="width of the answer decoder's class-factored token tables (2 sqrt(V) x rank, not d x V)",
    )

    def __post_init__(self) -> None:
        if self.decoder_hidden % self.decoder_heads:
            raise ValueError(
                f"decoder_hidden ({self.decoder_hidden}) must be divisible by decoder_heads ({self.decoder_heads})"
            )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def uses_alignment(self) -> bool:
        return self.mode == "csa"


@dataclass
class InfoTokDims:
    """Sizes the wrapped model declares (``adapter.infotok_dims()``)."""

    token_dim: int
    text_dim: int
    vocab_size: int
    latent_patch_dim: int


@dataclass
class InfoTokOutput:
    """``total`` is lam * L_InfoTok, ready to add to L_MLLM; ``terms`` holds every term (unweighted)."""

    total: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)), summed over the last dim, in float32."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def info_nce(
    image_emb: Tensor, text_emb: Tensor, tau: float, positives: Tensor | None = None
) -> Tensor:
    """Eq. 9: mean over images of log softmax_k(cos(img_i, txt_k) / tau) at the positive text.

    ``text_emb`` may hold more rows than ``image_emb`` (negatives from other ranks); ``positives``
    gives each image's row in it (default: row i for image i). Higher means better aligned.
    """
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    logits = img @ txt.t() / tau
    if positives is None:
        positives = torch.arange(img.shape[0], device=img.device)
    return logits.log_softmax(dim=-1).gather(1, positives[:, None]).mean()


def soft_clamp(x: Tensor, limit: float) -> Tensor:
    """Smooth clamp to (-limit, limit): identity near 0, keeps a gradient everywhere."""
    return limit * torch.tanh(x / limit)


class TokenPosterior(nn.Module):
    """f_b: shared tokens [.., D] -> (mu, logvar) [.., d], one matmul for both.

    The LayerNorm makes the head independent of each family's token scale (the three families'
    shared tokens come from different encoders and norms) and keeps huge inputs finite.
    """

    def __init__(self, token_dim: int, latent_dim: int, logvar_limit: float):
        super().__init__()
        self.norm = nn.LayerNorm(token_dim)
        self.proj = nn.Linear(token_dim, 2 * latent_dim)
        self.logvar_limit = logvar_limit

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.proj(self.norm(z)).chunk(2, dim=-1)
        return mu, soft_clamp(logvar, self.logvar_limit)


class AnswerDecoder(nn.Module):
    """p(answer ids | z~_u): a one-layer autoregressive decoder that cross-attends to the tokens.

    Query t = embedding of answer token t-1 (a learned BOS for t=0) + sinusoidal position t; it
    attends over z~_u (keys carry each token's raster position, so answers can refer to where
    things are) and predicts token t with a class-factored softmax: token y is the pair
    (y // B, y % B) with B = ceil(sqrt(V)), and p(y) = p(y // B) * p(y % B | y // B). The two
    small tables (~2 sqrt(V) x rank, 50k parameters at a 151k vocabulary) serve as input embeddings
    and, tied, as output layers. Every answer sequence gets a normalised probability (pairs past
    V only waste mass), so the log-likelihood is a valid variational lower bound (Eq. 8).
    """

    def __init__(self, latent_dim: int, vocab_size: int, hidden: int, heads: int, rank: int):
        super().__init__()
        self.bucket = math.ceil(math.sqrt(vocab_size))
        self.embed_hi = nn.Embedding(math.ceil(vocab_size / self.bucket), rank)
        self.embed_lo = nn.Embedding(self.bucket, rank)
        self.bos = nn.Parameter(torch.zeros(rank))
        self.query_in = nn.Linear(rank, hidden)
        self.token_in = nn.Linear(latent_dim, hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2 * rank))
        for table in (self.embed_hi, self.embed_lo):
            nn.init.normal_(table.weight, std=rank**-0.5)

    def embed(self, ids: Tensor) -> Tensor:
        return self.embed_hi(ids // self.bucket) + self.embed_lo(ids % self.bucket)

    def forward(self, z: Tensor, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
        """Mean negative log-likelihood per answer token (nats)."""
        b, length = answer_ids.shape
        prev = self.embed(answer_ids[:, :-1])
        prev = torch.cat([self.bos.expand(b, 1, -1).to(prev.dtype), prev], dim=1)
        q = self.query_in(prev)
        q = q + _sinusoid(length, q.shape[-1], q.device).to(q.dtype)
        kv = self.token_in(z.to(q.dtype))
        kv = kv + _sinusoid(z.shape[1], kv.shape[-1], kv.device).to(kv.dtype)
        h = q + self.attn(q, kv, kv, need_weights=False)[0]
        # Answer tokens first, in order, padding ignored: fixed shapes (no host sync), and the
        # means sum the same terms in the same order as over the answer tokens alone.
        order = torch.argsort((~answer_mask).reshape(-1).to(torch.int8), stable=True)
        valid = answer_mask.reshape(-1)[order]
        target = answer_ids.reshape(-1)[order].masked_fill(~valid, 0)
        hi, lo = target // self.bucket, target % self.bucket
        out_hi, out_lo = self.mlp(self.norm(h.reshape(-1, h.shape[-1])[order])).chunk(2, dim=-1)
        nll_hi = F.cross_entropy(
            (out_hi @ self.embed_hi.weight.t()).float(), hi.masked_fill(~valid, _IGNORE)
        )
        nll_lo = F.cross_entropy(
            ((out_lo + self.embed_hi(hi)) @ self.embed_lo.weight.t()).float(),
            lo.masked_fill(~valid, _IGNORE),
        )
        return nll_hi + nll_lo


class LatentDecoder(nn.Module):
    """p(target latent patch n | z~_g[n]): diagonal Gaussian, mean from an MLP, learned log-variance."""

    def __init__(self, latent_dim: int, patch_dim: int, hidden: int, logvar_limit: float):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.GELU(), nn.Linear(hidden, patch_dim)
        )
        self.logvar = nn.Parameter(torch.zeros(patch_dim))
        self.logvar_limit = logvar_limit

    def forward(self, z: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        """Mean Gaussian negative log-likelihood per latent element (nats) where ``mask`` is True.

        Masked tokens are weighted out rather than dropped (fixed shapes, no host sync); their
        targets are zeroed first, so whatever they hold cannot reach the loss or the gradients.
        """
        if mask is not None:
            target = target.masked_fill(~mask[..., None], 0)
        mean = self.mean(z).float()
        logvar = soft_clamp(self.logvar, self.logvar_limit).float()
        nll = 0.5 * (
            (target.float() - mean).square() * (-logvar).exp() + logvar + math.log(2 * math.pi)
        )
        if mask is None:
            return nll.mean()
        weights = mask[..., None].to(nll.dtype)
        return (nll * weights).sum() / (weights.sum() * nll.shape[-1]).clamp_min(1)


class InfoTokRegularizer(nn.Module):
    """Eq. 10 for both branches, one call per step. ``mode=off`` builds nothing and returns zero."""

    def __init__(self, cfg: InfoTokConfig, dims: InfoTokDims):
        super().__init__()
        self.cfg = cfg
        self.dims = dims
        if not cfg.enabled:
            return
        d, h = cfg.latent_dim, cfg.decoder_hidden
        self.posterior = nn.ModuleDict(
            {b: TokenPosterior(dims.token_dim, d, cfg.logvar_limit) for b in BRANCHES}
        )
        self.answer_decoder = AnswerDecoder(
            d, dims.vocab_size, h, cfg.decoder_heads, cfg.vocab_rank
        )
        self.latent_decoder = LatentDecoder(d, dims.latent_patch_dim, h, cfg.logvar_limit)
        if cfg.uses_alignment:
            self.text_proj = nn.ModuleDict(
                {
                    b: nn.Sequential(nn.LayerNorm(dims.text_dim), nn.Linear(dims.text_dim, d))
                    for b in BRANCHES
                }
            )

    def forward(
        self,
        *,
        z_u: Tensor | None = None,
        z_g: Tensor | None = None,
        text_u: Tensor | None = None,
        text_g: Tensor | None = None,
        answer_ids: Tensor | None = None,
        answer_mask: Tensor | None = None,
        target_patches: Tensor | None = None,
        target_mask: Tensor | None = None,
    ) -> InfoTokOutput:
        """Shared tokens [B, N, D] per branch (None = branch absent this step) and their targets."""
        anchor = next((t for t in (z_u, z_g) if t is not None), None)
        zero = torch.zeros((), device=anchor.device if anchor is not None else None)
        if not self.cfg.enabled:
            return InfoTokOutput(total=zero)
        terms: dict[str, Tensor] = {}
        loss = zero
        if z_u is not None:
            _require(answer_ids=answer_ids, answer_mask=answer_mask)
            loss = loss + self._branch(
                "u",
                z_u,
                text_u,
                terms,
                lambda z: self.answer_decoder(z, answer_ids, answer_mask.bool()),
            )
        if z_g is not None:
            _require(target_patches=target_patches)
            loss = loss + self._branch(
                "g",
                z_g,
                text_g,
                terms,
                lambda z: self.latent_decoder(z, target_patches, target_mask),
            )
        terms["infotok"] = loss
        return InfoTokOutput(total=self.cfg.lam * loss, terms=terms)

    def _branch(
        self, b: str, z: Tensor, text: Tensor | None, terms: dict[str, Tensor], nll
    ) -> Tensor:
        mu, logvar = self.posterior[b](z)
        z_tilde = mu + (0.5 * logvar).exp() * torch.randn_like(mu)
        kl = gaussian_kl(mu, logvar)
        terms[f"kl_{b}"] = kl.mean()
        terms[f"nats_per_image_{b}"] = kl.sum(dim=1).mean().detach()
        terms[f"suff_{b}"] = nll(z_tilde)
        loss = terms[f"kl_{b}"] + getattr(self.cfg, f"beta_{b}") * terms[f"suff_{b}"]
        if self.cfg.uses_alignment:
            _require(**{f"text_{b}": text})
            terms[f"align_{b}"] = self._alignment(b, mu.mean(dim=1), text)
            loss = loss - getattr(self.cfg, f"alpha_{b}") * terms[f"align_{b}"]
        return loss

    def _alignment(self, b: str, image_emb: Tensor, text: Tensor) -> Tensor:
        text_emb = self.text_proj[b](text)
        positives = None
        if (
            self.cfg.gather_negatives
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            # Differentiable all-gather: every rank's texts become negatives and gradients flow back.
            from torch.distributed.nn.functional import all_gather

            text_emb = torch.cat(all_gather(text_emb), dim=0)
            offset = dist.get_rank() * image_emb.shape[0]
            positives = torch.arange(offset, offset + image_emb.shape[0], device=image_emb.device)
        return info_nce(image_emb, text_emb, self.cfg.tau, positives)


def _require(**inputs: Tensor | None) -> None:
    missing = [name for name, value in inputs.items() if value is None]
    if missing:
        raise ValueError(f"InfoTok: the branch is present but {', '.join(missing)} is None")


def _sinusoid(length: int, dim: int, device: torch.device) -> Tensor:
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table
