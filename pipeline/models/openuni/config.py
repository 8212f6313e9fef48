"""OpenUni configuration: architecture dims, training and inference options, named presets.

The defaults are the released OpenUni-B-512; the presets ``l_512``, ``l_1024`` and ``tiny``
override them. Sources of the numbers (wusize/OpenUni unless named otherwise):

- ``configs/models/openuni_{b,l}_internvl3_*_hf.py``: ``num_queries=256``; connector
  hidden/intermediate/layers/heads 896/3072/6/14 (B) and 1536/8960/6/24 (L); InternVL3-1B /
  InternVL3-2B; SANA ``Sana_600M_512px`` (B), ``Sana_1600M_512px`` (L-512),
  ``SANA1.5_1.6B_1024px`` (L-1024); DC-AE ``dc-ae-f32c32-sana-1.1``; ``freeze_lmm=True``.
- ``src/models/connector/configuration_connector.py``: connector ``gelu_pytorch_tanh``, eps 1e-6.
- ``src/models/openuni/internvl3_sana_hf.py``: ``vit_input_size=448``, ``proj_type='enc_proj'``
  (projector = Linear(connector width → SANA ``caption_channels``)), ``max_length=2048``.
- ``configs/datasets/internvl3_*/processors.py``: prompt template (``GENERATION``, ``CFG``),
  ``image_size`` 512 / 1024; ``*_latents.py``: ``max_length=128``, ``unconditional=0.1``.
- ``scripts/text2image.py``: ``cfg_scale=4.5``, ``num_steps=20``.
- InternVL3-1B ``config.json`` (hub ``OpenGVLab/InternVL3-1B``): InternViT-300M (1024 / 4096 /
  24 layers / 16 heads, patch 14, 448 px, qkv bias, LayerNorm eps 1e-6, no qk-norm, layer scale
  0.1), ``downsample_ratio 0.5``, ``ps_version v2``, ``select_layer -1``, template ``internvl2_5``,
  Qwen2.5-0.5B LLM (896 / 4864 / 24 / 14 heads / 2 KV, vocab 151674, θ=1e6, dynamic RoPE ×2,
  untied ``lm_head``). InternVL3-2B: Qwen2.5-1.5B LLM (1536 / 8960 / 28 / 12 / 2).
- diffusers ``scripts/convert_sana_to_diffusers.py``: SANA dims per model type (600M: 36×32
  heads, 28 layers, cross 16×72; 1600M: 70×32, 20 layers, cross 20×112), ``caption_channels``
  2304, ``mlp_ratio`` 2.5, ``sample_size = image_size // 32``, no positional embedding at
  512/1024 px, qk-norm ``rms_norm_across_heads`` for SANA 1.5; scheduler ``flow_shift`` 3.0.
- diffusers ``scripts/convert_dcae_to_diffusers.py``: DC-AE f32c32 (ResBlock×3 then
  EfficientViTBlock×3, widths 128…1024, layers 2,2,2,3,3,3 / 3×6, multiscale 5, conv
  downsampling, interpolate upsampling, ``scaling_factor`` 0.41407).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import ConfigError, param
from pipeline.models.common.presets import preset_config
from pipeline.models.common.qwen import QwenConfig

INTERNVL_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass
class VisionConfig:
    """InternViT (``vision_model``): the image half of ``V_enc``."""

    hidden_size: int = param(1024, gt=0)
    intermediate_size: int = param(4096, gt=0)
    num_hidden_layers: int = param(24, gt=0)
    num_attention_heads: int = param(16, gt=0)
    patch_size: int = param(14, gt=0)
    image_size: int = param(448, gt=0, help="ViT input resolution (OpenUni vit_input_size)")
    qkv_bias: bool = param(True)
    qk_normalization: bool = param(False)
    norm_type: Literal["layer_norm", "rms_norm"] = param("layer_norm")
    layer_norm_eps: float = param(1e-6, gt=0)
    initializer_factor: float = param(0.1, gt=0, help="layer-scale init (ls1/ls2)")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class LLMConfig(QwenConfig):
    """Qwen2.5 decoder of InternVL3 (``language_model``); defaults: InternVL3-1B's."""

    vocab_size: int | None = param(151674, gt=0, help="embedding rows; null = len(tokenizer)")
    hidden_size: int = param(896, gt=0)
    intermediate_size: int = param(4864, gt=0)
    num_hidden_layers: int = param(24, gt=0)
    num_attention_heads: int = param(14, gt=0)
    tie_word_embeddings: bool = param(False)
    rope_dynamic_factor: float | None = param(
        2.0, gt=0, help="dynamic NTK RoPE factor; null = plain RoPE"
    )


