"""The model adapter contract (DESIGN §5) every family module implements.

An adapter wraps one unified multimodal LLM with its released architecture and checkpoint keys.
One ``forward(batch)`` computes the family's own task losses and hands the InfoTok regularizer
what it needs (:class:`MLLMOutput`); the trainer never looks at the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.config import ConfigError, param

INFOTOK_INPUT_KEYS = ("z_u", "z_g", "text_u", "text_g", "answer_ids", "answer_mask", "target_patches", "target_mask")


@dataclass
class ModelConfig:
    """Which model to build: the family, its preset, local weights and family-specific options."""

    family: str = param("showo2", help="model family: showo2, harmon or openuni")
    preset: str = param("1.5b", help="named size of the family (e.g. 1.5b, 7b, tiny); a path's config wins")
    path: str | None = param(None, help="local checkpoint directory (released or exported); null = random init")
    vae_path: str | None = param(None, help="local VAE weights (file or diffusers directory) when not in path")
    tokenizer_path: str | None = param(None, help="local tokenizer directory when not in path")
    options: dict[str, Any] = param(default_factory=dict, help="family config overrides, validated by the family")


@dataclass
class MLLMOutput:
    """Everything one training step needs from the model.

    Shapes: ``B_u`` / ``B_g`` are the I2T / T2I samples of the batch, ``N`` image tokens of width
    ``D``, ``T`` the pooled text width, ``L`` answer tokens, ``P`` values per latent patch.
    """

    loss_i2t: Tensor | None
    """Scalar text cross-entropy over the answer tokens; None without I2T samples."""
    loss_t2i: Tensor | None
    """Scalar generation loss of the family (its own formula); None without T2I samples."""
    z_u: Tensor | None
    """[B_u, N_u, D] shared visual tokens of the understanding images, the tensor the LLM consumed."""
    z_g: Tensor | None
    """[B_g, N_g, D] shared visual tokens of the clean generation target images."""
    text_u: Tensor | None
    """[B_u, T] pooled text features of the I2T prompts."""
    text_g: Tensor | None
    """[B_g, T] pooled text features of the T2I prompts."""
    answer_ids: Tensor | None
    """[B_u, L] answer token ids (the I2T cross-entropy targets), right-padded."""
    answer_mask: Tensor | None
    """[B_u, L] True where ``answer_ids`` holds a real token."""
    target_patches: Tensor | None
    """[B_g, N_g, P] normalised VAE latents of the target image; row n is the patch token n covers."""
    target_mask: Tensor | None
    """[B_g, N_g] True where a token has a target patch."""
    num_text_tokens: int
    num_image_tokens: int

    def infotok_inputs(self) -> dict[str, Tensor | None]:
        """Keyword arguments for the InfoTok regularizer: ``regularizer(**out.infotok_inputs())``."""
        return {key: getattr(self, key) for key in INFOTOK_INPUT_KEYS}


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` [B, L, D] over positions where ``mask`` [B, L] is True (the pooled ``text_*``)."""
    weights = mask.to(x.dtype)[..., None]
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1)


@torch.no_grad()
def in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 64) -> Tensor:
    """``fn`` over ``x`` in slices of ``size`` rows, without gradient, concatenated (bounds encoder memory)."""
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


def answer_tokens(labels: Tensor, ignore: int) -> tuple[Tensor, Tensor]:
    """``answer_ids`` / ``answer_mask``: the tokens of each row whose label is not ``ignore``,
    left-aligned and right-padded with 0."""
    valid = labels != ignore
    length = max(int(valid.sum(1).max()), 1)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :length]
    mask = valid.gather(1, order)
    return labels.gather(1, order).clamp_min(0).masked_fill(~mask, 0), mask


class Processor(Protocol):
    """Turns raw samples (DESIGN §3) into per-sample tensors and batches them."""

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]: ...

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


class _LLMWidth(Protocol):
    @property
    def hidden_size(self) -> int: ...


class FamilyConfig(Protocol):
    """What the shared adapter code reads from a family's config."""

    @property
    def llm(self) -> _LLMWidth: ...

    @property
    def trainable(self) -> Sequence[str]: ...

    @property
    def latent_patch_dim(self) -> int: ...


