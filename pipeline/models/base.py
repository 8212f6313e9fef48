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
from typing import Any, ClassVar, Literal, Protocol, Self

import torch
from PIL import Image
from torch import Tensor, nn

from pipeline.config import ConfigError, param, to_dict
from pipeline.models.common.presets import preset_config
from pipeline.models.common.qwen import QwenConfig
from pipeline.models.common.weights import save_state_dict

INFOTOK_INPUT_KEYS = (
    "z_u",
    "z_g",
    "text_u",
    "text_g",
    "answer_ids",
    "answer_mask",
    "target_patches",
    "target_mask",
)


@dataclass
class ModelConfig:
    """Which model to build: the family, its preset, local weights and family-specific options."""

    family: str = param("showo2", help="model family: showo2, harmon or openuni")
    preset: str = param(
        "1.5b", help="named size of the family (e.g. 1.5b, 7b, tiny); a path's config wins"
    )
    path: str | None = param(
        None, help="local checkpoint directory (released or exported); null = random init"
    )
    vae_path: str | None = param(
        None, help="local VAE weights (file or diffusers directory) when not in path"
    )
    tokenizer_path: str | None = param(None, help="local tokenizer directory when not in path")
    options: dict[str, Any] = param(
        default_factory=dict,
        help="the family's options on top of the preset, validated "
        "against the family's typed options (its config.py)",
    )

    def check(self, source: str, prefix: str) -> None:
        """The family exists and ``options`` are valid for it (called by ``from_dict``)."""
        from pipeline.models import family_spec

        spec = family_spec(self.family, source=source, key=f"{prefix}family")
        spec.resolve_options(
            self.preset,
            self.options,
            source=source,
            prefix=prefix,
            pretrained=self.path is not None,
        )


@dataclass(frozen=True)
class Requirement:
    """A file or directory a family needs to build a model, for the checks before a job starts."""

    key: str
    """The recipe key that names it, e.g. ``model.vae_path``."""
    path: Path | None
    """Where the key points; None when it is not set."""
    kind: Literal["weights", "tokenizer", "file", "directory", "any"]
    """``weights``: a weight file or a directory of (sharded) weight files; ``tokenizer``: a
    directory with tokenizer files; ``any``: a file or a directory."""
    what: str
    """What belongs there, for the message (e.g. "Wan2.1_VAE.pth or a diffusers directory")."""
    fallbacks: tuple[Path, ...] = ()
    """Also searched, in order, when ``path`` is None or does not hold it."""


@dataclass(frozen=True)
class FamilySpec:
    """Everything the registry, preflight and trainer know about one family (its ``spec.py``)."""

    name: str
    """``model.family`` of its recipes."""
    title: str
    """The model's own name, for messages (e.g. "Show-o2")."""
    adapter: Callable[[], type[MLLMAdapter]]
    """Imports and returns the adapter class (so a family's heavy imports load on first use)."""
    options: type
    """The typed options dataclass ``model.options`` is validated into."""
    presets: Mapping[str, Mapping[str, Any]]
    """Named sizes: nested overrides of the options' defaults."""
    required_files: Callable[[ModelConfig], list[Requirement]]
    """The files a job with this model config reads; may raise ``OSError``/``ValueError`` naming
    what is wrong when finding them needs reading a file."""
    repeated_blocks: tuple[str, ...]
    """Dotted paths of the ``nn.ModuleList``s of repeated blocks (for activation checkpointing
    and an FSDP2 wrap)."""

    def resolve_options(
        self,
        preset: str,
        options: Mapping[str, Any],
        *,
        source: str = "model",
        prefix: str = "model.",
        pretrained: bool = False,
    ) -> Any:
        """The typed options: ``preset`` with ``options`` on top, validated.

        A pretrained model takes its size from its own files, so an unknown ``preset`` then only
        checks ``options`` against the first preset.
        """
        if preset not in self.presets and pretrained:
            preset = next(iter(self.presets))
        return preset_config(
            self.options, self.presets, self.title, preset, dict(options), source, prefix=prefix
        )


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
    num_text_tokens: int | Tensor
    """Text tokens the LLM read: a 0-d device tensor when it is counted from a mask (no host sync)."""
    num_image_tokens: int | Tensor

    def infotok_inputs(self) -> dict[str, Tensor | None]:
        """Keyword arguments for the InfoTok regularizer: ``regularizer(**out.infotok_inputs())``."""
        return {key: getattr(self, key) for key in INFOTOK_INPUT_KEYS}


@torch.no_grad()
def in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 64) -> Tensor:
    """``fn`` over ``x`` in slices of ``size`` rows, without gradient, concatenated (bounds the
    encoder's memory)."""
    return torch.cat([fn(x[i : i + size]) for i in range(0, len(x), size)])


class Processor(Protocol):
    """Turns raw samples (DESIGN §3) into per-sample tensors and batches them.

    A sample may carry its image's cached posterior under ``latents`` (field → tensor, from a
    latent cache) instead of pixels the model would encode; ``image`` is then absent unless
    ``pixels_with_latents`` names the sample's task (pixels still needed for another encoder).
    """

    pixels_with_latents: tuple[str, ...]

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]: ...

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]: ...

    def vae_input(self, sample: Mapping[str, Any]) -> Tensor:
        """[3, H, W] in [-1, 1]: the pixels of ``sample``'s image the frozen autoencoder encodes
        in training (the same transform, per-sample choices included)."""
        ...

    def vae_preprocessing(self) -> dict[str, Any]:
        """Everything :meth:`vae_input` depends on besides the image (sizes, crop and pad rules,
        seeds): part of a latent cache's identity."""
        ...


