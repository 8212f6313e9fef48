"""Harmon configuration: architecture dims, training and inference options, named presets.

The defaults are the released Harmon-1.5B (``wusize/harmon`` file ``harmon_1.5b.pth``); the presets
``0.5b`` and ``tiny`` override them. Sources (github.com/wusize/Harmon):

- ``configs/models/qwen2_5_{0_5b_kl16_mar_b,1_5b_kl16_mar_h}.py``: LLM Qwen2.5-{0.5B,1.5B}-Instruct
  (their ``config.json`` gives the dims; vocabulary 151936, not resized), ``mar_base`` / ``mar_huge``
  with ``img_size=256, vae_stride=16, patch_size=1, vae_embed_dim=16, mask_ratio_min=0.7,
  class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64, diffusion_batch_mul=4,
  num_sampling_steps="100"``, ``diffloss_d/w`` = 6/1024 (0.5B) and 12/1536 (1.5B); KL-16 VAE
  ``embed_dim=16, ch_mult=(1, 1, 2, 2, 4)`` with ``vae_scale=0.2325``.
- ``src/models/mar/mar.py`` ``mar_base`` (768 wide, 12+12 blocks, 12 heads) and ``mar_huge`` (1280,
  20+20, 16 heads), ``mlp_ratio=4``, LayerNorm eps 1e-6.
- ``src/models/harmon_dev.py``: ``grad_scale=0.1`` on the visual features of the I2T branch.
- ``configs/datasets/qwen2_5_1_5b/*.py``: training resolution 512 (``image_size``), I2T text
  ``max_length=512``, T2I prompt ``max_length=128``, ``unconditional=0.1``.
- ``scripts/text2image.py``: ``cfg=3.0``, ``num_iter=64``, ``temperature=1.0``, ``cfg_schedule="constant"``,
  prompt ``"Generate an image: {prompt}"`` and the unconditional prompt ``"Generate an image."``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import ConfigError, param
from pipeline.models.common.presets import preset_config
from pipeline.models.common.qwen import QwenConfig


@dataclass
class MARConfig:
    """The MAR encoder/decoder and its per-token diffusion head (``src/models/mar/mar.py``)."""

    encoder_embed_dim: int = param(1280, gt=0)
    encoder_depth: int = param(20, gt=0)
    encoder_num_heads: int = param(16, gt=0)
    decoder_embed_dim: int = param(1280, gt=0)
    decoder_depth: int = param(20, gt=0)
    decoder_num_heads: int = param(16, gt=0)
    mlp_ratio: float = param(4.0, gt=0)
    img_size: int = param(
        256, gt=0, help="resolution of the learned position tables (interpolated otherwise)"
    )
    patch_size: int = param(1, gt=0, help="VAE latent pixels per token side")
    buffer_size: int = param(
        64, ge=0, help="buffer tokens before the image tokens (filled with fake_latent)"
    )
    class_num: int = param(
        1000, gt=0, help="rows of MAR's unused ImageNet class_emb (kept for the checkpoint keys)"
    )
    mask_ratio_min: float = param(
        0.7, ge=0, le=1, help="T2I mask ratio ~ N(1, 0.25) truncated to [min, 1]"
    )
    attn_dropout: float = param(0.1, ge=0, lt=1)
    proj_dropout: float = param(0.1, ge=0, lt=1)
    diffloss_d: int = param(12, gt=0, help="residual blocks of the diffusion MLP")
    diffloss_w: int = param(1536, gt=0, help="width of the diffusion MLP")
    diffusion_steps: int = param(1000, gt=1, help="DDPM training steps (cosine schedule)")
    num_sampling_steps: int = param(100, gt=0, help="respaced DDPM steps when sampling")
    diffusion_batch_mul: int = param(4, gt=0, help="noise draws per token in the T2I loss")


@dataclass
class VAEConfig:
    """The frozen KL-16 VAE of MAR (LDM ``AutoencoderKL``, as ``diffusers`` ``AutoencoderKL``)."""

    block_out_channels: list[int] = param(
        default_factory=lambda: [128, 128, 256, 256, 512],
        help="ch × ch_mult; L levels downsample 2^(L-1)x (five: KL-16)",
    )
    layers_per_block: int = param(2, gt=0)
    latent_channels: int = param(16, gt=0)
    norm_num_groups: int = param(32, gt=0)
    scaling_factor: float = param(
        0.2325, gt=0, help="official vae_scale applied to the posterior mode"
    )

    @property
    def stride(self) -> int:
        """Pixels per latent side: every level but the last halves the resolution."""
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass
class HarmonConfig:
    llm: QwenConfig = field(default_factory=QwenConfig)
    mar: MARConfig = field(default_factory=MARConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    image_size: int = param(512, gt=0, help="square training/inference resolution in pixels")
    grad_scale: float = param(
        0.1, ge=0, help="gradient scale from the I2T loss into the visual features"
    )
    uncond_prob: float = param(
        0.1, ge=0, le=1, help="T2I prompts replaced by the unconditional prompt"
    )
    t2i_prompt: str = param(
        "Generate an image: {prompt}", help="T2I instruction; {prompt} is the caption"
    )
    uncond_prompt: str = param(
        "Generate an image.", help="the dropped / classifier-free-guidance prompt"
    )
    i2t_max_text_tokens: int = param(
        512, gt=0, help="text tokens of an I2T sample (image tokens not counted)"
    )
    t2i_max_prompt_tokens: int = param(
        128, gt=0, help="tokens of a templated T2I prompt (truncated)"
    )
    trainable: list[Literal["llm", "decoder"]] = param(
        default_factory=lambda: ["llm", "decoder"],
        help="trained besides the shared MAR encoder + proj_in; decoder = MAR decoder, diffloss, proj_out",
    )
    guidance_scale: float = param(3.0, ge=0, help="classifier-free guidance; 1 disables it")
    cfg_schedule: Literal["constant", "linear"] = param("constant")
    num_iter: int = param(64, gt=0, help="MAR unmasking iterations when sampling")
    temperature: float = param(1.0, gt=0)
    attn_implementation: Literal["sdpa", "eager"] = param("sdpa")
    gradient_checkpointing: bool = param(
        False, help="the official training enables it for the LLM and MAR"
    )
    seed: int = param(0, help="salt of the deterministic per-sample prompt dropout and crops")

    def __post_init__(self) -> None:
        if len(self.vae.block_out_channels) < 2:
            raise ConfigError(
                "vae.block_out_channels needs at least 2 levels (the released KL-16 VAE has 5)"
            )
        unit = self.pixels_per_token
        for name, size in (("image_size", self.image_size), ("mar.img_size", self.mar.img_size)):
            if size % unit:
                raise ConfigError(
                    f"{name} {size} must be a multiple of VAE stride × patch = {unit}"
                )
        for part in ("encoder", "decoder"):
            if getattr(self.mar, f"{part}_embed_dim") % getattr(self.mar, f"{part}_num_heads"):
                raise ConfigError(f"mar.{part}_embed_dim must be divisible by mar.{part}_num_heads")
        if self.guidance_scale != 1 and not self.uncond_prompt:
            raise ConfigError("uncond_prompt must not be empty when guidance is on")

    @property
    def pixels_per_token(self) -> int:
        """Pixels per token side: the VAE stride times the MAR patch."""
        return self.vae.stride * self.mar.patch_size

    @property
    def grid_size(self) -> int:
        """Tokens per image side at ``image_size``."""
        return self.image_size // self.pixels_per_token

    @property
    def position_side(self) -> int:
        """Tokens per side of MAR's learned position tables (``mar.img_size``)."""
        return self.mar.img_size // self.pixels_per_token

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def num_llm_image_tokens(self) -> int:
        """Image tokens plus buffers: the length of one image in the LLM sequence."""
        return self.num_image_tokens + self.mar.buffer_size

    @property
    def latent_patch_dim(self) -> int:
        return self.vae.latent_channels * self.mar.patch_size**2


