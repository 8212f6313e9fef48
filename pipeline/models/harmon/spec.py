"""Harmon's family spec: what the registry, preflight and trainer know about it."""

from __future__ import annotations

from pathlib import Path

from pipeline.models.base import FamilySpec, MLLMAdapter, ModelConfig, Requirement
from pipeline.models.harmon.config import PRESETS, HarmonConfig

TOKENIZER = "the Qwen2.5-Instruct directory (a released .pth applies on top of its LLM)"


def adapter() -> type[MLLMAdapter]:
    from pipeline.models.harmon.model import Harmon

    return Harmon


def required_files(model: ModelConfig) -> list[Requirement]:
    """Random init needs a tokenizer; a checkpoint (a released ``harmon_*.pth`` or a directory)
    its weights and a tokenizer (in the directory or ``tokenizer_path``)."""
    tokenizer_path = Path(model.tokenizer_path) if model.tokenizer_path else None
    if model.path is None:
        return [Requirement("model.tokenizer_path", tokenizer_path, "tokenizer", TOKENIZER)]
    path = Path(model.path)
    return [
        Requirement("model.path", path, "weights", "harmon_*.pth or a Harmon checkpoint directory"),
        Requirement(
            "model.tokenizer_path",
            tokenizer_path,
            "tokenizer",
            TOKENIZER,
            fallbacks=(path,) if path.is_dir() else (),
        ),
    ]


SPEC = FamilySpec(
    name="harmon",
    title="Harmon",
    adapter=adapter,
    options=HarmonConfig,
    presets=PRESETS,
    required_files=required_files,
    repeated_blocks=(
        "llm.model.layers",
        "mar.encoder_blocks",
        "mar.decoder_blocks",
        "mar.diffloss.net.res_blocks",
    ),
)
