"""Reconstruction probe, Table 1's generation proxy: how much of the image the frozen shared tokens keep.

``V_enc`` is frozen: the adapter's own ``forward`` on one-turn I2T samples gives ``z_u`` [n, N, D]
(every family, no family code here). A lightweight decoder is trained on those tokens for a fixed,
seeded budget: a per-token MLP to a pixel patch on the token grid, plus a residual 3×3 convolution
that smooths patch seams. The first ``G²`` tokens, ``G = ⌊√N⌋``, are read as the row-major grid
(Show-o2 and OpenUni have exactly ``G²``; Harmon appends its MAR buffer tokens after the grid).
PSNR and SSIM (Gaussian window, Wang et al. 2004) are measured on held-out images, with the
mean-training-image baseline for scale; FID only with a local Inception network (``--inception``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pipeline.models.base import MLLMAdapter

FeatureExtractor = Callable[[Tensor], Tensor]
"""Images [B, 3, H, W] in [0, 1] → features [B, F]."""


@dataclass
class ProbeConfig:
    train_images: int = 256
    test_images: int = 64
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    hidden: int = 256
    size: int = 64  # target resolution (rounded down to a multiple of the token grid)
    seed: int = 0


# ----------------------------------------------------------------------------- tokens and targets


def probe_sample(image: Image.Image, index: int) -> dict[str, Any]:
    """A minimal I2T record around ``image``, so the family processor prepares it as in training."""
    return {
        "__key__": f"probe{index:06d}",
        "task": "i2t",
        "image": image.convert("RGB"),
        "messages": [
            {"role": "user", "content": "<image>\nDescribe the image."},
            {"role": "assistant", "content": "An image."},
        ],
    }


@torch.no_grad()
def shared_tokens(
    adapter: MLLMAdapter, images: Sequence[Image.Image], batch_size: int, seed: int = 0
) -> Tensor:
    """``z_u`` [n, N, D] (float32) of ``images`` from the frozen adapter in eval mode."""
    if adapter.processor is None:
        raise ValueError("the reconstruction probe needs the model's processor (a tokenizer)")
    adapter.eval()
    generator = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, len(images), batch_size):
        samples = [
            adapter.processor(probe_sample(im, start + i))
            for i, im in enumerate(images[start : start + batch_size])
        ]
        out = adapter(adapter.collate(samples), generator=generator)
        chunks.append(out.z_u.float())
    return torch.cat(chunks)


def targets(images: Sequence[Image.Image], size: int) -> Tensor:
    """Centre-square crops resized to ``size`` → [n, 3, size, size] in [0, 1]."""
    out = []
    for im in images:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        square = (
            im.convert("RGB")
            .crop((left, top, left + side, top + side))
            .resize((size, size), Image.BICUBIC)
        )
        out.append(torch.from_numpy(np.asarray(square, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


# ----------------------------------------------------------------------------- the decoder


class TokenDecoder(nn.Module):
    """Tokens [B, N, D] → images [B, 3, G·p, G·p]: token MLP to a p×p patch, then a residual 3×3 conv."""

    def __init__(self, dim: int, grid: int, patch: int, hidden: int):
        super().__init__()
        self.grid, self.patch = grid, patch
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, 3 * patch * patch),
        )
        self.refine = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 3, 3, padding=1)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        g, p = self.grid, self.patch
        x = self.mlp(tokens[:, : g * g])  # [B, G², 3p²]
        x = x.view(-1, g, g, 3, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, 3, g * p, g * p)
        return x + self.refine(x)


def token_grid(num_tokens: int) -> int:
    grid = math.isqrt(num_tokens)
    if grid == 0:
        raise ValueError("the model returned no shared tokens")
    return grid


def train_decoder(tokens: Tensor, images: Tensor, cfg: ProbeConfig) -> TokenDecoder:
    """MSE training for ``cfg.steps`` seeded minibatch steps (Adam, cosine decay)."""
    torch.manual_seed(cfg.seed)
    grid = token_grid(tokens.shape[1])
    decoder = TokenDecoder(tokens.shape[-1], grid, images.shape[-1] // grid, cfg.hidden)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.steps):
        index = torch.randint(len(tokens), (min(cfg.batch_size, len(tokens)),), generator=generator)
        loss = F.mse_loss(decoder(tokens[index]), images[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return decoder.eval()


# ----------------------------------------------------------------------------- metrics


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1] ([B, C, H, W])."""
    mse = (x - y).pow(2).flatten(1).mean(1).clamp_min(1e-12)
    return -10 * torch.log10(mse)


def gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image SSIM (Wang et al. 2004) of images in [0, 1] [B, C, H, W]: Gaussian-weighted local
    statistics over valid windows (no padding), K1 = 0.01, K2 = 0.03, averaged over pixels and channels.
    The window shrinks to the image for images smaller than 11 px."""
    size = min(window, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2  # odd
    c1, c2 = 0.01**2, 0.03**2
    channels = x.shape[1]
    w = gaussian_window(size, sigma).to(torch.float64).expand(channels, 1, size, size)
    x, y = x.double(), y.double()

    def filt(t: Tensor) -> Tensor:
        return F.conv2d(t, w, groups=channels)

    mu_x, mu_y = filt(x), filt(y)
    var_x = filt(x * x) - mu_x**2
    var_y = filt(y * y) - mu_y**2
    cov = filt(x * y) - mu_x * mu_y
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / (
        (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    )
    return index.flatten(1).mean(1).float()


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, F] and b [m, F]:
    ``|μa − μb|² + tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)`` (the trace term is symmetric and real this way)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(
            f"need two feature sets [n >= 2, F] of one width, got {a.shape} and {b.shape}"
        )
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrtm_psd(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0, None)).sum()
    return float(
        max(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross, 0.0)
    )


def load_inception(path: Path) -> FeatureExtractor:
    """A local TorchScript Inception feature network in the StyleGAN/clean-fid convention
    (``inception-2015-12-05.pt``): ``net(uint8 images [B, 3, H, W], return_features=True)`` → [B, 2048]."""
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"--inception {path}: no such file (a TorchScript Inception network; nothing is "
            f"downloaded)"
        )
    net = torch.jit.load(str(path), map_location="cpu").eval()

    @torch.no_grad()
    def extract(images: Tensor) -> Tensor:
        return net((images.clamp(0, 1) * 255).round().to(torch.uint8), return_features=True).float()

    return extract


def fid(extractor: FeatureExtractor, real: Tensor, fake: Tensor, batch_size: int = 32) -> float:
    def features(images: Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat(
                [extractor(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
            ).numpy()

    return frechet_distance(features(real), features(fake))


# ----------------------------------------------------------------------------- the probe


@dataclass
class ProbeResult:
    metrics: dict[str, Any]
    originals: Tensor  # [k, 3, S, S] held-out images in [0, 1] (the first few)
    reconstructions: Tensor  # the decoder's output for them


def run_probe(
    adapter: MLLMAdapter,
    images: Sequence[Image.Image],
    cfg: ProbeConfig,
    inception: FeatureExtractor | None = None,
    token_batch: int = 8,
) -> ProbeResult:
    """Train on the first ``cfg.train_images`` images, report on the next ``cfg.test_images``."""
    need = cfg.train_images + cfg.test_images
    if len(images) < need or cfg.test_images < 2:
        raise ValueError(
            f"reconstruction probe: needs {cfg.train_images} + {cfg.test_images} images (test >= 2), "
            f"the data has {len(images)}"
        )
    tokens = shared_tokens(adapter, images[:need], token_batch, cfg.seed)
    grid = token_grid(tokens.shape[1])
    size = max(cfg.size // grid, 1) * grid
    pixels = targets(images[:need], size)
    train_x, test_x = tokens[: cfg.train_images], tokens[cfg.train_images :]
    train_y, test_y = pixels[: cfg.train_images], pixels[cfg.train_images :]
    decoder = train_decoder(train_x, train_y, cfg)
    with torch.no_grad():
        recon = decoder(test_x).clamp(0, 1)
    baseline = train_y.mean(0, keepdim=True).expand_as(test_y)
    metrics: dict[str, Any] = {
        "psnr": float(psnr(recon, test_y).mean()),
        "ssim": float(ssim(recon, test_y).mean()),
        "baseline_mean_image": {
            "psnr": float(psnr(baseline, test_y).mean()),
            "ssim": float(ssim(baseline, test_y).mean()),
        },
        "fid": None,
        "token_grid": grid,
        "num_tokens": int(tokens.shape[1]),
        "resolution": size,
        "config": asdict(cfg),
    }
    if inception is not None:
        metrics["fid"] = fid(inception, test_y, recon)
    return ProbeResult(metrics, test_y[:8], recon[:8])
