"""Checkpoint integrity: a save that fills the disk fails cleanly on every rank (exit 74), and
a damaged newest checkpoint is detected by its manifest, ``resume=auto`` falling back to the
previous one (real DeepSpeed ZeRO-2 on 2 gloo ranks, the tiny Show-o2 recipe)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from train_helpers import ROOT, Run, loss_table, make_workspace

from pipeline import checkpoint
from pipeline.checkpoint import (
    CHECKPOINT_DIR,
    MANIFEST,
    damage,
    latest_tag,
    prune,
    resolve_resume,
    tag_for,
    write_manifest,
)
from pipeline.preflight import preflight
from pipeline.train import EXIT_BAD_SETUP, EXIT_SAVE_FAILED

RECIPE = "configs/tiny_showo2.yaml"
STEPS = 8
FAILED = "checkpoint: FAILED: "


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("integrity"))


def overrides(workspace, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "steps": STEPS,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 2,
        "data.i2t": f"[{workspace['shards']}]",
        "data.t2i": f"[{workspace['shards']}]",
        "model.tokenizer_path": str(workspace["tokenizer"]),
        "data.num_workers": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def train(workspace, run_dir: Path, env: dict[str, str] | None = None, **extra) -> Run:
    """2 ranks, to the end or to their failure."""
    logs = run_dir.parent / f"{run_dir.name}-logs-{len(list(run_dir.parent.glob('*-logs-*')))}"
    run = Run(RECIPE, overrides(workspace, run_dir, **extra), logs, extra_env=env)
    run.wait(timeout=600)
    return run


def codes(run: Run) -> list[int]:
    return [p.returncode for p in run.procs]


def lines(run: Run, text: str) -> list[str]:
    return [line for log in run.logs for line in log.read_text().splitlines() if text in line]


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory) -> Path:
    """An uninterrupted run: the losses every resumed run must reproduce bit for bit, and the
    checkpoints (steps 6 and 8) the tests damage copies of."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run = train(workspace, run_dir)
    assert codes(run) == [0, 0], run.output()
    assert [row[0] for row in loss_table(run_dir)] == list(range(1, STEPS + 1))
    return run_dir


def copy_run(reference: Path, into: Path) -> Path:
    shutil.copytree(reference, into, ignore=shutil.ignore_patterns("tensorboard"))
    return into / CHECKPOINT_DIR


def largest_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.iterdir() if p.is_file()), key=lambda p: p.stat().st_size)


def test_the_manifest_lists_sizes_and_small_files_hashes_and_names_the_first_damage(
    tmp_path, monkeypatch
):
    """Sizes always, sha256 up to HASH_LIMIT; a file the manifest does not list is ignored; a
    checkpoint without a manifest (written before manifests) is accepted unverified."""
    monkeypatch.setattr(checkpoint, "HASH_LIMIT", 100)
    step_dir = tmp_path / tag_for(4)
    (step_dir / "sub").mkdir(parents=True)
    small, big, nested = step_dir / "a.json", step_dir / "b.pt", step_dir / "sub" / "c.pt"
    small.write_text("0123456789")
    big.write_bytes(bytes(1000))
    nested.write_bytes(b"nested")
    assert damage(step_dir) is None  # no manifest yet: a legacy checkpoint
    write_manifest(step_dir)
    files = json.loads((step_dir / MANIFEST).read_text())["files"]
    assert sorted(files) == ["a.json", "b.pt", "sub/c.pt"]
    assert files["b.pt"] == {"size": 1000} and set(files["a.json"]) == {"size", "sha256"}
    assert damage(step_dir) is None

    (step_dir / "notes.txt").write_text("added later")
    assert damage(step_dir) is None
    big.write_bytes(bytes([1]) * 1000)  # same size, above the hash limit: not detected
    assert damage(step_dir) is None
    small.write_text("0123456780")
    assert damage(step_dir) == "a.json: its sha256 differs from the manifest's"
    small.write_text("012")
    assert damage(step_dir) == "a.json: 3 bytes, the manifest says 10"
    small.unlink()
    assert damage(step_dir) == "a.json: missing, the manifest lists 10 bytes"
    (step_dir / MANIFEST).write_text('{"format": 1, "fi')
    assert damage(step_dir).startswith(f"{MANIFEST}: unreadable")


