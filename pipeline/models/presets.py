"""Named presets of the family configs: a preset is a nested mapping of overrides on the defaults."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from pipeline.config import ConfigError, from_dict

T = TypeVar("T")


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in, recursively for nested mappings (inputs are not modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def preset_config(cls: type[T], presets: dict[str, dict[str, Any]], family: str, preset: str,
                  options: dict[str, Any] | None, source: str) -> T:
    """A validated ``cls``: the named preset with ``options`` (nested, same keys) on top."""
    if preset not in presets:
        raise ConfigError(f"{source}: preset: unknown {family} preset {preset!r} (valid: {', '.join(presets)})")
    return from_dict(cls, deep_merge(presets[preset], options or {}), source=source, prefix="options.")