class MLLMAdapter(nn.Module, ABC):
    """Base class of the family adapters.

    Subclasses set ``family`` and the parameter-name prefixes below, build the released
    architecture in ``__init__`` (setting ``config``, ``vocab_size`` and the frozen ``vae``) and call
    :meth:`_set_trainable`: the shared visual encoder always trains, the other groups per
    ``config.trainable``, the frozen module never.
    """

    family: ClassVar[str]
    ENCODER_PREFIXES: ClassVar[tuple[str, ...]]
    """Parameter name prefixes of the shared visual tokenizer ``V_enc``."""
    TRAINABLE_GROUPS: ClassVar[dict[str, tuple[str, ...]]]
    """``config.trainable`` group name -> the parameter name prefixes it trains."""
    FROZEN_MODULE: ClassVar[str] = "vae"
    """The frozen autoencoder: never trained, always in eval mode, stored apart from the checkpoint."""
    config: FamilyConfig
    vocab_size: int
    processor: Processor

    @abstractmethod
    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> MLLMOutput:
        """Task losses and InfoTok inputs for a collated batch; ``generator`` drives all noise."""

    @classmethod
    @abstractmethod
    def build(cls, config: ModelConfig) -> MLLMAdapter:
        """The adapter described by ``config`` (random init, or ``config.path`` when given)."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **kwargs: Any) -> MLLMAdapter:
        """Load a released or exported checkpoint from a local directory (never from a hub)."""

    @abstractmethod
    def save_pretrained(self, path: str | Path) -> None:
        """Write a directory that :meth:`from_pretrained` (and the family's own code) can read."""

    @abstractmethod
    def generate(self, prompts: Sequence[str], **kwargs: Any) -> list[Image.Image]:
        """Text-to-image sampling with classifier-free guidance."""

    @abstractmethod
    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], **kwargs: Any) -> list[str]:
        """Greedy answers to one question per image."""

    @abstractmethod
    def autoencoder_pass(self, pixels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """The frozen autoencoder as an autoencoder, for training it when a tiny original model is made
        (``experiments.ablate``): pixels [B, 3, H, W] in [-1, 1] → (reconstruction in the same layout,
        mean KL of the posterior to N(0, I), 0 for a deterministic autoencoder). The latents are a
        posterior sample drawn with ``generator``, or the posterior mean without one."""

    @abstractmethod
    def autoencoder_options(self, pixels: Tensor) -> dict[str, Any]:
        """``model.options`` that normalise the autoencoder's latents as the model expects (the
        family's scaling factor or per-channel mean/std), measured on ``pixels`` (as above)."""

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.processor.collate(samples)

    @staticmethod
    def _vocab_size(configured: int | None, tokenizer: Sized | None) -> int:
        """The embedding rows: ``llm.vocab_size``, or the tokenizer's length when that is null."""
        vocab = configured or (len(tokenizer) if tokenizer is not None else None)
        if vocab is None:
            raise ConfigError("model.options.llm.vocab_size is null and no tokenizer was given to size it")
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ConfigError(f"tokenizer has {len(tokenizer)} tokens but the embedding only {vocab} rows")
        return vocab

    def _set_trainable(self) -> None:
        """``requires_grad`` by name: ``ENCODER_PREFIXES`` plus the ``config.trainable`` groups."""
        trained = self.ENCODER_PREFIXES + tuple(p for g in self.config.trainable for p in self.TRAINABLE_GROUPS[g])
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith(trained))

    def shared_encoder_prefixes(self) -> tuple[str, ...]:
        """Parameter name prefixes of the shared visual tokenizer ``V_enc``."""
        return self.ENCODER_PREFIXES

    def infotok_dims(self) -> dict[str, int]:
        """``{"token_dim": D, "text_dim": T, "vocab_size": V, "latent_patch_dim": P}``; tokens and
        pooled text both live in the LLM width."""
        width = self.config.llm.hidden_size
        return {"token_dim": width, "text_dim": width, "vocab_size": self.vocab_size,
                "latent_patch_dim": self.config.latent_patch_dim}

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """Every tensor except the separately stored frozen autoencoder's."""
        prefix = f"{self.FROZEN_MODULE}."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def train(self, mode: bool = True) -> Self:
        """Set the training mode; the frozen autoencoder stays in eval mode."""
        super().train(mode)
        self.get_submodule(self.FROZEN_MODULE).eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters the optimizer should update."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]
