"""jobs/encode_latents.sh on the local two-node SLURM: the latent cache of a tiny recipe's datasets.

Each job runs 2 ranks, one task on each of the two nodes (the header's 1 node x 8 GPUs, scaled
down), on copies of the tiny shards, while the test encodes another copy with one plain local rank
(``python -m data_prep encode``). Checked:

- a job ends COMPLETED; every sidecar, receipt and manifest of each of its datasets (i2t and t2i
  in two directories) is byte-identical to the 1-rank encode; the log shows the encode summary
  line and ``data_prep verify``'s OK for the latents;
- a job whose ranks each stop after their first shard gets the warning signal (``scancel --batch
  --signal=USR1``, as SLURM sends it ahead of the time limit): it ends the encode step, requeues
  itself, and the next attempt keeps the finished shards, encodes the rest on the same ranks and
  nodes, and writes the same bytes;
- a bad recipe key ends the job with one ``preflight: FAILED:`` line before any task starts.

Skipped (with the reason) only where SLURM is not installed:
``bash scripts/slurm_local.sh install``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import test_slurm
from slurm_helpers import NODES, ROOT, log_lines
from test_slurm import assert_in_order

# test_slurm's module-scoped fixtures, made anew for this module: the cluster handle, and the tiny
# shards (48 samples in 3 shards) and tokenizer.
slurm, workspace = test_slurm.slurm, test_slurm.workspace

RECIPE, FAMILY = "configs/tiny_showo2.yaml", "showo2"
SCRIPT = "jobs/encode_latents.sh"
# 2 nodes x 1 task, one (fake) GPU each, instead of the header's 1 node x 8, with less CPU and
# memory.
TWO_RANKS = [
    "--nodes=2",
    "--ntasks-per-node=1",
    "--gres=gpu:1",
    "--cpus-per-task=1",
    "--mem-per-cpu=500M",
]
BATCH = ["--batch-size", "8"]  # an encode option passed through (both encodes use the same)
# Seconds a job may take: seconds here, but the first multi-rank CPU job on a machine also builds
# DeepSpeed's shm communication op (a minute or two; kept in TORCH_EXTENSIONS_DIR).
JOB_TIMEOUT = 300
SUMMARY = "48 samples encoded, 0 skipped; 3 sidecars ({kept} kept from an earlier run)"

PAUSING_ENCODER = textwrap.dedent("""\
    # pipeline.encode with a record of each rank's shards; on the job's first attempt each rank
    # stops after its first shard until the step ends. Written by tests/test_slurm_encode.py (not
    # part of the product).
    import os, socket, sys, time
    from pipeline import encode
    from pipeline.distributed import resolve_env

    attempt, layout = os.environ.get("SLURM_RESTART_COUNT", "0"), resolve_env()
    encode_shard = encode.Encoder.shard

    def shard(self, dataset, entry, out, bar):
        encoded = encode_shard(self, dataset, entry, out, bar)
        with open(os.environ["ENCODE_RECORD"], "a") as f:
            print(attempt, layout.rank, layout.world_size, socket.gethostname(), entry["name"],
                  "encoded" if encoded else "kept", file=f, flush=True)
        if attempt == "0":
            time.sleep(3600)  # ended by the warning signal
        return encoded

    encode.Encoder.shard = shard
    sys.exit(encode.main())
""")


def cache_files(dataset: Path) -> dict[str, bytes]:
    """Every file of the dataset's latent cache, by name."""
    return {p.name: p.read_bytes() for p in sorted((dataset / "latents" / FAMILY).iterdir())}