def test_auto_falls_back_past_damaged_checkpoints_and_an_explicit_path_refuses_one(
    workspace, reference, tmp_path
):
    run_dir = tmp_path / "run"
    root = copy_run(reference, run_dir)
    newest, previous = root / tag_for(8), root / tag_for(6)
    assert damage(newest) is None and damage(previous) is None
    lost = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    size = (newest / lost).stat().st_size
    (newest / lost).unlink()
    note = (
        f"step_00000008 is damaged ({lost}: missing, the manifest lists {size} bytes); "
        "resuming from step_00000006"
    )
    notes: list[str] = []
    assert resolve_resume(run_dir, "auto", notes.append) == (root, tag_for(6))
    assert notes == [note]
    summary, _ = preflight(RECIPE, overrides(workspace, run_dir))  # the SLURM preflight's line
    assert f"resumes from {previous}; {note}" in summary
    for explicit in (newest, run_dir):  # the checkpoint, or the run whose latest it is
        with pytest.raises(ValueError, match=rf"step_00000008 is damaged: {lost}: missing"):
            resolve_resume(run_dir, str(explicit))

    largest = largest_file(previous)
    largest.write_bytes(largest.read_bytes()[:100])
    with pytest.raises(ValueError, match="no older checkpoint .* is intact"):
        resolve_resume(run_dir, "auto")

    # After the next save (of step 6, say), retention keeps what latest names and never
    # touches the damaged newer one (the save of step 8 replaces it); odd names pass.
    (root / checkpoint.LATEST).write_text(tag_for(6))
    (root / "step_00000009.partial").mkdir()
    (root / "step_later").mkdir()
    (root / "universal" / "odd").mkdir(parents=True)
    prune(root, keep_last=1)
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [
        "step_00000006",
        "step_00000008",
        "step_00000009.partial",
        "step_later",
    ]


