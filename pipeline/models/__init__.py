"""Model adapters by family name; the trainer calls :func:`build_model` and nothing family-specific."""

from __future__ import annotations

import importlib

from pipeline.config import ConfigError
from pipeline.models.base import MLLMAdapter, MLLMOutput, ModelConfig

# family name -> "module:class", imported on first use so one family's dependencies never load another's.
FAMILIES: dict[str, str] = {
    "showo2": "pipeline.models.showo2:Showo2",
    "harmon": "pipeline.models.harmon:Harmon",
    "openuni": "pipeline.models.openuni:OpenUni",
}


def adapter_class(family: str) -> type[MLLMAdapter]:
    if family not in FAMILIES:
        raise ConfigError(f"model.family: unknown family {family!r} (available: {', '.join(sorted(FAMILIES))})")
    module_name, class_name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_model(config: ModelConfig) -> MLLMAdapter:
    """The adapter for ``config.family``: random init, or the checkpoint at ``config.path``."""
    return adapter_class(config.family).build(config)


__all__ = ["FAMILIES", "MLLMAdapter", "MLLMOutput", "ModelConfig", "adapter_class", "build_model"]
