"""The model adapter contract (DESIGN §5) every family module implements.

An adapter wraps one unified multimodal LLM with its released architecture and checkpoint keys.
One ``forward(batch)`` computes the family's own task losses and hands the InfoTok regularizer
what it needs (:class:`MLLMOutput`); the trainer never looks at the family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.config import param

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


class Processor(Protocol):
    """Turns raw samples (DESIGN §3) into per-sample tensors and batches them."""

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]: ...

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]: ...


class MLLMAdapter(nn.Module, ABC):
    """Base class of the family adapters.

    Subclasses set ``family``, build the released architecture in ``__init__`` and mark which
    parameters train (``requires_grad``); the shared visual encoder always trains.
    """

    family: ClassVar[str]
    processor: Processor

    @abstractmethod
    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> MLLMOutput:
        """Task losses and InfoTok inputs for a collated batch; ``generator`` drives all noise."""

    @abstractmethod
    def infotok_dims(self) -> dict[str, int]:
        """``{"token_dim": D, "text_dim": T, "vocab_size": V, "latent_patch_dim": P}``."""

    @abstractmethod
    def shared_encoder_prefixes(self) -> tuple[str, ...]:
        """Parameter name prefixes of the shared visual tokenizer ``V_enc``."""

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

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return self.processor.collate(samples)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters the optimizer should update."""
        return [(name, p) for name, p in self.named_parameters() if p.requires_grad]
