"""Finding a checkpoint under a path and splitting its state (export and evaluation share both)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT_DIR, LATEST, locate, tag_for
from pipeline.consolidate import split_state


@pytest.fixture
def run(tmp_path) -> Path:
    root = tmp_path / "run" / CHECKPOINT_DIR
    for step in (2, 4):
        (root / tag_for(step)).mkdir(parents=True)
    (root / LATEST).write_text(tag_for(4))
    return tmp_path / "run"


def test_locate_takes_a_run_its_checkpoints_or_one_step(run):
    root = run / CHECKPOINT_DIR
    assert locate(run) == locate(root) == (root, "step_00000004")
    assert locate(root / "step_00000002") == (root, "step_00000002")
    assert locate(run, step=2) == (root, "step_00000002")


def test_locate_names_what_is_missing(run, tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"step_00000006 does not exist \(available: "
        r"step_00000002, step_00000004\)",
    ):
        locate(run, step=6)
    with pytest.raises(FileNotFoundError, match="nothing: not a run directory"):
        locate(tmp_path / "nothing")


def test_split_state_strips_the_prefixes_and_rejects_any_other_key():
    x, y = torch.zeros(1), torch.ones(1)
    adapter, regularizer = split_state({"adapter.a.w": x, "regularizer.b": y}, Path("ckpt"))
    assert adapter == {"a.w": x} and regularizer == {"b": y}
    with pytest.raises(
        ValueError,
        match=r"ckpt: unexpected keys outside adapter\.\* and "
        r"regularizer\.\*: \['module\.c'\]",
    ):
        split_state({"adapter.a.w": x, "module.c": y}, Path("ckpt"))
