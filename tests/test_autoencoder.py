"""The adapters' frozen autoencoder as an autoencoder (what ``experiments.ablate`` trains to make a tiny
original model): reconstruction with gradient, determinism without a generator, and options that
normalise the latents the model sees to unit scale."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import build_model
from pipeline.models.base import ModelConfig

FAMILIES = ("showo2", "harmon", "openuni")
MODEL_LATENTS = {  # the latents each family feeds its generator, from pixels in [-1, 1]
    "showo2": lambda model, x: model.encode_latents(x, sample=False),
    "harmon": lambda model, x: model.encode_latents(x),
    "openuni": lambda model, x: model.encode_latents(x),
}


def _tiny(family: str, tokenizer_dir, options: dict | None = None):
    torch.manual_seed(0)
    return build_model(
        ModelConfig(
            family=family, preset="tiny", tokenizer_path=str(tokenizer_dir), options=options or {}
        )
    )


def _pixels(model, n: int = 6) -> torch.Tensor:
    size = model.config.image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_autoencoder_pass_reconstructs_with_gradient_into_the_autoencoder(family, tokenizer_dir):
    model = _tiny(family, tokenizer_dir)
    x = _pixels(model)
    model.vae.requires_grad_(True)
    reconstruction, kl = model.autoencoder_pass(x, torch.Generator().manual_seed(0))
    assert reconstruction.shape == x.shape and kl.ndim == 0 and kl.item() >= 0
    ((reconstruction - x).square().mean() + kl).backward()
    for part in ("encoder.", "decoder."):  # the loss trains both halves
        assert any(
            p.grad is not None and p.grad.abs().sum() > 0
            for name, p in model.vae.named_parameters()
            if name.startswith(part)
        ), part
    with torch.no_grad():
        first, _ = model.autoencoder_pass(x)
        second, _ = model.autoencoder_pass(x)
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", FAMILIES)
def test_autoencoder_options_normalise_the_model_latents(family, tokenizer_dir):
    model = _tiny(family, tokenizer_dir)
    x = _pixels(model)
    options = model.autoencoder_options(x)
    normalised = _tiny(family, tokenizer_dir, options)
    normalised.vae.load_state_dict(model.vae.state_dict())
    with torch.no_grad():
        before = MODEL_LATENTS[family](model, x).float()
        after = MODEL_LATENTS[family](normalised, x).float()
    assert after.std().item() == pytest.approx(1.0, rel=0.02)
    assert (
        abs(before.std().item() - 1.0) > 0.05
    )  # the defaults (the released VAEs' numbers) do not fit
    if family == "showo2":  # per-channel statistics, as the released latents_mean / latents_std
        per_channel = after.transpose(0, 1).flatten(1)
        assert per_channel.mean(1).abs().max().item() < 1e-3
        assert per_channel.std(1).sub(1).abs().max().item() < 0.02
