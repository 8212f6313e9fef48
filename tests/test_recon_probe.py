"""The reconstruction probe: SSIM/PSNR/Fréchet distance against hand computations, the decoder's token
grid layout, FID through a TorchScript feature network, and the probe end to end on tiny Show-o2."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from model_helpers import draw_image, make_tokenizer
from pipeline.eval.recon_probe import (
    ProbeConfig,
    fid,
    frechet_distance,
    load_inception,
    psnr,
    run_probe,
    ssim,
    train_decoder,
)
from pipeline.models.showo2.model import Showo2
from pipeline.models.showo2.config import showo2_config
from pipeline.models.showo2.processor import load_tokenizer


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 3, 8, 8)
    assert psnr(x + 0.1, x).item() == pytest.approx(20.0, abs=1e-4)  # -10 log10(0.01)


def test_ssim_of_constant_images_matches_the_formula():
    a, b = 0.3, 0.7
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (
        a * a + b * b + c1
    )  # variances are 0: the structure term is c2/c2 = 1
    value = ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-6)
    slight = ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    heavy = ssim(x, (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1))
    assert (heavy < slight).all() and (slight < 1).all()
    assert ssim(x[:, :, :7, :7], x[:, :, :7, :7]).shape == (2,)  # window shrinks to small images


def test_frechet_distance_against_hand_computations():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    x, y = rng.normal(1.0, 2.0, size=(400, 1)), rng.normal(-0.5, 0.5, size=(300, 1))
    s1, s2 = x.std(ddof=1), y.std(ddof=1)
    assert frechet_distance(x, y) == pytest.approx(
        (x.mean() - y.mean()) ** 2 + (s1 - s2) ** 2, rel=1e-9
    )
    # independent coordinates (diagonal covariances): the sum over dimensions
    u = np.stack([[1, 0], [-1, 0], [0, 2], [0, -2]], dtype=np.float64)
    v = u * np.array([3.0, 0.5]) + np.array([1.0, -1.0])
    var_u = u.var(0, ddof=1)
    var_v = v.var(0, ddof=1)
    hand = 2.0 + sum(var_u + var_v - 2 * np.sqrt(var_u * var_v))
    assert frechet_distance(u, v) == pytest.approx(hand, rel=1e-9)
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(a, a[:, :2])


class TinyInception(nn.Module):
    """A random feature network with the TorchScript Inception calling convention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 5, stride=2)

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor:
        return self.conv(x.float() / 255).mean(dim=(2, 3))


def test_fid_through_a_torchscript_feature_network(tmp_path):
    path = tmp_path / "inception.pt"
    torch.jit.save(torch.jit.script(TinyInception()), str(path))
    extractor = load_inception(path)
    g = torch.Generator().manual_seed(0)
    real = torch.rand(24, 3, 16, 16, generator=g)
    assert fid(extractor, real, real, batch_size=7) == pytest.approx(0.0, abs=1e-6)
    assert fid(extractor, real, (real * 0.3).clamp(0, 1)) > 1e-3
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_inception(tmp_path / "missing.pt")


def test_the_decoder_reads_tokens_as_a_row_major_grid():
    """Tokens that are exactly each image's patches (plus trailing extra tokens) decode back well."""
    g = torch.Generator().manual_seed(0)
    blobs = torch.rand(48, 3, 4, 4, generator=g)
    images = torch.nn.functional.interpolate(blobs, size=16, mode="bilinear", align_corners=False)
    grid, p = 4, 4
    patches = (
        images.view(48, 3, grid, p, grid, p)
        .permute(0, 2, 4, 1, 3, 5)
        .reshape(48, grid * grid, 3 * p * p)
    )
    tokens = torch.cat(
        [patches, torch.randn(48, 2, 3 * p * p, generator=g)], dim=1
    )  # like Harmon's buffers
    decoder = train_decoder(
        tokens[:40], images[:40], ProbeConfig(steps=250, lr=3e-3, hidden=64, batch_size=16)
    )
    with torch.no_grad():
        recon = decoder(tokens[40:]).clamp(0, 1)
    baseline = images[:40].mean(0, keepdim=True).expand_as(images[40:])
    assert (
        psnr(recon, images[40:]).mean() > psnr(baseline, images[40:]).mean() + 4
    )  # a transposed grid stays near the baseline


def test_probe_on_tiny_showo2_is_finite_and_deterministic(tmp_path):
    torch.manual_seed(0)
    adapter = Showo2(showo2_config("tiny"), load_tokenizer(make_tokenizer(tmp_path / "tok")))
    images = [draw_image(i, (64, 64)) for i in range(10)]
    cfg = ProbeConfig(train_images=6, test_images=4, steps=20, hidden=32, size=32)
    first = run_probe(adapter, images, cfg, token_batch=5)
    second = run_probe(adapter, images, cfg, token_batch=3)
    m = first.metrics
    assert (
        m["token_grid"] == 8 and m["resolution"] == 32 and m["fid"] is None
    )  # 64 px / (VAE 4 × patch 2)
    assert math.isfinite(m["psnr"]) and -1 <= m["ssim"] <= 1
    assert m["psnr"] == pytest.approx(second.metrics["psnr"], rel=1e-4)
    assert first.reconstructions.shape == first.originals.shape == (4, 3, 32, 32)
    with pytest.raises(ValueError, match="needs 6 \\+ 8 images"):
        run_probe(adapter, images, ProbeConfig(train_images=6, test_images=8))
