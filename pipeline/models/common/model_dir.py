"""The directory ``save_pretrained`` writes: the family's released layout, plus a record of the
adapter (family and full config) in ``config.json`` so that export and evaluation can load it back
without being told the family."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ADAPTER_CONFIG_KEY = "_infotok_adapter"


def write_config_json(
    path: Path, official: dict[str, Any], family: str, config: dict[str, Any]
) -> None:
    """``path/config.json``: the released model's own fields, then the adapter record."""
    record = {**official, ADAPTER_CONFIG_KEY: {"family": family, "config": config}}
    (path / "config.json").write_text(json.dumps(record, indent=2) + "\n")


def read_adapter_record(config_file: Path) -> dict[str, Any] | None:
    """``{"family": ..., "config": {...}}`` from a ``config.json`` that ``save_pretrained`` wrote;
    None for a released model's own ``config.json``."""
    raw = json.loads(config_file.read_text())
    record = raw.get(ADAPTER_CONFIG_KEY) if isinstance(raw, dict) else None
    return record if isinstance(record, dict) else None