@pytest.fixture(scope="module")
def encodes(slurm, workspace):
    """All the jobs, submitted together, then the 1-rank local reference encode while they run;
    returns {"jobs": {name: (job id, log, its dataset dirs)}, "reference": the reference's
    cache files}."""
    root = workspace["root"] / "encode"
    root.mkdir()

    def dataset(name: str) -> Path:
        return Path(shutil.copytree(workspace["shards"], root / name))

    tokenizer = str(workspace["tokenizer"])
    jobs = {}

    def submit(name: str, datasets: list[Path], args: list[str], sbatch: list[str], **env: str):
        log = root / f"{name}.out"
        env = {
            "INFOTOK_I2T": str(datasets[0]),
            "INFOTOK_T2I": str(datasets[-1]),
            "OMP_NUM_THREADS": "1",  # what the job lib sets for --cpus-per-task=1; see below
            **env,
        }
        job = slurm.submit(SCRIPT, [*sbatch, f"--output={log}"], args, env)
        jobs[name] = (job, log, datasets)

    # The tokenizer as an override argument here, from the environment in the other jobs.
    submit(
        "plain",
        [dataset("i2t"), dataset("t2i")],
        [RECIPE, *BATCH, f"model.tokenizer_path={tokenizer}"],
        TWO_RANKS,
    )
    fake = root / "fake"
    fake.mkdir()
    (fake / "pausing_encode.py").write_text(PAUSING_ENCODER)
    submit(
        "requeued",
        [dataset("requeued")],
        [RECIPE, *BATCH],
        TWO_RANKS,
        INFOTOK_ENCODE_MODULE="pausing_encode",
        PYTHONPATH=str(fake),
        ENCODE_RECORD=str(root / "requeued-shards.txt"),
        INFOTOK_TOKENIZER_PATH=tokenizer,
    )
    one_task = ["--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1", "--cpus-per-task=1"]
    submit(
        "bad_key",
        [workspace["shards"]],
        [RECIPE, "optim.lrr=1e-4"],
        one_task,
        INFOTOK_TOKENIZER_PATH=tokenizer,
    )

    # The bytes depend on the batch size and, on CPU, torch's thread count (the VAE's convolutions
    # sum in another order), not on the ranks: the reference runs with the jobs' batch size and
    # one thread per task.
    reference = dataset("reference")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "OMP_NUM_THREADS": "1",
    }
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # one plain rank
    command = [sys.executable, "-m", "data_prep", "encode", "--config", RECIPE]
    command += ["--dataset", str(reference), *BATCH, f"model.tokenizer_path={tokenizer}"]
    result = subprocess.run(
        command, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"{reference}/latents/{FAMILY}: {SUMMARY.format(kept=0)}" in output, output
    return {"jobs": jobs, "reference": cache_files(reference)}


def test_a_two_node_encode_writes_the_bytes_of_one_rank_and_verifies(slurm, encodes):
    job, log, datasets = encodes["jobs"]["plain"]
    info = slurm.wait_done(job, timeout=JOB_TIMEOUT, log=log)
    text = "\n".join(log_lines(log))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info["Restarts"] == "0" and info["NumNodes"] == "2" and info["NumTasks"] == "2", info
    summaries = [f"encode: {d}/latents/{FAMILY}: {SUMMARY.format(kept=0)}" for d in datasets]
    verified = f"verify: OK: latents/{FAMILY}: 3 sidecars, 48 samples encoded, 0 skipped"
    assert_in_order(
        text,
        [
            "attempt 1 (SLURM_RESTART_COUNT=0)",
            "2 node(s) x 1 task(s)",
            f"preflight: ok: {RECIPE}: 2 dataset(s): {datasets[0]} {datasets[1]}",
            "running: srun",
            *summaries,
            "encode finished (exit 0)",
            f"verifying {datasets[0]}",
            verified,
            f"verifying {datasets[1]}",
            verified,
            "encoded and verified 2 dataset(s)",
        ],
    )
    for dataset in datasets:
        files = cache_files(dataset)
        assert sorted(files) == sorted(encodes["reference"]), sorted(files)
        for name, data in files.items():
            assert data == encodes["reference"][name], f"{dataset}: {name} differs"


def test_the_warning_signal_requeues_and_the_next_attempt_encodes_only_the_rest(slurm, encodes):
    job, log, (dataset,) = encodes["jobs"]["requeued"]
    record = log.with_name("requeued-shards.txt")

    def paused(info: dict[str, str]) -> bool:
        if info.get("JobState") not in ("RUNNING", "PENDING"):
            raise AssertionError(f"job ended early: {info}\n" + "\n".join(log_lines(log)[-40:]))
        return record.exists() and record.read_text().count("\n") >= 2

    slurm.wait_for(job, paused, "both ranks' first shard", timeout=JOB_TIMEOUT, log=log)
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    info = slurm.wait_done(job, timeout=JOB_TIMEOUT, log=log)
    text = "\n".join(log_lines(log))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info["Restarts"] == "1", f"{info}\n{text}"
    assert_in_order(
        text,
        [
            "attempt 1 (SLURM_RESTART_COUNT=0)",
            "SIGUSR1: ending the encode step",
            f"requeueing job {job} (warning signal during the encode; restart 1 of at most 20)",
            "attempt 2 (SLURM_RESTART_COUNT=1)",
            f"encode: {dataset}/latents/{FAMILY}: {SUMMARY.format(kept=2)}",
            f"verify: OK: latents/{FAMILY}: 3 sidecars",
            "encoded and verified 1 dataset(s)",
        ],
    )
    assert "attempt 3" not in text, text
    # Rank r of 2 (rank 0 on the first node) takes shards r, r + 2: attempt 1 encoded one shard
    # on each rank before the signal, attempt 2 kept them and encoded the third.
    assert sorted(record.read_text().splitlines()) == [
        f"0 0 2 {NODES[0]} shard-000000.tar encoded",
        f"0 1 2 {NODES[1]} shard-000001.tar encoded",
        f"1 0 2 {NODES[0]} shard-000000.tar kept",
        f"1 0 2 {NODES[0]} shard-000002.tar encoded",
        f"1 1 2 {NODES[1]} shard-000001.tar kept",
    ], text
    assert cache_files(dataset) == encodes["reference"]


def test_a_bad_recipe_key_fails_before_any_task_with_one_line(slurm, encodes):
    job, log, _ = encodes["jobs"]["bad_key"]
    info = slurm.wait_done(job, timeout=JOB_TIMEOUT, log=log)
    lines = log_lines(log)
    text = "\n".join(lines)
    failures = [line for line in lines if line.startswith("preflight: FAILED:")]
    assert len(failures) == 1 and "optim.lrr: unknown key" in failures[0], text
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "78:0", f"{info}\n{text}"
    assert info["Restarts"] == "0", info
    assert "running: srun" not in text and "Traceback" not in text, text
