"""The job scripts on two SLURM nodes: 4 ranks in two network namespaces, talking over gloo.

``scripts/slurm_local.sh`` runs each of its two nodes in its own network, UTS and mount namespace,
with its own address on a private bridge that only its namespaces are linked to (see its header).
The first test checks that the cluster is what it says: two nodes, three namespaces, no address of
the subnet on the machine itself, and a 2-node job whose tasks see two hostnames that resolve to
the namespaces' addresses. The second submits each family's job script on 2 nodes x 2 tasks: the
ranks meet at the job lib's own rendezvous (MASTER_ADDR is the first host of the node list,
resolved by name on each node), the warning signal makes the job checkpoint, requeue itself and
resume, and every logged loss term equals an uninterrupted 4-rank run on this machine bit for bit.

Skipped (with the reason) only where SLURM is not installed:
``bash scripts/slurm_local.sh install``.
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess

import pytest
import test_slurm
from slurm_helpers import ADDRESSES, CONTROLLER, NODES, SUBNET, log_lines
from test_slurm import EVERY, SIGNAL_AFTER, STEPS, assert_in_order, job_env, local_reference

# test_slurm's module-scoped fixtures, made anew for this module: the cluster handle, and the tiny
# shards and tokenizer.
slurm, workspace = test_slurm.slurm, test_slurm.workspace

NODELIST = f"{NODES[0][:-1]}[1-2]"  # infotok-n[1-2]
# The header's 2 nodes, with 2 tasks each instead of 8 (4 ranks), and less CPU and memory.
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--mem-per-cpu=500M"]

NODE_REPORT = """\
#!/bin/bash
# Each task: its host and network namespace, what the cluster's names resolve to, its addresses.
srun --label sh -c 'echo "host $(hostname) netns $(ip netns identify $$)"
    getent hosts {names} | sed "s/^/resolves /"
    ip -o -4 addr show | awk "{{print \\"address\\", \\$4}}"'
"""


def test_the_cluster_has_two_nodes_in_their_own_namespaces(slurm, workspace):
    states = dict(
        line.split() for line in slurm.run("sinfo", "-h", "-N", "-o", "%N %T").splitlines()
    )
    assert sorted(states) == list(NODES), states
    assert all(s in ("idle", "mixed", "allocated") for s in states.values()), states
    namespaces = {
        line.split()[0]
        for line in subprocess.run(
            ["ip", "netns", "list"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    }
    assert {CONTROLLER, *NODES} <= namespaces, namespaces
    # The machine's own namespace has no address of the cluster's subnet and no link into it.
    root_addresses = subprocess.run(
        ["ip", "-o", "addr"], capture_output=True, text=True, check=True
    ).stdout
    for address in re.findall(r"\binet (\S+)/", root_addresses):
        assert ipaddress.ip_address(address) not in SUBNET, root_addresses
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert not any(f"link-netns {ns}" in links for ns in (CONTROLLER, *NODES)), links

    root = workspace["root"] / "two-nodes"
    root.mkdir()
    script, log = root / "report.sh", root / "job.out"
    script.write_text(NODE_REPORT.format(names=" ".join(ADDRESSES)))
    job = slurm.submit(script, ["--nodes=2", "--ntasks-per-node=1", f"--output={log}"])
    info = slurm.wait_done(job, timeout=60, log=log)
    text = "\n".join(log_lines(log))
    assert info["JobState"] == "COMPLETED" and info["NumNodes"] == "2", f"{info}\n{text}"
    for rank, node in enumerate(NODES):
        lines = sorted(  # this task's lines (srun --label), blank runs as one
            re.sub(r"\s+", " ", line.split(": ", 1)[1])
            for line in log_lines(log)
            if line.startswith(f"{rank}: ")
        )
        resolved = sorted(f"resolves {address} {name}" for name, address in ADDRESSES.items())
        expected = sorted(
            [
                f"host {node} netns {node}",
                *resolved,
                "address 127.0.0.1/8",
                f"address {ADDRESSES[node]}/{SUBNET.prefixlen}",
            ]
        )
        assert lines == expected, text


@pytest.mark.parametrize("family", ["showo2", "harmon", "openuni"])
def test_four_ranks_on_two_nodes_signal_requeue_resume_exactly(slurm, workspace, family):
    from train_helpers import loss_table

    recipe = f"configs/tiny_{family}.yaml"
    root = workspace["root"] / f"two-nodes-{family}"
    run_dir, log = root / "run", root / "job.out"
    args = [f"steps={STEPS}", f"checkpoint.every={EVERY}", "data.num_workers=1"]
    job = slurm.submit(
        f"jobs/infotok_{family}.sh",
        [*TWO_NODES, f"--output={log}"],
        args,
        job_env(workspace, run_dir, recipe),
    )
    reference, reference_dir = local_reference(workspace, recipe, root, args, world=4)
    try:

        def stepped(i: dict[str, str]) -> bool:
            if i.get("JobState") not in ("RUNNING", "PENDING"):
                raise AssertionError(
                    f"job ended before the signal: {i}\n" + "\n".join(log_lines(log)[-40:])
                )
            metrics = run_dir / "metrics.jsonl"  # complete lines only: rank 0 may be mid-write
            return metrics.exists() and metrics.read_text().count("\n") >= SIGNAL_AFTER

        slurm.wait_for(job, stepped, f"{SIGNAL_AFTER} logged steps", timeout=400, log=log, poll=0.1)
        slurm.run("scancel", "--batch", "--signal=USR1", job)
        info = slurm.wait_done(job, timeout=400, log=log)
        codes = reference.wait(timeout=400)
    finally:
        reference.kill()
    text = "\n".join(log_lines(log))
    assert codes == [0, 0, 0, 0], reference.output()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text}"
    assert info["Restarts"] == "1", f"{info}\n{text}"
    assert info["NodeList"] == NODELIST and info["NumNodes"] == "2", info
    assert info["NumTasks"] == "4", info

    saved = [line for line in log_lines(log) if line.startswith("[train] stop signal: saved step ")]
    assert len(saved) == 1, text
    k = int(saved[0].split("saved step ")[1].split()[0])
    assert SIGNAL_AFTER <= k < STEPS, text
    attempt = f"on {NODELIST}: 2 node(s) x 2 task(s)"
    rendezvous = f"MASTER_ADDR={NODES[0]} MASTER_PORT="
    order = [
        f"attempt 1 (SLURM_RESTART_COUNT=0) {attempt}",
        rendezvous,
        "SIGUSR1: forwarding SIGUSR2 to the training step",
        f"saved step {k}",
        "trainer saved a checkpoint and stopped (exit 75)",
        f"requeueing job {job}",
        f"attempt 2 (SLURM_RESTART_COUNT=1) {attempt}",
        f"resumes from {run_dir / 'checkpoints'}/step_{k:08d}",
        rendezvous,
        "training finished (exit 0): not requeueing",
    ]
    assert_in_order(text, order)
    assert text.count("requeueing job") == 1 and "attempt 3" not in text, text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"

    # The ranks really ran on both nodes: each rank's heartbeat names its host.
    beats = [json.loads(p.read_text()) for p in (run_dir / "heartbeats").glob("rank_*.json")]
    hosts = {beat["rank"]: beat["host"] for beat in beats}
    assert hosts == {0: NODES[0], 1: NODES[0], 2: NODES[1], 3: NODES[1]}, beats

    # Every step exactly once, and every logged loss term bit-identical to the uninterrupted run.
    table, expected_table = loss_table(run_dir), loss_table(reference_dir)
    assert [row[0] for row in table] == list(range(1, STEPS + 1))
    assert table == expected_table
