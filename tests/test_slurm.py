"""The SLURM job scripts on a real SLURM (the local two-node cluster, fake gpu gres), one node each.

The end-to-end test submits ``jobs/infotok_showo2.sh`` with the tiny recipe on CPU (1 node x 2
tasks instead of the header's 2 x 8), sends the warning signal mid-run with
``scancel --batch --signal=USR1``, and checks the job checkpointed, requeued itself, resumed and
finished, with per-step losses identical bit for bit to an uninterrupted run of the same config.
Preflight failures and the requeue bounds are checked on the same cluster.

Skipped (with the reason) only where SLURM is not installed:
``bash scripts/slurm_local.sh install``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from data_prep import shard, synth
from slurm_helpers import ROOT, LocalSlurm, log_lines, slurm_installed

RECIPE = "configs/tiny_showo2.yaml"
STEPS, EVERY = 60, 10  # 60 steps (~0.2 s each here) leave time to signal mid-run
SIGNAL_AFTER = 3  # steps logged before the warning signal is sent
# The header asks for 2 nodes x 8 tasks with 8 CPUs and 8G per CPU; the test node is smaller.
SMALL = ["--nodes=1", "--cpus-per-task=1", "--mem-per-cpu=500M"]


@pytest.fixture(scope="module")
def slurm():
    if not slurm_installed():
        print(
            "SKIP test_slurm: slurmctld/sbatch not installed "
            "(run: bash scripts/slurm_local.sh install)"
        )
        pytest.skip("slurmctld is not installed (bash scripts/slurm_local.sh install)")
    cluster = LocalSlurm.acquire()
    yield cluster
    cluster.release()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny shards from ``data_prep synth`` + ``data_prep shard``, and the tiny tokenizer."""
    root = tmp_path_factory.mktemp("slurm")
    src, shards = root / "synth", root / "shards"
    source = synth(src, 48, seed=0, size=64)
    shard([f"jsonl:{source}"], shards, shard_size=16)
    tokenizer = root / "tokenizer"
    subprocess.run(
        [sys.executable, "-m", "pipeline.models.common.tiny_tokenizer", str(tokenizer)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return {"root": root, "shards": shards, "tokenizer": tokenizer}


def job_env(workspace, run_dir: Path, recipe: str = RECIPE, **extra: str) -> dict[str, str]:
    """The site settings a user would export before sbatch."""
    return {
        "INFOTOK_RECIPE": recipe,
        "INFOTOK_RUN_DIR": str(run_dir),
        "INFOTOK_I2T": str(workspace["shards"]),
        "INFOTOK_T2I": str(workspace["shards"]),
        "INFOTOK_TOKENIZER_PATH": str(workspace["tokenizer"]),
        **extra,
    }


def test_job_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (bash scripts/slurm_local.sh install)")
    scripts = sorted(
        str(p.relative_to(ROOT)) for p in [*ROOT.glob("jobs/*.sh"), *ROOT.glob("jobs/lib/*.sh")]
    )
    assert "jobs/infotok_showo2.sh" in scripts and "jobs/lib/infotok_job.sh" in scripts
    result = subprocess.run(
        ["shellcheck", "-x", *scripts, "scripts/slurm_local.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ------------------------------------------------------------------------------------ preflight

PREFLIGHT_CASES = {
    # case: (script, extra args, how to break the setup, expected fragment of the one line)
    "bad_recipe_key": (
        "jobs/infotok_showo2.sh",
        ["optim.lrr=1e-4"],
        None,
        "optim.lrr: unknown key",
    ),
    "missing_shards": ("jobs/infotok_showo2.sh", [], "missing_shard", "listed in"),
    "unwritable_run_dir": ("jobs/infotok_showo2.sh", [], "run_dir_under_file", "is not writable"),
    "recipe_of_another_family": ("jobs/infotok_harmon.sh", [], None, "but this job runs 'harmon'"),
    "does_not_fit": (
        "jobs/infotok_showo2.sh",
        ["data.micro_batch_t2i=512"],
        "small_gpu",
        "does not fit in 0.5 GiB per GPU",
    ),
}


@pytest.fixture(scope="module")
def preflight_jobs(slurm, workspace):
    """All preflight-failure jobs, submitted together (each is one task and ends in seconds)."""
    jobs = {}
    for case, (script, args, breakage, _) in PREFLIGHT_CASES.items():
        case_dir = workspace["root"] / f"preflight-{case}"
        case_dir.mkdir()
        env = job_env(workspace, case_dir / "run")
        if breakage == "missing_shard":
            broken = case_dir / "shards"
            shutil.copytree(workspace["shards"], broken)
            (broken / "shard-000001.tar").unlink()
            env.update(INFOTOK_I2T=str(broken), INFOTOK_T2I=str(broken))
        elif breakage == "small_gpu":  # the planner's memory check, with a stand-in GPU size
            env["INFOTOK_GPU_MEMORY_GIB"] = "0.5"
        elif breakage == "run_dir_under_file":
            (case_dir / "a_file").write_text("not a directory\n")  # root can write anywhere else
            env["INFOTOK_RUN_DIR"] = str(case_dir / "a_file" / "run")
        log = case_dir / "job.out"
        job = slurm.submit(script, [*SMALL, "--ntasks-per-node=1", f"--output={log}"], args, env)
        jobs[case] = (job, log)
    return {
        case: (job, log, slurm.wait_done(job, timeout=120, log=log))
        for case, (job, log) in jobs.items()
    }


@pytest.mark.parametrize("case", PREFLIGHT_CASES)
def test_a_preflight_failure_ends_the_job_with_one_line_and_no_requeue(preflight_jobs, case):
    job, log, info = preflight_jobs[case]
    lines = log_lines(log)
    failures = [line for line in lines if line.startswith("preflight: FAILED:")]
    text = "\n".join(lines)
    assert len(failures) == 1, text
    assert PREFLIGHT_CASES[case][3] in failures[0], text
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "78:0", info
    assert info["Restarts"] == "0", info
    assert "Traceback" not in text and "running: srun" not in text, text  # nothing was launched
    assert "not requeueing" in text, text


# ------------------------------------------------------------------- requeue bounds (stand-in)

FAKE_TRAINER = textwrap.dedent("""\
    # A stand-in with the trainer's exit-code contract, written by the test (not part of the
    # product).
    import os, sys
    mode, record = os.environ["FAKE_TRAINER_MODE"], os.environ["FAKE_TRAINER_RECORD"]
    with open(record, "a") as f:
        print(os.environ.get("SLURM_RESTART_COUNT", "0"), os.environ["SLURM_PROCID"], file=f)
    with open(record + ".argv", "w") as f:
        print("\\n".join(sys.argv[1:]), file=f)
    sys.exit({"finish": 0, "crash": 3, "stop": 75, "save_failed": 74}[mode])
""")


def fake_job(
    slurm, workspace, name: str, script: str = "jobs/infotok_showo2.sh", **env: str
) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """Run a job script with the stand-in trainer (and, by default, no preflight);
    returns (job info, log lines, attempts as "RESTART_COUNT PROCID", the trainer's argv)."""
    case_dir = workspace["root"] / name
    (case_dir / "fake").mkdir(parents=True)
    (case_dir / "fake" / "fake_trainer.py").write_text(FAKE_TRAINER)
    record, log = case_dir / "attempts.txt", case_dir / "job.out"
    env = {
        **job_env(workspace, case_dir / "run"),
        "INFOTOK_SKIP_PREFLIGHT": "1",
        "INFOTOK_TRAIN_MODULE": "fake_trainer",
        "PYTHONPATH": str(case_dir / "fake"),
        "FAKE_TRAINER_RECORD": str(record),
        **env,
    }
    job = slurm.submit(script, [*SMALL, "--ntasks-per-node=2", f"--output={log}"], [], env)
    info = slurm.wait_done(job, timeout=120, log=log)
    attempts = sorted(record.read_text().splitlines()) if record.exists() else []
    argv_file = Path(f"{record}.argv")
    argv = argv_file.read_text().splitlines() if argv_file.exists() else []
    return info, log_lines(log), attempts, argv


@pytest.mark.parametrize("family", ["harmon", "openuni"])
def test_the_harmon_and_openuni_scripts_preflight_and_launch_their_recipe(slurm, workspace, family):
    recipe = f"configs/tiny_{family}.yaml"
    info, lines, attempts, argv = fake_job(
        slurm,
        workspace,
        f"launch-{family}",
        f"jobs/infotok_{family}.sh",
        FAKE_TRAINER_MODE="finish",
        INFOTOK_SKIP_PREFLIGHT="0",
        INFOTOK_RECIPE=recipe,
        INFOTOK_OVERRIDES="steps=7 seed=3",
    )
    text = "\n".join(lines)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", f"{info}\n{text}"
    assert f"preflight: ok: {recipe}: {family}/tiny random init" in text, text
    assert attempts == ["0 0", "0 1"], attempts
    assert argv[:3] == ["--config", recipe, "resume=auto"], argv
    assert (
        argv[-2:] == ["steps=7", "seed=3"] and "checkpoint.stop_signals=[SIGUSR2, SIGTERM]" in argv
    ), argv
    assert f'data.i2t=["{workspace["shards"]}"]' in argv, argv


def test_a_crash_is_not_requeued(slurm, workspace):
    info, lines, attempts, _ = fake_job(slurm, workspace, "crash", FAKE_TRAINER_MODE="crash")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0" and info["Restarts"] == "0", (
        info
    )
    assert attempts == ["0 0", "0 1"], attempts  # one attempt, both ranks
    assert any("training FAILED (exit 3)" in line for line in lines), "\n".join(lines)


def test_a_failed_save_is_never_requeued_even_with_requeue_on_crash(slurm, workspace):
    info, lines, attempts, _ = fake_job(
        slurm,
        workspace,
        "save-failed",
        FAKE_TRAINER_MODE="save_failed",
        INFOTOK_REQUEUE_ON_CRASH="1",
    )
    text = "\n".join(lines)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "74:0", f"{info}\n{text}"
    assert info["Restarts"] == "0" and attempts == ["0 0", "0 1"], (info, attempts)
    assert "not requeueing into the same full disk" in text and "requeueing job" not in text, text


def test_self_requeue_is_bounded_by_max_restarts(slurm, workspace):
    info, lines, attempts, _ = fake_job(
        slurm, workspace, "bounded", FAKE_TRAINER_MODE="stop", INFOTOK_MAX_RESTARTS="1"
    )
    text = "\n".join(lines)
    assert attempts == ["0 0", "0 1", "1 0", "1 1"], (
        attempts
    )  # the first run and exactly one restart
    assert (
        info["Restarts"] == "1" and info["JobState"] == "FAILED" and info["ExitCode"] == "75:0"
    ), info
    assert "NOT requeueing" in text and "INFOTOK_MAX_RESTARTS=1" in text, text


# ---------------------------------------------------------------------------------- end to end


def local_reference(workspace, recipe: str, root: Path, args: list[str], world: int = 2):
    """The uninterrupted reference: the same config on ``world`` plain local ranks, started now (it
    runs while the job does); returns the run and its run dir."""
    from pipeline.launch import LocalRun

    reference_dir = root / "reference"
    overrides = [
        f"run_dir={reference_dir}",
        f"data.i2t=[{workspace['shards']}]",
        f"data.t2i=[{workspace['shards']}]",
        f"model.tokenizer_path={workspace['tokenizer']}",
        *args,
    ]
    return LocalRun(recipe, overrides, root / "reference-logs", world=world), reference_dir


def assert_in_order(text: str, expected: list[str]) -> None:
    position = 0
    for line in expected:
        found = text.find(line, position)
        assert found >= 0, f"{line!r} missing (or out of order) in the job log:\n{text}"
        position = found


@pytest.mark.parametrize("family", ["showo2", "harmon", "openuni"])
def test_warning_signal_checkpoints_requeues_and_resumes_exactly(slurm, workspace, family):
    from train_helpers import loss_table

    recipe = f"configs/tiny_{family}.yaml"
    root = workspace["root"] / f"e2e-{family}"
    run_dir, log = root / "run", root / "job.out"
    args = [f"steps={STEPS}", f"checkpoint.every={EVERY}", "data.num_workers=1"]
    job = slurm.submit(
        f"jobs/infotok_{family}.sh",
        [*SMALL, "--ntasks-per-node=2", f"--output={log}"],
        args,
        job_env(workspace, run_dir, recipe),
    )
    reference, reference_dir = local_reference(workspace, recipe, root, args)
    try:
        info = slurm.job(job)
        assert "gpu:8" in info.get("TresPerNode", ""), (
            info
        )  # the header's --gres=gpu:8 was accepted

        def stepped(i: dict[str, str]) -> bool:
            if i.get("JobState") != "RUNNING" and i.get("JobState") != "PENDING":
                raise AssertionError(
                    f"job ended before the signal: {i}\n" + "\n".join(log_lines(log)[-40:])
                )
            metrics = (
                run_dir / "metrics.jsonl"
            )  # count complete lines only: rank 0 may be mid-write
            return metrics.exists() and metrics.read_text().count("\n") >= SIGNAL_AFTER

        slurm.wait_for(job, stepped, f"{SIGNAL_AFTER} logged steps", timeout=240, log=log, poll=0.1)
        slurm.run("scancel", "--batch", "--signal=USR1", job)
        info = slurm.wait_done(job, timeout=240, log=log)
        codes = reference.wait(timeout=240)
    finally:
        reference.kill()
    text = "\n".join(log_lines(log))
    assert codes == [0, 0], reference.output()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info["Restarts"] == "1", f"{info}\n{text}"

    # The log tells the story: signal forwarded, checkpoint at step k < STEPS, exit 75, requeue,
    # second attempt (SLURM_RESTART_COUNT=1) resuming from step k, finished without a requeue.
    saved = [line for line in log_lines(log) if line.startswith("[train] stop signal: saved step ")]
    assert len(saved) == 1, text
    k = int(saved[0].split("saved step ")[1].split()[0])
    assert SIGNAL_AFTER <= k < STEPS, text
    order = [
        "attempt 1 (SLURM_RESTART_COUNT=0)",
        "SIGUSR1: forwarding SIGUSR2 to the training step",
        f"saved step {k}",
        "trainer saved a checkpoint and stopped (exit 75)",
        f"requeueing job {job}",
        "attempt 2 (SLURM_RESTART_COUNT=1)",
        f"resumes from {run_dir / 'checkpoints'}/step_{k:08d}",
        "training finished (exit 0): not requeueing",
    ]
    assert_in_order(text, order)
    assert text.count("requeueing job") == 1 and "attempt 3" not in text, text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"

    # Every step exactly once, and every logged loss term bit-identical to the uninterrupted run.
    table, expected_table = loss_table(run_dir), loss_table(reference_dir)
    assert [row[0] for row in table] == list(range(1, STEPS + 1))
    assert table == expected_table


def test_a_job_requeued_onto_fewer_tasks_resumes_on_them(slurm, workspace):
    """2 tasks, the warning signal, the job's own requeue; while it waits it is changed to 1 task
    (as a scheduler or a user may), and the next attempt resumes on 1 rank with twice the
    accumulation, without any user action: every step logged once, every loss term equal to an
    uninterrupted 2-rank run within 1e-5 (the same sums in another order)."""
    from train_helpers import assert_losses_close

    root = workspace["root"] / "elastic"
    run_dir, log = root / "run", root / "job.out"
    args = [
        f"steps={STEPS}",
        f"checkpoint.every={EVERY}",
        "data.num_workers=1",
        "infotok.gather_negatives=false",  # negatives gathered across ranks depend on the ranks
    ]
    job = slurm.submit(
        "jobs/infotok_showo2.sh",
        [*SMALL, "--ntasks-per-node=2", f"--output={log}"],
        args,
        job_env(workspace, run_dir),
    )
    reference, reference_dir = local_reference(workspace, RECIPE, root, args)
    try:

        def stepped(i: dict[str, str]) -> bool:
            metrics = run_dir / "metrics.jsonl"
            return metrics.exists() and metrics.read_text().count("\n") >= SIGNAL_AFTER

        slurm.wait_for(job, stepped, f"{SIGNAL_AFTER} logged steps", timeout=240, log=log, poll=0.1)
        slurm.run("scancel", "--batch", "--signal=USR1", job)
        slurm.wait_for(
            job,
            lambda i: i.get("JobState") == "PENDING" and i.get("Restarts") == "1",
            "the job's own requeue",
            timeout=240,
            log=log,
            poll=0.1,
        )
        slurm.run("scontrol", "hold", job)
        slurm.run(
            "scontrol",
            "update",
            f"JobId={job}",
            "NumTasks=1",
            "TasksPerNode=1",
            "NumCPUs=1",
            "MinCPUsNode=1",
        )
        slurm.run("scontrol", "release", job)
        info = slurm.wait_done(job, timeout=300, log=log)
        codes = reference.wait(timeout=240)
    finally:
        reference.kill()
    text = "\n".join(log_lines(log))
    assert codes == [0, 0], reference.output()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text}"
    order = [
        "attempt 1 (SLURM_RESTART_COUNT=0)",
        "1 node(s) x 2 task(s)",
        "trainer saved a checkpoint and stopped (exit 75)",
        "this attempt's allocation has 1 task(s) (1 per node), not SLURM_NTASKS=2: running 1",
        "attempt 2 (SLURM_RESTART_COUNT=1)",
        "1 node(s) x 1 task(s)",
        "[train] resume: ranks 2 -> 1, gradient accumulation 1 -> 2; global batch kept",
        "training finished (exit 0): not requeueing",
    ]
    assert_in_order(text, order)

    assert_losses_close(run_dir, reference_dir, STEPS, rel_tol=1e-5)
