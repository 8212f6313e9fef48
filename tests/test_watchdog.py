"""The step watchdog (pipeline/watchdog.py): its diagnosis from heartbeats, its limits, and local
multi-rank runs where one rank is killed or frozen mid-step. The same faults on two SLURM nodes
are in test_slurm_faults.py."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from train_helpers import Run, make_workspace, steps_logged, wait_for

from pipeline import watchdog as wd

RECIPE = "configs/tiny_showo2.yaml"


def beat(rank: int, age: float, phase: str = "step 7", ended: str = "") -> wd.Heartbeat:
    return wd.Heartbeat(rank, f"node{rank // 2}", 1000 + rank, phase, time.time() - age, ended)


def write_beats(directory: Path, beats: list[wd.Heartbeat]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for b in beats:
        (directory / f"rank_{b.rank:05d}.json").write_text(json.dumps(b.__dict__))


def test_the_diagnosis_names_stopped_and_ended_ranks(tmp_path):
    write_beats(
        tmp_path,
        [beat(0, 1), beat(1, 40, "step 6"), beat(2, 2, ended="RuntimeError: bad"), beat(3, 1)],
    )
    (tmp_path / "rank_00009.json").write_text("{half a fil")  # being replaced: ignored
    lines, stopped = wd.describe(wd.read_heartbeats(tmp_path), rank=0, stale_after=15)
    assert stopped
    assert lines == [
        "rank 1 on node0 (pid 1001) is not responding: no heartbeat for 40 s, last during step 6",
        "rank 2 on node1 (pid 1002) ended during step 7: RuntimeError: bad",
    ]


def test_ranks_their_watchdog_ended_are_named_only_when_nothing_else_explains_it(tmp_path):
    ended = f"{wd.ENDED_BY_WATCHDOG}: step 7 has run 61 s (limit 60 s)"
    write_beats(tmp_path, [beat(0, 1), beat(1, 1, ended=ended), beat(2, 70)])
    lines, stopped = wd.describe(wd.read_heartbeats(tmp_path), rank=0, stale_after=15)
    assert stopped and len(lines) == 1 and lines[0].startswith("rank 2 on node1 (pid 1002) is not")
    write_beats(tmp_path, [beat(2, 1)])  # rank 2 is alive after all
    lines, stopped = wd.describe(wd.read_heartbeats(tmp_path), rank=0, stale_after=15)
    assert stopped and lines == [f"rank 1 on node0 (pid 1001) ended during step 7: {ended}"]


def test_with_every_heartbeat_fresh_it_says_where_each_rank_is(tmp_path):
    write_beats(tmp_path, [beat(0, 1), beat(1, 2, "saving step 6"), beat(2, 1), beat(3, 0)])
    lines, stopped = wd.describe(wd.read_heartbeats(tmp_path), rank=3, stale_after=15)
    assert not stopped
    where = "rank(s) 0,2,3 in step 7; rank(s) 1 in saving step 6"
    assert lines == [
        f"every rank's heartbeat is fresh ({where}): a collective or a device is stuck"
    ]


def test_step_limits_follow_the_slowest_step(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(wd.time, "monotonic", lambda: clock[0])
    cfg = wd.WatchdogConfig(step_timeout_s=60, step_timeout_factor=10, startup_timeout_s=3600)
    dog = wd.Watchdog(cfg, None, rank=0)
    clock[0] += 1000  # start-up took 1000 s: the first step gets what is left of the hour
    dog.step(1)
    assert dog._limit == 2600
    clock[0] += 500  # the first step (compilation) does not count towards the slowest
    dog.step(2)
    assert dog._limit == 60
    clock[0] += 9  # a 9 s step: 10 x 9 s > 60 s
    dog.step(3)
    assert dog._limit == 90
    clock[0] += 2
    dog.begin("saving step 3", cfg.phase_timeout_s)
    clock[0] += 1000  # a save is not a step
    dog.step(4)
    assert dog._limit == 90 and dog._phase == "step 4"


def overrides(ws: dict[str, Path], run_dir: Path, *extra: str, steps: int = 400) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.i2t=[{ws['shards']}]",
        f"data.t2i=[{ws['shards']}]",
        f"model.tokenizer_path={ws['tokenizer']}",
        f"steps={steps}",
        "checkpoint.every=1000",
        "watchdog.heartbeat_s=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("watchdog"))


def start_and_hit(workspace, tmp_path, signum: int, *extra: str) -> tuple[Run, dict, float]:
    """3 local ranks; once 3 steps are logged, ``signum`` goes to rank 2 (found by its
    heartbeat); returns the run, rank 2's heartbeat and when the signal went."""
    run_dir = tmp_path / "run"
    run = Run(RECIPE, overrides(workspace, run_dir, *extra), tmp_path / "logs", world=3)
    wait_for(lambda: steps_logged(run_dir) >= 3, run, what="3 logged steps")
    victim = json.loads((run_dir / wd.HEARTBEAT_DIR / "rank_00002.json").read_text())
    assert victim["pid"] == run.procs[2].pid and victim["rank"] == 2
    os.kill(victim["pid"], signum)
    return run, victim, time.monotonic()


