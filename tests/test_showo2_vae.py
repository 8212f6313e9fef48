"""The Wan VAE's single-frame fast path computes what diffusers' own classes compute."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm

from pipeline.config import to_dict
from pipeline.models.showo2.model import Showo2
from pipeline.models.showo2.config import showo2_config
from pipeline.models.showo2.processor import load_tokenizer
from pipeline.models.showo2.vae import (
    SingleFrameCausalConv3d,
    SumOfSquaresRMSNorm,
    single_frame_fast_path,
)


def _stock_and_fast() -> tuple[AutoencoderKLWan, AutoencoderKLWan]:
    torch.manual_seed(0)
    stock = AutoencoderKLWan(**to_dict(showo2_config("tiny").vae))
    return stock, single_frame_fast_path(copy.deepcopy(stock))


def _counts(vae: AutoencoderKLWan) -> dict[type, int]:
    kinds = [type(m) for m in vae.modules()]
    return {
        k: kinds.count(k)
        for k in (WanCausalConv3d, WanRMS_norm, SingleFrameCausalConv3d, SumOfSquaresRMSNorm)
    }


def test_every_causal_conv_and_rms_norm_is_switched_and_the_keys_stay():
    stock, fast = _stock_and_fast()
    before, after = _counts(stock), _counts(fast)
    assert before[WanCausalConv3d] > 0 and before[WanRMS_norm] > 0
    assert after == {
        WanCausalConv3d: 0,
        WanRMS_norm: 0,
        SingleFrameCausalConv3d: before[WanCausalConv3d],
        SumOfSquaresRMSNorm: before[WanRMS_norm],
    }
    assert list(fast.state_dict()) == list(stock.state_dict())


def _pass(vae: AutoencoderKLWan, x: torch.Tensor) -> list[torch.Tensor]:
    """Posterior mean and log-variance, the decoded mean, and every gradient of a reconstruction loss."""
    vae.zero_grad(set_to_none=True)
    posterior = vae.encode(x).latent_dist
    decoded = vae.decode(posterior.mean).sample
    (decoded - x).square().mean().backward()
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in vae.parameters()]
    return [posterior.mean, posterior.logvar, decoded, *grads]


@pytest.mark.parametrize("frames", [1, 5], ids=["image", "video"])
def test_outputs_and_gradients_match_diffusers(frames):
    # Images take the fast path; a video's later chunks (cached history) take diffusers' own.
    stock, fast = _stock_and_fast()
    x = torch.rand(2, 3, frames, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    expected, got = _pass(stock, x), _pass(fast, x)
    assert expected[2].shape == (2, 3, frames, 32, 32)
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_bf16_images_match_diffusers():
    stock, fast = (vae.to(torch.bfloat16) for vae in _stock_and_fast())
    x = (torch.rand(2, 3, 1, 32, 32) * 2 - 1).to(torch.bfloat16)
    with torch.no_grad():
        expected, got = stock.encode(x).latent_dist.mean, fast.encode(x).latent_dist.mean
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), rtol=0.05, atol=0.05)


def test_showo2_runs_its_vae_on_the_fast_path(tokenizer_dir, tmp_path):
    built = Showo2(showo2_config("tiny"), load_tokenizer(tokenizer_dir))
    built.save_pretrained(tmp_path)
    for vae in (built.vae, Showo2.from_pretrained(tmp_path).vae):
        assert _counts(vae)[WanCausalConv3d] == 0 and _counts(vae)[SingleFrameCausalConv3d] > 0
