"""A rank that dies or freezes on one of two SLURM nodes ends the whole job promptly.

Each test submits ``jobs/infotok_showo2.sh`` on the local two-node cluster (2 nodes x 2 tasks,
4 ranks over gloo, as in test_slurm_multinode.py), finds rank 3 on the second node by its
heartbeat (``RUN_DIR/heartbeats/rank_00003.json``: host and pid) and hits it mid-run:

- ``kill -9``: the others' next collective fails; each waits for rank 3's heartbeat to stop,
  names it, dumps its stacks and exits 69; the job ends FAILED and is not requeued;
- ``SIGSTOP``: the others wait in a collective until the watchdog's step limit (the default,
  60 s), name rank 3 and exit; the job script sees the watchdog's FAULT report, continues the
  stopped task, which dumps its own stacks; every rank's stacks are in the log;
- ``kill -9`` with ``INFOTOK_REQUEUE_ON_CRASH=1``: the job requeues itself, resumes from the last
  complete checkpoint and finishes; every step is logged once and equals an uninterrupted run.

Each fault must end the job within 2 minutes. Skipped (with the reason) only where SLURM is not
installed: ``bash scripts/slurm_local.sh install``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import test_slurm
from slurm_helpers import NODES, log_lines
from test_slurm import EVERY, STEPS, assert_in_order, job_env, local_reference
from test_slurm_multinode import TWO_NODES

from pipeline.watchdog import EXIT_PEER_FAILED, FAULT_FILE, HEARTBEAT_DIR

slurm, workspace = test_slurm.slurm, test_slurm.workspace

LIMIT_S = 120  # a dead or frozen rank must end the job within this
VICTIM = 3  # the last rank: the second task on the second node


def submit(slurm, workspace, name: str, args: list[str], **env: str) -> tuple[str, Path, Path]:
    root = workspace["root"] / name
    root.mkdir()
    run_dir, log = root / "run", root / "job.out"
    job = slurm.submit(
        "jobs/infotok_showo2.sh",
        [*TWO_NODES, f"--output={log}"],
        args,
        {**job_env(workspace, run_dir), **env},
    )
    return job, run_dir, log


def hit_rank_after(
    slurm, job: str, run_dir: Path, log: Path, steps: int, signum: int
) -> tuple[dict, float]:
    """Once ``steps`` steps are logged, send ``signum`` to rank 3; returns its heartbeat and the
    time of the signal."""

    def stepped(info: dict[str, str]) -> bool:
        if info.get("JobState") not in ("RUNNING", "PENDING"):
            raise AssertionError(f"job ended early: {info}\n" + "\n".join(log_lines(log)[-40:]))
        metrics = run_dir / "metrics.jsonl"
        return metrics.exists() and metrics.read_text().count("\n") >= steps

    slurm.wait_for(job, stepped, f"{steps} logged steps", timeout=400, log=log, poll=0.2)
    victim = json.loads((run_dir / HEARTBEAT_DIR / f"rank_{VICTIM:05d}.json").read_text())
    assert victim["host"] == NODES[1], victim
    os.kill(victim["pid"], signum)
    return victim, time.monotonic()


def test_a_killed_rank_ends_the_job_within_two_minutes_naming_it(slurm, workspace):
    job, run_dir, log = submit(slurm, workspace, "killed", ["steps=1000", "checkpoint.every=1000"])
    victim, hit = hit_rank_after(slurm, job, run_dir, log, 3, signal.SIGKILL)
    info = slurm.wait_done(job, timeout=LIMIT_S + 60, log=log)
    took = time.monotonic() - hit
    text = "\n".join(log_lines(log))
    assert took < LIMIT_S, f"the job ended {took:.0f} s after the kill\n{text}"
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{text}"
    named = f"rank {VICTIM} on {NODES[1]} (pid {victim['pid']}) is not responding"
    survivors = [f"[watchdog] rank {r} on {NODES[r // 2]}: " for r in range(VICTIM)]
    for prefix in survivors:
        assert f"{prefix}{named}" in text, text
    assert_in_order(
        text,
        [
            "the watchdog reports a failed rank:",
            named,
            "training FAILED (exit",
            "not requeueing a crash (INFOTOK_REQUEUE_ON_CRASH=1 would",
        ],
    )
    print(f"killed rank: the job ended {took:.0f} s after the kill")


def test_a_frozen_rank_ends_the_job_within_two_minutes_with_every_stack(slurm, workspace):
    job, run_dir, log = submit(slurm, workspace, "frozen", ["steps=1000", "checkpoint.every=1000"])
    victim, hit = hit_rank_after(slurm, job, run_dir, log, 3, signal.SIGSTOP)
    try:
        info = slurm.wait_done(job, timeout=LIMIT_S + 60, log=log)
    finally:
        if _alive(victim["pid"]):
            os.kill(victim["pid"], signal.SIGCONT)
    took = time.monotonic() - hit
    text = "\n".join(log_lines(log))
    assert took < LIMIT_S, f"the job ended {took:.0f} s after SIGSTOP\n{text}"
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", f"{info}\n{text}"
    assert info["ExitCode"] == f"{EXIT_PEER_FAILED}:0", info
    named = f"rank {VICTIM} on {NODES[1]} (pid {victim['pid']}) is not responding"
    fault = (run_dir / HEARTBEAT_DIR / FAULT_FILE).read_text()
    assert named in fault and re.search(r"step \d+ has run \d+ s \(limit \d+ s\)", fault), fault
    for rank in range(4):
        prefix = f"[watchdog] rank {rank} on {NODES[rank // 2]}: "
        assert text.count(f"{prefix}Python stacks of every thread") == 1, f"{rank}\n{text}"
        if rank != VICTIM:  # each names rank 3: stopped, or (once continued) ended by its watchdog
            assert f"{prefix}rank {VICTIM} on {NODES[1]} (pid {victim['pid']}) " in text, text
    assert f"[watchdog] rank {VICTIM} on {NODES[1]}: this process did not run for" in text, text
    assert_in_order(
        text,
        [
            "the watchdog reports a failed rank:",
            named,
            "resuming any stopped task (SIGCONT)",
            f"training FAILED (exit {EXIT_PEER_FAILED})",
            "not requeueing a crash",
        ],
    )
    print(f"frozen rank: the job ended {took:.0f} s after SIGSTOP")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_killed_rank_with_requeue_on_crash_resumes_and_finishes_exactly(slurm, workspace):
    from train_helpers import loss_table

    args = [f"steps={STEPS}", f"checkpoint.every={EVERY}", "data.num_workers=1"]
    job, run_dir, log = submit(
        slurm, workspace, "requeue-on-crash", args, INFOTOK_REQUEUE_ON_CRASH="1"
    )
    reference, reference_dir = local_reference(
        workspace, test_slurm.RECIPE, run_dir.parent, args, world=4
    )
    try:
        hit_rank_after(slurm, job, run_dir, log, EVERY + 2, signal.SIGKILL)
        info = slurm.wait_done(job, timeout=600, log=log)
        codes = reference.wait(timeout=400)
    finally:
        reference.kill()
    text = "\n".join(log_lines(log))
    assert codes == [0, 0, 0, 0], reference.output()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text}"
    resumed = [line for line in log_lines(log) if "resumes from" in line]
    assert len(resumed) == 1, text
    assert_in_order(
        text,
        [
            "attempt 1 (SLURM_RESTART_COUNT=0)",
            f"rank {VICTIM} on {NODES[1]}",
            "training FAILED (exit",
            f"requeueing job {job} (crash, INFOTOK_REQUEUE_ON_CRASH=1",
            "attempt 2 (SLURM_RESTART_COUNT=1)",
            f"resumes from {run_dir / 'checkpoints'}/step_",
            "training finished (exit 0): not requeueing",
        ],
    )
    table = loss_table(run_dir)
    assert [row[0] for row in table] == list(range(1, STEPS + 1))
    assert table == loss_table(reference_dir)