@dataclass
class ConnectorConfig:
    """SigLIP-style encoder between the meta queries and the projector (``connector``)."""

    hidden_size: int = param(896, gt=0)
    intermediate_size: int = param(3072, gt=0)
    num_hidden_layers: int = param(6, gt=0)
    num_attention_heads: int = param(14, gt=0)
    layer_norm_eps: float = param(1e-6, gt=0)


@dataclass
class SanaConfig:
    """SANA diffusion transformer (``diffusers`` ``SanaTransformer2DModel``, ``transformer``)."""

    num_attention_heads: int = param(36, gt=0)
    attention_head_dim: int = param(32, gt=0)
    num_layers: int = param(28, gt=0)
    num_cross_attention_heads: int = param(16, gt=0)
    cross_attention_head_dim: int = param(72, gt=0)
    caption_channels: int = param(2304, gt=0, help="width of the conditions (Gemma-2-2B in SANA)")
    mlp_ratio: float = param(2.5, gt=0)
    qk_norm: Literal["rms_norm_across_heads"] | None = param(
        None, help="SANA 1.5 normalises q and k"
    )
    norm_eps: float = param(1e-6, gt=0)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclass
class DCAEConfig:
    """Deep-compression autoencoder (``diffusers`` ``AutoencoderDC``), frozen."""

    latent_channels: int = param(32, gt=0)
    attention_head_dim: int = param(32, gt=0)
    block_types: list[Literal["ResBlock", "EfficientViTBlock"]] = param(
        default_factory=lambda: ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3
    )
    block_out_channels: list[int] = param(default_factory=lambda: [128, 256, 512, 512, 1024, 1024])
    encoder_layers_per_block: list[int] = param(default_factory=lambda: [2, 2, 2, 3, 3, 3])
    decoder_layers_per_block: list[int] = param(default_factory=lambda: [3, 3, 3, 3, 3, 3])
    qkv_multiscales: list[list[int]] = param(default_factory=lambda: [[], [], [], [5], [5], [5]])
    scaling_factor: float = param(0.41407, gt=0)

    def __post_init__(self) -> None:
        per_stage = (
            self.block_types,
            self.encoder_layers_per_block,
            self.decoder_layers_per_block,
            self.qkv_multiscales,
        )
        if any(len(values) != len(self.block_out_channels) for values in per_stage):
            raise ConfigError(
                "vae: block_types, *_layers_per_block and qkv_multiscales need one entry per stage"
            )

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def diffusers_kwargs(self) -> dict[str, Any]:
        stages = tuple(tuple(s) for s in self.qkv_multiscales)
        return {
            "in_channels": 3,
            "latent_channels": self.latent_channels,
            "attention_head_dim": self.attention_head_dim,
            "encoder_block_types": tuple(self.block_types),
            "decoder_block_types": tuple(self.block_types),
            "encoder_block_out_channels": tuple(self.block_out_channels),
            "decoder_block_out_channels": tuple(self.block_out_channels),
            "encoder_layers_per_block": tuple(self.encoder_layers_per_block),
            "decoder_layers_per_block": tuple(self.decoder_layers_per_block),
            "encoder_qkv_multiscales": stages,
            "decoder_qkv_multiscales": stages,
            "downsample_block_type": "conv",
            "upsample_block_type": "interpolate",
            "decoder_norm_types": "rms_norm",
            "decoder_act_fns": "silu",
            "scaling_factor": self.scaling_factor,
        }