def test_a_killed_rank_ends_the_others_naming_it(workspace, tmp_path):
    run, victim, hit = start_and_hit(workspace, tmp_path, signal.SIGKILL)
    try:
        codes = [p.wait(timeout=120) for p in run.procs]
    finally:
        run.kill()
    took = time.monotonic() - hit
    assert codes == [wd.EXIT_PEER_FAILED, wd.EXIT_PEER_FAILED, -signal.SIGKILL], run.output()
    named = f"rank 2 on {victim['host']} (pid {victim['pid']}) is not responding"
    for log in run.logs[:2]:
        assert named in log.read_text(), run.output()
    fault = (tmp_path / "run" / wd.HEARTBEAT_DIR / wd.FAULT_FILE).read_text()
    assert named in fault and "failed: " in fault, fault
    print(f"a killed rank ended the others after {took:.1f} s")


def test_a_frozen_rank_ends_the_others_and_dumps_its_stacks_when_resumed(workspace, tmp_path):
    run, victim, hit = start_and_hit(
        workspace, tmp_path, signal.SIGSTOP, "watchdog.step_timeout_s=10"
    )
    try:
        codes = [p.wait(timeout=120) for p in run.procs[:2]]
        took = time.monotonic() - hit
        assert run.procs[2].poll() is None  # stopped: it can do nothing until continued
        os.kill(victim["pid"], signal.SIGCONT)
        codes.append(run.procs[2].wait(timeout=60))
    finally:
        if run.procs[2].poll() is None:
            os.kill(victim["pid"], signal.SIGCONT)
        run.kill()
    assert codes == [wd.EXIT_PEER_FAILED] * 3, run.output()
    named = f"rank 2 on {victim['host']} (pid {victim['pid']}) is not responding"
    for rank, log in enumerate(run.logs):
        text = log.read_text()
        assert f"[watchdog] rank {rank} on " in text, run.output()
        # the limit: 10 s, or 10 x the slowest step when the machine is slow
        assert re.search(r"step \d+ has run \d+ s \(limit \d+ s\)", text), text
        assert "Python stacks of every thread (exiting 69):" in text, text
        assert 'File "' in text.split("Python stacks of every thread")[1], text
        if rank < 2:
            assert named in text, text
    assert "did not run for" in run.logs[2].read_text()  # it knows it was stopped
    print(f"a frozen rank ended the others after {took:.1f} s")


def test_no_heartbeats_when_the_watchdog_is_off(workspace, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(workspace, run_dir, "watchdog.enabled=false", steps=2)
    run = Run(RECIPE, args, tmp_path / "logs", world=1)
    assert run.wait(timeout=300) == [0], run.output()
    assert steps_logged(run_dir) == 2 and not (run_dir / wd.HEARTBEAT_DIR).exists()