def test_auto_resumes_from_the_previous_checkpoint_when_a_file_of_the_newest_is_truncated(
    workspace, reference, tmp_path
):
    """The run of 8 steps is done, then a file of its newest checkpoint is cut short: resuming
    says so in one line, redoes steps 7 and 8 from step 6 exactly, and saves step 8 anew."""
    run_dir = tmp_path / "run"
    root = copy_run(reference, run_dir)
    cut = largest_file(root / tag_for(8))
    size = cut.stat().st_size
    cut.write_bytes(cut.read_bytes()[: size // 2])
    run = train(workspace, run_dir)
    assert codes(run) == [0, 0], run.output()
    note = (
        f"[train] resume: step_00000008 is damaged ({cut.name}: {size // 2} bytes, the manifest "
        f"says {size}); resuming from step_00000006"
    )
    assert lines(run, "[train] resume:") == [note]
    assert loss_table(run_dir) == loss_table(reference)  # every step once, bit for bit
    assert latest_tag(root) == tag_for(8) and damage(root / tag_for(8)) is None
    assert cut.stat().st_size == size


def test_an_explicit_resume_of_a_damaged_checkpoint_exits_2_naming_the_file(
    workspace, reference, tmp_path
):
    root = copy_run(reference, tmp_path / "run")
    cut = largest_file(root / tag_for(8))
    size = cut.stat().st_size
    cut.write_bytes(b"")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.train",
            "--config",
            RECIPE,
            *overrides(workspace, tmp_path / "other", resume=root / tag_for(8)),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert done.returncode == EXIT_BAD_SETUP, done.stderr
    failed = [line for line in done.stderr.splitlines() if line.startswith("preflight: FAILED")]
    line = (
        f"preflight: FAILED: resume: resume={root / tag_for(8)}: {root / tag_for(8)} is damaged: "
        f"{cut.name}: 0 bytes, the manifest says {size}"
    )
    assert failed == [line]


def assert_failed_cleanly(run: Run, root: Path, failing: int, previous: int) -> str:
    """Exit 74 on every rank, one line, the partial checkpoint gone, latest and its manifest as
    they were; returns the line."""
    assert codes(run) == [EXIT_SAVE_FAILED] * 2, run.output()
    failed = lines(run, FAILED)
    assert len(failed) == 1 and failed[0].startswith(FAILED), run.output()
    assert f"saving {root / tag_for(failing)} failed: rank " in failed[0]
    assert re.search(
        rf"\[Errno 28\] No space left on device .*; a checkpoint needs about [\d.]+ MiB \(the "
        rf"size of {tag_for(previous)}\) and [\d.]+ (bytes|KiB|MiB|GiB) is free there \(.*\); "
        rf"removed the partial {tag_for(failing)}; latest still names {tag_for(previous)}$",
        failed[0],
    ), failed[0]
    assert not (root / tag_for(failing)).exists()
    assert latest_tag(root) == tag_for(previous) and damage(root / tag_for(previous)) is None
    assert not list(root.glob("*.tmp"))
    return failed[0]


def test_a_full_disk_on_one_rank_fails_the_save_on_every_rank(workspace, tmp_path):
    """Rank 1's writes of step 4 fail (injected ENOSPC) while rank 0's succeed: both ranks go
    through DeepSpeed's collectives, agree, and exit 74 promptly."""
    run_dir = tmp_path / "run"
    run = train(workspace, run_dir, env={"INFOTOK_FAULT": "enospc_in_save:4:1"})
    line = assert_failed_cleanly(run, run_dir / CHECKPOINT_DIR, failing=4, previous=2)
    assert "failed: rank 1: [Errno 28] No space left on device (zero_pp_rank_1" in line


def test_a_first_save_that_fails_estimates_the_space_a_checkpoint_needs(workspace, tmp_path):
    run_dir = tmp_path / "run"
    run = train(workspace, run_dir, env={"INFOTOK_FAULT": "enospc_in_save:2:0"})
    assert codes(run) == [EXIT_SAVE_FAILED] * 2, run.output()
    [line] = lines(run, FAILED)
    assert re.search(
        r"failed: rank 0: \[Errno 28\] No space left on device \(mp_rank_00_model_states.pt\); "
        r"a checkpoint needs about [\d.]+ MiB \(estimated from the model and its Adam state\) .*"
        r"removed the partial step_00000002; there is no latest: no checkpoint is complete yet$",
        line,
    ), line
    root = run_dir / CHECKPOINT_DIR
    assert not (root / tag_for(2)).exists() and latest_tag(root) is None


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], check=False, capture_output=True, text=True)


def test_a_save_that_fills_the_disk_fails_cleanly_and_the_previous_checkpoint_resumes_exactly(
    workspace, reference, tmp_path
):
    """RUN_DIR/checkpoints on a tmpfs that holds one checkpoint and a half (sized from the
    reference's): the save of step 2 fits, the one of step 4 fills the disk. Once the tmpfs is
    made bigger, resume=auto continues from step 2 as if nothing had happened."""
    run_dir = tmp_path / "run"
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True)
    one = sum(p.stat().st_size for p in (reference / CHECKPOINT_DIR / tag_for(8)).iterdir())
    scripts = sum(p.stat().st_size for p in (reference / CHECKPOINT_DIR).glob("*.py"))
    mounted = _mount("-t", "tmpfs", "-o", f"size={one * 3 // 2 + scripts}", "tmpfs", str(root))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        run = train(workspace, run_dir)
        assert_failed_cleanly(run, root, failing=4, previous=2)
        assert _mount("-o", f"remount,size={4 * one + 4 * scripts}", str(root)).returncode == 0
        run = train(workspace, run_dir)
        assert codes(run) == [0, 0], run.output()
        assert loss_table(run_dir) == loss_table(reference)
    finally:
        subprocess.run(["umount", str(root)], check=True)