PRESETS: dict[str, dict[str, Any]] = {
    "1.5b": {},
    "0.5b": {
        "llm": {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
        },
        "mar": {
            "encoder_embed_dim": 768,
            "encoder_depth": 12,
            "encoder_num_heads": 12,
            "decoder_embed_dim": 768,
            "decoder_depth": 12,
            "decoder_num_heads": 12,
            "diffloss_d": 6,
            "diffloss_w": 1024,
        },
    },
    "tiny": {
        "llm": {
            "vocab_size": None,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
        },
        # Four VAE levels (8x, an 8x8 latent at 64 px): at 16x the 4x4 latent loses the shapes' outlines.
        # The position tables cover half the image side, as 256-px tables serve 512-px images.
        # The sampler's first step multiplies the head's error in ε at t = 999, the more the fewer
        # steps: a 128-wide head sampling all 1000 steps keeps the data's scale where a 32-wide one
        # did not (README, "The models"). One noise draw per token pays for the width.
        "mar": {
            "encoder_embed_dim": 32,
            "encoder_depth": 2,
            "encoder_num_heads": 4,
            "decoder_embed_dim": 32,
            "decoder_depth": 2,
            "decoder_num_heads": 4,
            "img_size": 32,
            "buffer_size": 4,
            "class_num": 10,
            "diffloss_d": 2,
            "diffloss_w": 128,
            "diffusion_batch_mul": 1,
            "num_sampling_steps": 1000,
        },
        "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 4},
        "image_size": 64,
        "i2t_max_text_tokens": 96,
        "t2i_max_prompt_tokens": 96,
        "num_iter": 16,
    },
}


def harmon_config(
    preset: str = "1.5b", options: dict[str, Any] | None = None, *, source: str = "model"
) -> HarmonConfig:
    """A validated config: the named preset with ``options`` (nested, same keys) on top."""
    return preset_config(HarmonConfig, PRESETS, "Harmon", preset, options, source)
