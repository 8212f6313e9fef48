"""Show-o2 configuration: architecture dims, training and inference options, named presets.

The defaults are the released Show-o2 1.5B (``showlab/show-o2-1.5B``); the presets ``7b`` and
``tiny`` override them. Sources of the numbers (showlab/Show-o, folder ``show-o2/``):

- LLM: Qwen2.5-1.5B-Instruct / Qwen2.5-7B-Instruct (``configs/showo2_*_stage_2_a.yaml``
  ``llm_model_path``); their ``config.json`` gives the dims. The embedding is resized to
  ``len(tokenizer)`` after adding ``[PAD]``, ``<image>``, ``<|vid_start|>``, ``<|vid_end|>``
  (``models/misc.py`` ``get_text_tokenizer``; ``models/modeling_showo2_qwen2_5.py`` line 60):
  151665 + 4 = 151669 rows.
- Semantic path: SigLIP so400m-patch14-384 (``clip_pretrained_model_path``): width 1152, MLP 4304,
  16 heads, 27 layers of which the last is deleted (``modeling_showo2_qwen2_5.py`` line 80), and
  its 27×27 = 729 position embeddings.
- Flow head: ``models/modules.py`` ``DiffusionHeadConfig`` (width 2048, MLP 8192, 32 heads, 8 KV
  heads, head dim 64, llama3 RoPE θ=5e5, qk-norm) with ``num_diffusion_layers: 10``.
- Resolution 432 px → 54×54 Wan latents → 27×27 = 729 tokens of 2×2 patches
  (``dataset.preprocessing`` in the stage-2 configs).
- Transport: linear path, velocity prediction, ``snr_type: lognorm``, ``do_shift: True``;
  sampling: Euler, 50 steps, ``time_shifting_factor: 3.0``, ``guidance_scale: 5.0``;
  ``cond_dropout_prob: 0.1`` (``configs/showo2_1.5b_stage_2_a.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config import ConfigError, param
from pipeline.models.common.presets import preset_config
from pipeline.models.common.qwen import QwenConfig
from pipeline.models.showo2.flow import FlowLayout, FlowPrediction

WAN_LATENTS_MEAN = [
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
]
WAN_LATENTS_STD = [
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
]


@dataclass
class LLMConfig(QwenConfig):
    """Qwen2.5-Instruct with Show-o2's four added tokens (Qwen2.5-1.5B ties lm_head; 7B does not)."""

    vocab_size: int | None = param(151669, gt=0, help="embedding rows; null = len(tokenizer)")


@dataclass
class SemanticConfig:
    """SigLIP encoder layers of the semantic path (``transformers`` ``SiglipEncoder``)."""

    hidden_size: int = param(1152, gt=0)
    intermediate_size: int = param(4304, gt=0)
    num_layers: int = param(26, gt=0, help="SigLIP so400m has 27; Show-o2 deletes the last")
    num_attention_heads: int = param(16, gt=0)
    layer_norm_eps: float = param(1e-6, gt=0)
    num_positions: int = param(729, gt=0, help="SigLIP position embeddings (a square grid)")


@dataclass
class FlowHeadConfig:
    """Modulated transformer blocks predicting the velocity (official ``DiffusionHeadConfig``)."""

    hidden_size: int = param(2048, gt=0)
    intermediate_size: int = param(8192, gt=0)
    num_layers: int = param(10, gt=0)
    num_attention_heads: int = param(32, gt=0)
    num_key_value_heads: int = param(8, gt=0)
    rms_norm_eps: float = param(1e-5, gt=0)
    rope_theta: float = param(500000.0, gt=0)
    rope_factor: float = param(32.0, gt=0, help="llama3 RoPE scaling")
    rope_low_freq_factor: float = param(1.0, gt=0)
    rope_high_freq_factor: float = param(4.0, gt=0)
    rope_original_max_position_embeddings: int = param(8192, gt=0)
    max_position_embeddings: int = param(131072, gt=0)