class FamilyConfig(Protocol):
    """What the shared adapter code reads from a family's config."""

    @property
    def llm(self) -> QwenConfig: ...

    @property
    def trainable(self) -> Sequence[str]: ...

    @property
    def latent_patch_dim(self) -> int: ...


class MLLMAdapter(nn.Module, ABC):
    """Base class of the family adapters.

    Subclasses set ``family`` and the parameter-name prefixes below, build the released
    architecture in ``__init__`` (setting ``config``, ``vocab_size`` and the frozen ``vae``) and call
    :meth:`_set_trainable`: the shared visual encoder always trains, the other groups per
    ``config.trainable``, the frozen module never. Every family names its shared visual tokenizer
    ``V_enc`` ``encode_shared_tokens``; its inputs are the family's own (latents, masked latent
    tokens or ViT pixels), so it is not part of this signature.
    """

    family: ClassVar[str]
    ENCODER_PREFIXES: ClassVar[tuple[str, ...]]
    """Parameter name prefixes of the shared visual tokenizer ``V_enc``."""
    TRAINABLE_GROUPS: ClassVar[dict[str, tuple[str, ...]]]
    """``config.trainable`` group name -> the parameter name prefixes it trains."""
    FROZEN_MODULE: ClassVar[str] = "vae"
    """The frozen autoencoder: never trained, always in eval mode, stored apart from the checkpoint."""
    LATENT_TASKS: ClassVar[tuple[str, ...]]
    """The tasks whose images the frozen autoencoder encodes in ``forward``: what a latent cache
    (``python -m data_prep encode``) holds for this family."""
    config: FamilyConfig
    vocab_size: int
    processor: Processor

    @abstractmethod
    def forward(
        self,
        batch: Mapping[str, Any],
        generator: torch.Generator | None = None,
        *,
        infotok_inputs: bool = True,
    ) -> MLLMOutput:
        """Task losses and InfoTok inputs for a collated batch; ``generator`` drives all noise.

        ``infotok_inputs=False`` skips the work only InfoTok needs (the clean ``V_enc`` pass over
        the generation targets): ``z_g`` is then None. The task losses, ``z_u`` and the other
        fields are computed as with it.
        """

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
    def answer(
        self, images: Sequence[Image.Image], questions: Sequence[str], **kwargs: Any
    ) -> list[str]:
        """Greedy answers to one question per image."""

    @abstractmethod
    def vae_posterior(self, pixels: Tensor) -> dict[str, Tensor]:
        """What ``forward`` draws its latents from, for VAE-input pixels [B, 3, H, W] in [-1, 1]:
        the frozen autoencoder's posterior fields (e.g. ``mean`` and ``std``), each [B, ...] in its
        dtype. A latent cache stores exactly these; ``forward`` reads them from the batch
        (``cached_posterior``) when present and calls this otherwise."""

    @abstractmethod
    def autoencoder_pass(
        self, pixels: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
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
            raise ConfigError(
                "model.options.llm.vocab_size is null and no tokenizer was given to size it"
            )
        if tokenizer is not None and len(tokenizer) > vocab:
            raise ConfigError(
                f"tokenizer has {len(tokenizer)} tokens but the embedding only {vocab} rows"
            )
        return vocab

    def _set_trainable(self) -> None:
        """``requires_grad`` by name: ``ENCODER_PREFIXES`` plus the ``config.trainable`` groups."""
        trained = self.ENCODER_PREFIXES + tuple(
            p for g in self.config.trainable for p in self.TRAINABLE_GROUPS[g]
        )
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name.startswith(trained))

    def infotok_dims(self) -> dict[str, int]:
        """``{"token_dim": D, "text_dim": T, "vocab_size": V, "latent_patch_dim": P}``; tokens and
        pooled text both live in the LLM width."""
        width = self.config.llm.hidden_size
        return {
            "token_dim": width,
            "text_dim": width,
            "vocab_size": self.vocab_size,
            "latent_patch_dim": self.config.latent_patch_dim,
        }

    def saved_config(self) -> dict[str, Any]:
        """The config as ``save_pretrained`` records it: ``llm.vocab_size`` resolved."""
        config = to_dict(self.config)
        config["llm"]["vocab_size"] = self.vocab_size
        return config

    def _save_weights(
        self, path: Path, *, tied_lm_head: str | None = None, prefix: str = ""
    ) -> None:
        """The tensors under ``prefix`` (stripped) as safetensors in ``path``, without the tied
        ``lm_head`` weight when the config ties it, and the tokenizer beside them."""
        state = {
            k.removeprefix(prefix): v
            for k, v in self.checkpoint_state_dict().items()
            if k.startswith(prefix)
        }
        if tied_lm_head is not None and self.config.llm.tie_word_embeddings:
            state.pop(tied_lm_head)
        save_state_dict(state, path)
        if self.processor is not None:
            self.processor.tokenizer.save_pretrained(str(path))

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """Every tensor except the separately stored frozen autoencoder's."""
        prefix = f"{self.FROZEN_MODULE}."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def train(self, mode: bool = True) -> Self:
        """Set the training mode; the frozen autoencoder stays in eval mode."""
        super().train(mode)
        self.get_submodule(self.FROZEN_MODULE).eval()
        return self
