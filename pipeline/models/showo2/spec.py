"""Show-o2's family spec: what the registry, preflight and trainer know about it."""

from __future__ import annotations

from pathlib import Path

from pipeline.models.base import FamilySpec, MLLMAdapter, ModelConfig, Requirement
from pipeline.models.showo2.config import PRESETS, Showo2Config

TOKENIZER = "the Qwen2.5-Instruct tokenizer directory"
VAE = "Wan2.1_VAE.pth or a diffusers AutoencoderKLWan directory"


def adapter() -> type[MLLMAdapter]:
    from pipeline.models.showo2.model import Showo2

    return Showo2


def required_files(model: ModelConfig) -> list[Requirement]:
    """Random init needs a tokenizer; a checkpoint directory (released or exported) its
    ``config.json``, weights, a tokenizer (there or ``tokenizer_path``) and the VAE."""
    tokenizer_path = Path(model.tokenizer_path) if model.tokenizer_path else None
    if model.path is None:
        return [Requirement("model.tokenizer_path", tokenizer_path, "tokenizer", TOKENIZER)]
    path = Path(model.path)
    vae_path = Path(model.vae_path) if model.vae_path else None
    return [
        Requirement("model.path", path / "config.json", "file", "a Show-o2 checkpoint directory"),
        Requirement("model.path", path, "weights", "a Show-o2 checkpoint directory"),
        Requirement(
            "model.tokenizer_path", tokenizer_path, "tokenizer", TOKENIZER, fallbacks=(path,)
        ),
        Requirement("model.vae_path", vae_path, "any", VAE, fallbacks=(path / "vae",)),
    ]


SPEC = FamilySpec(
    name="showo2",
    title="Show-o2",
    adapter=adapter,
    options=Showo2Config,
    presets=PRESETS,
    required_files=required_files,
    repeated_blocks=("showo.model.layers", "und_trans.layers", "diffusion_head_a"),
)
