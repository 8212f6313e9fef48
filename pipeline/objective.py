"""The training objective in one module: w_i2t*L_i2t + w_t2i*L_t2i + lam*L_InfoTok (Eq. 11).

Training, evaluation and the held-out losses all assemble it here, so the terms they report are
computed by the same code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.infotok import InfoTokConfig, InfoTokDims, InfoTokRegularizer
from pipeline.models import MLLMAdapter, MLLMOutput, ModelConfig, build_model


class InfoTokModel(nn.Module):
    """The adapter and the regularizer in one module, so ZeRO-2 shards all their optimizer state.

    Its state-dict keys are ``adapter.*`` and ``regularizer.*`` (see :mod:`pipeline.consolidate`).
    """

    def __init__(
        self, adapter: MLLMAdapter, regularizer: InfoTokRegularizer, w_i2t: float, w_t2i: float
    ):
        super().__init__()
        self.adapter = adapter
        self.regularizer = regularizer
        self.weights = {"loss_i2t": w_i2t, "loss_t2i": w_t2i}

    @property
    def has_heads(self) -> bool:
        """Whether the regularizer has InfoTok heads (``infotok.mode`` is not ``off``)."""
        return self.regularizer.cfg.enabled

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator
    ) -> tuple[Tensor, dict[str, Tensor], int]:
        """(total loss, every term and the total as ``loss``, tokens processed)."""
        out = self.adapter(batch, generator=generator, infotok_inputs=self.has_heads)
        loss, terms = self.loss_terms(out)
        return loss, {**terms, "loss": loss}, out.num_text_tokens + out.num_image_tokens

    def loss_terms(self, out: MLLMOutput) -> tuple[Tensor, dict[str, Tensor]]:
        """(total loss, every term) of the adapter's output: the MLLM losses present in the
        batch, then the regularizer's terms (none without heads)."""
        terms: dict[str, Tensor] = {}
        loss = None
        for name, weight in self.weights.items():
            value = getattr(out, name)
            if value is not None:
                terms[name] = value
                loss = weight * value if loss is None else loss + weight * value
        reg = self.regularizer(**out.infotok_inputs())
        terms.update(reg.terms)
        loss = reg.total if loss is None else loss + reg.total
        return loss, terms


def wrap_adapter(
    adapter: MLLMAdapter, infotok: InfoTokConfig, w_i2t: float = 1.0, w_t2i: float = 1.0
) -> InfoTokModel:
    """``adapter`` plus a fresh regularizer sized by it (``mode=off`` builds no heads)."""
    regularizer = InfoTokRegularizer(infotok, InfoTokDims(**adapter.infotok_dims()))
    return InfoTokModel(adapter, regularizer, w_i2t, w_t2i)


def build_objective(
    model: ModelConfig, infotok: InfoTokConfig, w_i2t: float = 1.0, w_t2i: float = 1.0
) -> InfoTokModel:
    """The adapter, then its regularizer, both initialised from the global RNG the caller
    seeded: keep this order, or the same seed gives other initial weights."""
    return wrap_adapter(build_model(model), infotok, w_i2t, w_t2i)
