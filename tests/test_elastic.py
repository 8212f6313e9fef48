"""Elastic resume: a run continues on another number of ranks as if nothing happened (real gloo
ranks, DeepSpeed ZeRO-2 and its universal checkpoints).

The tiny Show-o2 recipe's micro-batch is 2 I2T + 2 T2I; with ``data.global_batch=16`` a step is
4 ranks x 1 micro-step, 2 x 2 or 1 x 4. Validation's cross-rank InfoNCE negatives are off:
gathered negatives are the one term that depends on how many ranks share a micro-step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import (
    CHECKPOINT_DIR,
    UNIVERSAL_DIR,
    ConversionError,
    latest_tag,
    step_of,
    universal_copy,
)
from pipeline.train import EXIT_BAD_SETUP, EXIT_STOPPED, SAMPLES_FILE
from optim_state_dump import saved_state
from train_helpers import Run, assert_losses_close, make_workspace, steps_logged, wait_for

RECIPE = "configs/tiny_showo2.yaml"
STEPS = 8
TOLERANCE = 1e-5  # relative: the same sums in another order (ranks vs micro-steps)
DUMP = "tests.optim_state_dump"  # the optimizer state right after a resume, as a module


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("elastic"))


def overrides(workspace, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "steps": STEPS,
        "data.global_batch": 16,
        "checkpoint.every": 1,
        "checkpoint.keep_last": STEPS,
        "data.i2t": f"[{workspace['shards']}]",
        "data.t2i": f"[{workspace['shards']}]",
        "model.tokenizer_path": str(workspace["tokenizer"]),
        "data.num_workers": 1,
        "infotok.gather_negatives": "false",
        "log.samples": "true",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items() if v is not None]  # None: the recipe's


def train(workspace, run_dir: Path, world: int, stop_after: int | None = None, **extra) -> int:
    """Train on ``world`` ranks to the end, or stop by signal once ``stop_after`` steps are
    logged; returns the step of the newest checkpoint."""
    logs = run_dir.parent / f"{run_dir.name}-logs-{world}-{stop_after}"
    run = Run(RECIPE, overrides(workspace, run_dir, **extra), logs, world=world)
    if stop_after is None:
        assert run.wait() == [0] * world, run.output()
    else:
        wait_for(lambda: steps_logged(run_dir) >= stop_after, run, what=f"step {stop_after}")
        run.signal(signal.SIGUSR1)
        assert run.wait() == [EXIT_STOPPED] * world, run.output()
    return step_of(latest_tag(run_dir / CHECKPOINT_DIR))


def records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> Path:
    """The same run uninterrupted on 4 ranks."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(workspace, run_dir, world=4)
    return run_dir


def loaded_state(args: list[str], world: int, out: Path) -> dict:
    """Every trained parameter's weights, fp32 master weights and Adam moments, the Adam step
    and the LR schedule, right after ``world`` ranks resumed with the recipe ``args``."""
    run = Run(None, [str(out), *args], out.with_suffix(".logs"), world=world, module=DUMP)
    assert run.wait() == [0] * world, run.output()
    return torch.load(out, weights_only=False)


def assert_same_state(loaded: dict, saved: dict) -> None:
    assert loaded["start"] == saved["start"]
    assert loaded["params"].keys() == saved["params"].keys() and saved["params"]
    for name, tensors in saved["params"].items():
        for kind, value in tensors.items():
            assert torch.equal(loaded["params"][name][kind], value), f"{name} {kind}"
    assert loaded["adam_steps"] == saved["adam_steps"] == [float(saved["start"])]
    assert loaded["lr_scheduler"] == saved["lr_scheduler"]


def test_a_run_moves_from_4_to_2_to_4_ranks_as_if_uninterrupted(workspace, reference, tmp_path):
    run_dir = tmp_path / "run"
    first = train(workspace, run_dir, world=4, stop_after=2)
    second = train(workspace, run_dir, world=2, stop_after=first + 2)
    assert first < second < STEPS
    train(workspace, run_dir, world=4)
    log = (tmp_path / f"run-logs-2-{first + 2}" / "rank0.log").read_text()
    assert "resume: ranks 4 -> 2, gradient accumulation 1 -> 2; global batch kept" in log, log

    assert_losses_close(run_dir, reference, STEPS, TOLERANCE)
    # The same samples in the same global slots at every step, hence each sample once per epoch.
    got, expected = records(run_dir, SAMPLES_FILE), records(reference, SAMPLES_FILE)
    assert got == expected and [r["step"] for r in got] == list(range(1, STEPS + 1))
    shards = json.loads((workspace["shards"] / "manifest.json").read_text())
    for stream, total in shards["totals"]["tasks"].items():
        keys = [k for r in got for k in r["keys"][stream]]
        assert len(keys) >= total and len(set(keys[:total])) == total, stream

    # Right after each load on a new number of ranks, the state is the one that was saved.
    for step, world in [(first, 2), (second, 4)]:
        path = run_dir / CHECKPOINT_DIR / f"step_{step:08d}"
        out = tmp_path / f"loaded-{step}.pt"
        args = [RECIPE, *overrides(workspace, out.with_suffix(".run"), resume=path)]
        assert_same_state(loaded_state(args, world, out), saved_state(path))


