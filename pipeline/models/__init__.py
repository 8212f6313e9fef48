"""Model families by name. Each family is one package here with a ``spec.py`` whose ``SPEC`` (a
:class:`FamilySpec`) the registry reads; the trainer calls :func:`build_model` and nothing
family-specific, and adding a family means adding its package."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil

from pipeline.config import ConfigError
from pipeline.models.base import FamilySpec, MLLMAdapter, MLLMOutput, ModelConfig, Requirement


@functools.cache
def family_specs() -> dict[str, FamilySpec]:
    """``{name: spec}`` of every package under ``pipeline/models`` that has a ``spec`` module."""
    specs = {}
    for package in pkgutil.iter_modules(__path__):
        spec_module = f"{__name__}.{package.name}.spec"
        if package.ispkg and importlib.util.find_spec(spec_module) is not None:
            spec = importlib.import_module(spec_module).SPEC
            specs[spec.name] = spec
    return specs


def family_spec(family: str, *, source: str = "model", key: str = "model.family") -> FamilySpec:
    specs = family_specs()
    if family not in specs:
        raise ConfigError(
            f"{source}: {key}: unknown family {family!r} (available: {', '.join(sorted(specs))})"
        )
    return specs[family]


def adapter_class(family: str) -> type[MLLMAdapter]:
    return family_spec(family).adapter()


def build_model(config: ModelConfig) -> MLLMAdapter:
    """The adapter for ``config.family``: random init, or the checkpoint at ``config.path``."""
    return adapter_class(config.family).build(config)


__all__ = [
    "FamilySpec",
    "MLLMAdapter",
    "MLLMOutput",
    "ModelConfig",
    "Requirement",
    "adapter_class",
    "build_model",
    "family_spec",
    "family_specs",
]
