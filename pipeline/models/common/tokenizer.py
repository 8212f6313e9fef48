"""Where a model's tokenizer lives: the first candidate directory holding tokenizer files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def holds_tokenizer(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_dir(candidates: Iterable[str | Path | None], hint: str) -> Path:
    """The first of ``candidates`` (``None`` entries skipped) that holds a tokenizer.

    ``hint`` says what to pass when none does, e.g. "tokenizer_path (the Qwen2.5-Instruct
    tokenizer directory)".
    """
    tried = [Path(c) for c in candidates if c is not None]
    for candidate in tried:
        if holds_tokenizer(candidate):
            return candidate
    where = ", ".join(str(c) for c in tried) or "no directory given"
    files = " or ".join(TOKENIZER_FILES)
    raise FileNotFoundError(f"no tokenizer ({files}) in {where}: pass {hint}")
