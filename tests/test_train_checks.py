"""``python -m pipeline.train`` runs the preflight checks before it builds anything: a bad path, key
or file is one line on stderr naming the key and the file, and exit code 2 on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.train import EXIT_BAD_SETUP
from train_helpers import ROOT, make_workspace

RECIPE = "configs/tiny_showo2.yaml"
FAILED = "preflight: FAILED: "
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train_checks"))


def run_train(
    workspace,
    tmp_path: Path,
    extra: list[str],
    recipe: str = RECIPE,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """One plain trainer process (no launcher); a run that gets past the checks trains 1 step."""
    overrides = [
        f"run_dir={tmp_path / 'run'}",
        f"data.i2t=[{workspace['shards']}]",
        f"data.t2i=[{workspace['shards']}]",
        "steps=1",
        "data.num_workers=0",
        f"model.tokenizer_path={workspace['tokenizer']}",
        *extra,
    ]
    clean = {
        k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")
    }
    clean.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", recipe, *overrides],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )


def deepspeed_json(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return path


def file_under_a_file(tmp_path: Path) -> Path:
    """A path no one can create, even root: its parent is a regular file."""
    (tmp_path / "afile").write_text("")
    return tmp_path / "afile" / "run"


def empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


# name -> (recipe, tmp_path -> (overrides, what the message must name))
Case = Callable[[Path], tuple[list[str], list[str]]]
OPENUNI = "configs/tiny_openuni.yaml"
CASES: dict[str, tuple[str, Case]] = {
    "model.path": (
        RECIPE,
        lambda t: ([f"model.path={t / 'no-model'}"], ["model.path", str(t / "no-model")]),
    ),
    "model.tokenizer_path": (
        RECIPE,
        lambda t: (
            [f"model.tokenizer_path={t / 'no-tok'}"],
            ["model.tokenizer_path", str(t / "no-tok")],
        ),
    ),
    "model.vae_path": (
        RECIPE,
        lambda t: (
            [f"model.vae_path={t / 'no-vae.pth'}"],
            ["model.vae_path", str(t / "no-vae.pth")],
        ),
    ),
    "model.options.internvl_path": (
        OPENUNI,
        lambda t: (
            [f"model.options.internvl_path={t / 'no-internvl'}"],
            ["model.options.internvl_path", str(t / "no-internvl")],
        ),
    ),
    "data without manifest.json": (
        RECIPE,
        lambda t: (
            [f"data.t2i=[{empty_dir(t)}]"],
            ["data.t2i", str(t / "empty" / "manifest.json")],
        ),
    ),
    "unreadable deepspeed JSON": (
        RECIPE,
        lambda t: (
            [f"deepspeed={deepspeed_json(t, '{not json')}"],
            ["deepspeed: ", str(t / "ds.json")],
        ),
    ),
    "contradictory deepspeed JSON": (
        RECIPE,
        lambda t: (
            [f"deepspeed={deepspeed_json(t, json.dumps({'gradient_clipping': 5.0}))}"],
            ["deepspeed: ", str(t / "ds.json"), "gradient_clipping is 5.0", "optim.grad_clip"],
        ),
    ),
    "unwritable run_dir": (
        RECIPE,
        lambda t: ([f"run_dir={file_under_a_file(t)}"], ["run_dir: ", str(t / "afile" / "run")]),
    ),
    "resume path": (RECIPE, lambda t: ([f"resume={t / 'no-run'}"], ["resume=", str(t / "no-run")])),
    "unknown key": (RECIPE, lambda t: (["optim.lrr=1"], ["command line: optim.lrr: unknown key"])),
}


@pytest.mark.parametrize("name", CASES)
def test_a_bad_input_is_one_line_naming_the_key_and_exit_2(workspace, tmp_path, name):
    recipe, case = CASES[name]
    extra, names = case(tmp_path)
    result = run_train(workspace, tmp_path, extra, recipe)
    assert result.returncode == EXIT_BAD_SETUP, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(FAILED) and result.stderr.count("\n") == 1, result.stderr
    for needle in names:
        assert needle in result.stderr, (needle, result.stderr)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


RANK_1 = {
    "torchrun": {"RANK": "1", "WORLD_SIZE": "2"},
    "srun": {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
}


@pytest.mark.parametrize("env", RANK_1.values(), ids=RANK_1.keys())
def test_only_rank_0_prints_but_every_rank_exits_2(workspace, tmp_path, env):
    result = run_train(workspace, tmp_path, [f"model.path={tmp_path / 'no-model'}"], env=env)
    assert result.returncode == EXIT_BAD_SETUP, result.stderr[-3000:]
    assert FAILED not in result.stderr and "Traceback" not in result.stderr, result.stderr