@dataclass
class VAEConfig:
    """Wan2.1 3D causal VAE (``diffusers`` ``AutoencoderKLWan``), frozen."""

    base_dim: int = param(96, gt=0)
    z_dim: int = param(16, gt=0)
    dim_mult: list[int] = param(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = param(2, gt=0)
    temperal_downsample: list[bool] = param(default_factory=lambda: [False, True, True])
    latents_mean: list[float] = param(default_factory=lambda: list(WAN_LATENTS_MEAN))
    latents_std: list[float] = param(default_factory=lambda: list(WAN_LATENTS_STD))

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


@dataclass
class Showo2Config:
    llm: LLMConfig = field(default_factory=LLMConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    flow_head: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    patch_size: int = param(2, gt=0, help="latent patch of one visual token")
    image_size: int = param(432, gt=0, help="square input/output resolution in pixels")
    max_seq_len: int = param(1024, gt=0, help="tokens per sequence, image tokens included")
    system_prompt: str = param(
        "system\nYou are a helpful assistant.<|im_end|>",
        help="prefix of I2T conversations ('' for none)",
    )
    trainable: list[Literal["llm", "flow_head"]] = param(
        default_factory=lambda: ["llm", "flow_head"],
        help="trained besides the shared visual tokenizer",
    )
    flow_layout: FlowLayout = param(
        "official",
        help="latent pixels of flow-head output row n: 'official' = the released raster runs of p·p "
        "(released weights need it), 'patch' = the p×p patch under visual token n",
    )
    flow_prediction: FlowPrediction = param(
        "velocity",
        help="what the flow head outputs: 'velocity' u = x1 − x0 (released weights), or 'data' x1, "
        "turned into u = (x1 − x_t)/(1 − t) for the same velocity loss",
    )
    cond_dropout_prob: float = param(0.1, ge=0, le=1, help="T2I prompts replaced by '' (for CFG)")
    sample_vae_posterior: bool = param(
        True, help="training latents = posterior sample, as in Show-o2"
    )
    guidance_scale: float = param(5.0, ge=0)
    num_inference_steps: int = param(50, ge=2)
    time_shifting_factor: float = param(3.0, gt=0)
    train_time_shift: float | None = param(
        None,
        gt=0,
        help="training timesteps' shift towards noise (noise odds times it); null = the official "
        "resolution-dependent exp(mu), 1.6 at 64 visual tokens",
    )
    attn_implementation: Literal["sdpa", "eager"] = param("sdpa")
    gradient_checkpointing: bool = param(False)
    seed: int = param(0, help="salt of the deterministic per-sample prompt dropout")

    def __post_init__(self) -> None:
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self.vae, name)) != self.vae.z_dim:
                raise ConfigError(
                    f"vae.{name} has {len(getattr(self.vae, name))} entries; vae.z_dim is "
                    f"{self.vae.z_dim} (one per latent channel)"
                )
        unit = self.vae.spatial_factor * self.patch_size
        if self.image_size % unit:
            raise ConfigError(
                f"image_size {self.image_size} must be a multiple of VAE factor × patch = {unit}"
            )
        if self.flow_head.hidden_size % self.flow_head.num_attention_heads:
            raise ConfigError(
                "flow_head.hidden_size must be divisible by flow_head.num_attention_heads"
            )
        if self.max_seq_len <= self.num_image_tokens + 6:
            raise ConfigError(
                f"max_seq_len {self.max_seq_len} leaves no room next to {self.num_image_tokens} image tokens"
            )

    @property
    def latent_size(self) -> int:
        return self.image_size // self.vae.spatial_factor

    @property
    def grid_size(self) -> int:
        return self.latent_size // self.patch_size

    @property
    def num_image_tokens(self) -> int:
        return self.grid_size**2

    @property
    def latent_patch_dim(self) -> int:
        return self.patch_size**2 * self.vae.z_dim


PRESETS: dict[str, dict[str, Any]] = {
    "1.5b": {},
    "7b": {
        "llm": {
            "hidden_size": 3584,
            "intermediate_size": 18944,
            "num_attention_heads": 28,
            "num_key_value_heads": 4,
            "tie_word_embeddings": False,
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
        "semantic": {
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_layers": 2,
            "num_attention_heads": 4,
            "num_positions": 64,
        },
        "flow_head": {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        },
        # 4x instead of 8x spatial downsampling: at 64 px the scenes' 10-17 px shapes span several
        # latent cells, so a tiny VAE can learn to reconstruct them (8x blurs them into blobs).
        "vae": {
            "base_dim": 8,
            "num_res_blocks": 1,
            "dim_mult": [1, 2, 4],
            "temperal_downsample": [False, True],
        },
        "image_size": 64,
        # Trained from scratch, so free of the released layout, in which most tokens must fetch their
        # target's start noise from other tokens: a 64-wide model learns its own patch instead.
        "flow_layout": "patch",
        # A head as narrow as its patch's velocity must also reproduce the start noise; predicting
        # the clean patch (JiT) does not.
        "flow_prediction": "data",
        # The sampler's shift: the official one at 64 tokens leaves the steps near noise, where the
        # layout is decided, under-trained. Measurements of these choices: README, "The ablation".
        "train_time_shift": 3.0,
        "max_seq_len": 224,
        # Chosen on training-corpus prompts, not the held-out ones (README, "The ablation").
        "num_inference_steps": 24,
        "guidance_scale": 3.0,
    },
}


def showo2_config(
    preset: str = "1.5b", options: dict[str, Any] | None = None, *, source: str = "model"
) -> Showo2Config:
    """A validated config: the named preset with ``options`` (nested, same keys) on top."""
    return preset_config(Showo2Config, PRESETS, "Show-o2", preset, options, source)


def options_from_official(
    raw: dict[str, Any], preset: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Preset and options matching a released ``config.json`` (``Showo2Qwen2_5`` init arguments).

    The preset is inferred from ``hidden_size`` (1536 → 1.5b, 3584 → 7b) unless given.
    """
    presets_by_width = {1536: "1.5b", 3584: "7b"}
    width = raw.get("hidden_size")
    if preset is None and width not in presets_by_width:
        raise ConfigError(
            f"config.json: hidden_size {width!r} is not a released Show-o2 size (1536 or 3584)"
        )
    if not raw.get("add_time_embeds", True):
        raise ConfigError(
            "config.json: add_time_embeds=false is not supported (all released models use it)"
        )
    options: dict[str, Any] = {"patch_size": raw.get("patch_size", 2)}
    if raw.get("llm_vocab_size") is not None:
        options["llm"] = {"vocab_size": raw["llm_vocab_size"]}
    if "num_diffusion_layers" in raw:
        options["flow_head"] = {"num_layers": raw["num_diffusion_layers"]}
    if "clip_latent_dim" in raw:
        options["semantic"] = {"hidden_size": raw["clip_latent_dim"]}
    if "image_latent_dim" in raw:
        options["vae"] = {"z_dim": raw["image_latent_dim"]}
    preset = preset or presets_by_width[width]
    if "image_latent_height" in raw:
        # image_latent_height is the token grid; pixels = grid × patch × the preset's VAE factor (Wan2.1: 8).
        factor = showo2_config(preset).vae.spatial_factor
        options["image_size"] = raw["image_latent_height"] * options["patch_size"] * factor
    return preset, options
