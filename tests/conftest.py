"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest

from pipeline.models.common.tiny_tokenizer import make_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The package's tiny Qwen-style tokenizer, trained once per test session."""
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))