@pytest.mark.parametrize("family,mode", [("harmon", "csa"), ("openuni", "csa"), ("showo2", "cs")])
def test_every_family_and_head_mode_resumes_its_exact_state_on_another_number_of_ranks(
    workspace, tmp_path, family, mode
):
    """Saved by 2 ranks after 2 steps (the recipe's own batch), loaded by 1."""
    recipe = f"configs/tiny_{family}.yaml"
    common = [
        f"data.i2t=[{workspace['shards']}]",
        f"data.t2i=[{workspace['shards']}]",
        f"model.tokenizer_path={workspace['tokenizer']}",
        "data.num_workers=0",
        f"infotok.mode={mode}",
        "steps=2",
        "checkpoint.every=2",
    ]
    run_dir = tmp_path / "run"
    run = Run(recipe, [f"run_dir={run_dir}", *common], tmp_path / "logs", world=2)
    assert run.wait() == [0, 0], run.output()
    path = run_dir / CHECKPOINT_DIR / "step_00000002"
    out = tmp_path / "loaded.pt"
    args = [recipe, f"run_dir={tmp_path / 'resumed'}", f"resume={path}", *common]
    loaded = loaded_state(args, 1, out)
    assert_same_state(loaded, saved_state(path))
    assert any(name.startswith("regularizer.") for name in loaded["params"])


def test_per_step_losses_agree_on_1_2_and_4_ranks(workspace, reference, tmp_path):
    for world in (1, 2):
        run_dir = tmp_path / f"world{world}"
        train(workspace, run_dir, world=world)
        assert_losses_close(run_dir, reference, STEPS, TOLERANCE)
        assert records(run_dir, SAMPLES_FILE) == records(reference, SAMPLES_FILE)


def test_a_global_batch_the_new_ranks_cannot_split_is_refused_in_one_line(
    workspace, reference, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    before = sorted(p.name for p in (run_dir / CHECKPOINT_DIR).iterdir())
    # The recipe's own accumulation (1): the run's global batch of 16 comes from the checkpoint.
    extra = {"steps": STEPS + 2, "data.global_batch": None}
    run = Run(RECIPE, overrides(workspace, run_dir, **extra), tmp_path / "logs", world=3)
    assert run.wait() == [EXIT_BAD_SETUP] * 3, run.output()
    line = (tmp_path / "logs" / "rank0.log").read_text().strip().splitlines()[-1]
    assert line.startswith("preflight: FAILED: resume: ") and "8 i2t + 8 t2i per step" in line
    assert "3 rank(s) with a micro-batch of 2 i2t, 2 t2i cannot split it" in line, line
    assert sorted(p.name for p in (run_dir / CHECKPOINT_DIR).iterdir()) == before


def test_another_data_set_is_refused_before_any_conversion(workspace, reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    other = tmp_path / "other"
    shutil.copytree(workspace["shards"], other)
    run = Run(
        RECIPE,
        overrides(workspace, run_dir, steps=STEPS + 2, **{"data.i2t": f"[{other}]"}),
        tmp_path / "logs",
        world=2,
    )
    assert run.wait() == [EXIT_BAD_SETUP] * 2, run.output()
    line = (tmp_path / "logs" / "rank0.log").read_text().strip().splitlines()[-1]
    assert "loader state does not match this data setup" in line and "datasets" in line, line
    assert not (run_dir / CHECKPOINT_DIR / UNIVERSAL_DIR).exists()


def _digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def test_a_failed_conversion_leaves_the_checkpoint_intact_and_nothing_half_made(
    reference, tmp_path
):
    root = tmp_path / CHECKPOINT_DIR
    tag = f"step_{STEPS:08d}"
    shutil.copytree(reference / CHECKPOINT_DIR / tag, root / tag)
    damaged = root / tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a partition cut short
    before = _digest(root / tag)
    into = root / UNIVERSAL_DIR
    with pytest.raises(ConversionError, match="universal format failed .*checkpoint is unchanged"):
        universal_copy(root, tag, into)
    assert _digest(root / tag) == before
    assert not (into / tag).exists() and not (into / f"{tag}.partial").exists()

    intact = tmp_path / "intact"
    shutil.copytree(reference / CHECKPOINT_DIR / tag, intact / tag)
    copy = universal_copy(intact, tag, into)
    assert (copy / "zero").is_dir()
    assert (copy / "converted_from").read_text() == str((intact / tag).resolve())
    assert universal_copy(intact, tag, into) == copy  # a finished conversion is reused
