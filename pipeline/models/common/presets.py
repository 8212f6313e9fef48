"""Named presets of the family configs: a preset is a nested mapping of overrides on the defaults."""

from __future__ import annotations

import copy
from collections.abc import Mapping
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


def preset_config(
    cls: type[T],
    presets: Mapping[str, Mapping[str, Any]],
    family: str,
    preset: str,
    options: dict[str, Any] | None,
    source: str,
    *,
    prefix: str = "",
) -> T:
    """A validated ``cls``: the named preset with ``options`` (nested, same keys) on top.

    Errors name ``{prefix}preset`` or ``{prefix}options.<key>`` (``prefix`` e.g. ``"model."``).
    """
    if preset not in presets:
        raise ConfigError(
            f"{source}: {prefix}preset: unknown {family} preset {preset!r} "
            f"(valid: {', '.join(presets)})"
        )
    merged = deep_merge(dict(presets[preset]), options or {})
    return from_dict(cls, merged, source=source, prefix=f"{prefix}options.")
