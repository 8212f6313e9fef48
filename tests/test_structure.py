"""The layout's import rules (DESIGN §2), checked on the source: data flows one way, and nothing
outside a family package names a family."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.models import family_specs

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = sorted(family_specs())
FAMILY_DIRS = [ROOT / "pipeline" / "models" / family for family in FAMILIES]


def _modules(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _outside_family_packages() -> list[Path]:
    return [
        p
        for p in _modules("pipeline", "experiments", "data_prep")
        if not any(p.is_relative_to(d) for d in FAMILY_DIRS)
    ]


def test_the_three_families_are_registered_from_their_packages():
    assert FAMILIES == ["harmon", "openuni", "showo2"]
    assert all((d / "spec.py").is_file() for d in FAMILY_DIRS)


@pytest.mark.parametrize("path", _modules("data_prep"), ids=lambda p: p.name)
def test_data_prep_imports_nothing_from_pipeline(path):
    assert not [n for n in _imports(path) if n == "pipeline" or n.startswith("pipeline.")]


@pytest.mark.parametrize("path", _outside_family_packages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_outside_a_family_package_imports_a_family_or_tests_for_one(path):
    prefixes = tuple(f"pipeline.models.{family}" for family in FAMILIES)
    assert not [n for n in _imports(path) if n.startswith(prefixes)]
    compared = {
        operand.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Compare)
        for operand in [node.left, *node.comparators]
        if isinstance(operand, ast.Constant)
    }
    assert not compared & set(FAMILIES), "tests which family it has"