@dataclass
class OpenUniConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    sana: SanaConfig = field(default_factory=SanaConfig)
    vae: DCAEConfig = field(default_factory=DCAEConfig)
    downsample_ratio: float = param(
        0.5, gt=0, le=1, help="InternVL pixel shuffle (0.5: 2×2 patches per token)"
    )
    num_queries: int = param(256, gt=0, help="learnable meta queries appended to the T2I prompt")
    image_size: int = param(512, gt=0, help="generation resolution in pixels")
    max_prompt_len: int = param(128, gt=0, help="T2I prompt tokens kept (official max_length)")
    max_seq_len: int = param(2048, gt=0, help="I2T tokens kept, image tokens included")
    system_message: str = param(
        INTERNVL_SYSTEM_MESSAGE, help="InternVL2.5 template system prompt ('' for none)"
    )
    generation_prompt: str = param(
        "Generate an image: {input}", help="T2I user message; {input} = prompt"
    )
    cfg_prompt: str = param("Generate an image.", help="unconditional T2I user message")
    trainable: list[Literal["llm", "connector", "transformer"]] = param(
        default_factory=lambda: ["connector", "transformer"],
        help="trained besides V_enc; connector = meta_queries + connector + projector (official fine-tune)",
    )
    cond_dropout_prob: float = param(0.1, ge=0, le=1, help="T2I prompts replaced by the CFG prompt")
    num_train_timesteps: int = param(1000, gt=1)
    train_shift: float = param(
        1.0, gt=0, help="FlowMatchEuler shift of the training sigmas (1.0 as released)"
    )
    flow_shift: float = param(
        3.0, gt=0, help="DPM-Solver flow shift of the sampler (SANA scheduler)"
    )
    guidance_scale: float = param(4.5, ge=0)
    num_inference_steps: int = param(20, ge=1)
    attn_implementation: Literal["sdpa", "eager"] = param("sdpa")
    gradient_checkpointing: bool = param(False)
    seed: int = param(0, help="salt of the deterministic per-sample prompt dropout")
    internvl_path: str | None = param(
        None, help="local InternVL3 directory under a released openuni_*.pth"
    )
    sana_path: str | None = param(
        None, help="local SANA diffusers directory (or its transformer/) under a .pth"
    )

    def __post_init__(self) -> None:
        if self.connector.hidden_size != self.llm.hidden_size:
            raise ConfigError(
                "connector.hidden_size must equal llm.hidden_size (OpenUni proj_type 'enc_proj')"
            )
        merge = round(1 / self.downsample_ratio)
        if self.vision.grid_size % merge or self.vision.image_size % self.vision.patch_size:
            raise ConfigError(f"vision.image_size must be a multiple of patch_size × {merge}")
        if self.latent_size % self.token_grid:
            raise ConfigError(
                f"image_size {self.image_size} gives a {self.latent_size}² latent that the "
                f"{self.token_grid}² token grid does not divide"
            )
        if self.image_size % self.vae.spatial_factor:
            raise ConfigError(
                f"image_size must be a multiple of the DC-AE factor {self.vae.spatial_factor}"
            )
        if self.max_seq_len <= self.num_image_tokens + 16:
            raise ConfigError(
                f"max_seq_len {self.max_seq_len} leaves no room next to {self.num_image_tokens} "
                "image tokens"
            )

    @property
    def token_grid(self) -> int:
        """Side of the square grid of ``V_enc`` tokens (16 for 448 px, patch 14, shuffle 0.5)."""
        return round(self.vision.grid_size * self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        return self.token_grid**2

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.spatial_factor

    @property
    def latent_patch(self) -> int:
        """Latent pixels per token side: the target patch under one token is ``p×p``."""
        return self.latent_size // self.token_grid

    @property
    def latent_patch_dim(self) -> int:
        return self.latent_patch**2 * self.vae.latent_channels


_LLM_2B = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
}
_CONNECTOR_L = {
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 6,
    "num_attention_heads": 24,
}
_SANA_1600M = {
    "num_attention_heads": 70,
    "attention_head_dim": 32,
    "num_layers": 20,
    "num_cross_attention_heads": 20,
    "cross_attention_head_dim": 112,
}

PRESETS: dict[str, dict[str, Any]] = {
    "b_512": {},
    "l_512": {"llm": _LLM_2B, "connector": _CONNECTOR_L, "sana": _SANA_1600M},
    "l_1024": {
        "llm": _LLM_2B,
        "connector": _CONNECTOR_L,
        "sana": {**_SANA_1600M, "qk_norm": "rms_norm_across_heads"},
        "image_size": 1024,
    },
    "tiny": {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 7,
            "image_size": 56,
        },
        "llm": {
            "vocab_size": None,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 2048,
        },
        "connector": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
        },
        "sana": {
            "num_attention_heads": 2,
            "attention_head_dim": 8,
            "num_layers": 2,
            "num_cross_attention_heads": 2,
            "cross_attention_head_dim": 8,
            "caption_channels": 24,
        },
        "vae": {
            "latent_channels": 4,
            "attention_head_dim": 8,
            "block_out_channels": [8, 16, 16],
            "block_types": ["ResBlock", "ResBlock", "EfficientViTBlock"],
            "encoder_layers_per_block": [1, 1, 1],
            "decoder_layers_per_block": [1, 1, 1],
            "qkv_multiscales": [[], [], [5]],
        },
        "num_queries": 8,
        "image_size": 32,
        "max_seq_len": 256,
        "system_message": "You are a helpful assistant.",
        "num_inference_steps": 4,
    },
}


def openuni_config(
    preset: str = "b_512", options: dict[str, Any] | None = None, *, source: str = "model"
) -> OpenUniConfig:
    """A validated config: the named preset with ``options`` (nested, same keys) on top."""
    return preset_config(OpenUniConfig, PRESETS, "OpenUni", preset, options, source)


