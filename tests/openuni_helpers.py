"""Fixtures for the OpenUni tests: the tiny model and forward-hook capture."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.models.openuni.model import OpenUni
from pipeline.models.openuni.config import openuni_config
from pipeline.models.openuni.processor import load_tokenizer


def tiny_openuni(tokenizer_dir: Path, **options) -> OpenUni:
    """The ``tiny`` preset with seeded random weights."""
    torch.manual_seed(0)
    return OpenUni(openuni_config("tiny", options), load_tokenizer(tokenizer_dir))


class Capture:
    """Records the positional args, keyword args and output of a module's forward calls."""

    def __init__(self, module: nn.Module) -> None:
        self.calls: list[tuple[tuple, dict, object]] = []
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self.calls.append((args, kwargs, output))

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