def infer_preset(llm_width: int, sana_sample_size: int) -> str:
    """The released size with this InternVL3 LLM width and SANA latent size."""
    sizes = {(896, 16): "b_512", (1536, 16): "l_512", (1536, 32): "l_1024"}
    if (llm_width, sana_sample_size) not in sizes:
        raise ConfigError(
            f"no released OpenUni has an LLM of width {llm_width} with a SANA latent of "
            f"{sana_sample_size}² (known: {sorted(sizes)}); pass preset"
        )
    return sizes[llm_width, sana_sample_size]


def options_from_internvl(raw: dict[str, Any]) -> dict[str, Any]:
    """``vision`` / ``llm`` options from an InternVL3 ``config.json`` (``InternVLChatConfig``)."""
    vision, llm = raw.get("vision_config", {}), raw.get("llm_config", {})
    if raw.get("select_layer", -1) != -1 or raw.get("ps_version", "v2") != "v2":
        raise ConfigError(
            "InternVL3 config.json: only select_layer -1 and ps_version v2 are supported"
        )
    if llm.get("architectures", ["Qwen2ForCausalLM"])[0] != "Qwen2ForCausalLM":
        raise ConfigError(
            f"InternVL3 config.json: LLM {llm.get('architectures')} is not Qwen2ForCausalLM"
        )
    scaling = llm.get("rope_scaling") or {}
    out: dict[str, Any] = {
        "vision": {
            key: vision[key]
            for key in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "patch_size",
                "qkv_bias",
                "qk_normalization",
                "norm_type",
                "layer_norm_eps",
                "initializer_factor",
            )
            if key in vision
        },
        "llm": {
            key: llm[key]
            for key in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "rms_norm_eps",
                "rope_theta",
                "max_position_embeddings",
            )
            if key in llm
        },
        "downsample_ratio": raw.get("downsample_ratio", 0.5),
    }
    dynamic = scaling.get("rope_type", scaling.get("type")) == "dynamic"
    out["llm"]["rope_dynamic_factor"] = scaling.get("factor") if dynamic else None
    out["llm"]["tie_word_embeddings"] = raw.get(
        "tie_word_embeddings", llm.get("tie_word_embeddings", False)
    )
    image_size = raw.get("force_image_size") or vision.get("image_size")
    if image_size:
        out["vision"]["image_size"] = image_size
    return out


SANA_KEYS = (
    "num_attention_heads",
    "attention_head_dim",
    "num_layers",
    "num_cross_attention_heads",
    "cross_attention_head_dim",
    "caption_channels",
    "mlp_ratio",
    "qk_norm",
    "norm_eps",
)


def options_from_sana(raw: dict[str, Any]) -> dict[str, Any]:
    """``sana`` options from a ``SanaTransformer2DModel`` ``config.json``; rejects unsupported variants."""
    unsupported = {
        "patch_size": 1,
        "interpolation_scale": None,
        "guidance_embeds": False,
        "attention_bias": False,
        "norm_elementwise_affine": False,
        "timestep_scale": 1.0,
    }
    bad = [
        f"{key}={raw[key]!r}"
        for key, value in unsupported.items()
        if key in raw and raw[key] != value
    ]
    inner = raw.get("num_attention_heads", 0) * raw.get("attention_head_dim", 0)
    if raw.get("cross_attention_dim", inner) != inner:
        bad.append(f"cross_attention_dim={raw['cross_attention_dim']!r}")
    if bad:
        raise ConfigError(f"SANA config.json: variant not supported ({', '.join(bad)})")
    return {"sana": {key: raw[key] for key in SANA_KEYS if key in raw}}


DCAE_KEYS = {
    "latent_channels": "latent_channels",
    "attention_head_dim": "attention_head_dim",
    "encoder_block_types": "block_types",
    "encoder_block_out_channels": "block_out_channels",
    "encoder_layers_per_block": "encoder_layers_per_block",
    "decoder_layers_per_block": "decoder_layers_per_block",
    "encoder_qkv_multiscales": "qkv_multiscales",
    "scaling_factor": "scaling_factor",
}


def options_from_dcae(raw: dict[str, Any]) -> dict[str, Any]:
    """``vae`` options from an ``AutoencoderDC`` ``config.json`` (decoder stages mirror the encoder's)."""
    if any(
        raw.get(f"encoder_{key}") != raw.get(f"decoder_{key}")
        for key in ("block_types", "block_out_channels", "qkv_multiscales")
    ):
        raise ConfigError(
            "DC-AE config.json: decoder stages that differ from the encoder's are not supported"
        )
    options = {ours: raw[theirs] for theirs, ours in DCAE_KEYS.items() if theirs in raw}
    if isinstance(options.get("block_types"), str):
        options["block_types"] = [options["block_types"]] * len(raw["encoder_block_out_channels"])
    if "qkv_multiscales" in options:
        options["qkv_multiscales"] = [list(s) for s in options["qkv_multiscales"]]
    return {"vae": options}
