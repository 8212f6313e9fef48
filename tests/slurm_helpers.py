"""A real two-node SLURM for the job-script tests: start/share/stop it, submit, watch jobs.

The cluster is ``scripts/slurm_local.sh``: munged, slurmctld and two slurmd nodes with fake gpu
gres, each node in its own network namespace (``infotok-n1``, ``infotok-n2``; the controller in
``infotok-ctl``). Its controller is reachable only from inside those namespaces, so the clients run
here are the script's wrappers in ``STATE_DIR/bin`` (first on :meth:`LocalSlurm.env`'s PATH), which
enter the controller's namespace.

A test session that finds it running (CI starts it in ``.ci/run``) uses it and leaves it alone; a
session that had to start it stops it when the last concurrent test session using it is done (a
shared ``flock`` counts the users), so no daemon or namespace outlives the tests that started it.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = ROOT / "scripts" / "slurm_local.sh"
STATE_DIR = Path(os.environ.get("INFOTOK_SLURM_DIR", "/tmp/infotok-slurm"))
NETNS = os.environ.get("INFOTOK_SLURM_NETNS", "infotok")  # the script's namespace/node prefix
CONTROLLER, NODES = f"{NETNS}-ctl", (f"{NETNS}-n1", f"{NETNS}-n2")
SUBNET = ipaddress.ip_network(os.environ.get("INFOTOK_SLURM_SUBNET", "10.77.31.0/24"))
ADDRESSES = {CONTROLLER: str(SUBNET[1]), NODES[0]: str(SUBNET[11]), NODES[1]: str(SUBNET[12])}
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def slurm_installed() -> bool:
    return shutil.which("slurmctld") is not None and shutil.which("sbatch") is not None


class LocalSlurm:
    """A handle on the local test cluster; :meth:`acquire` starts it if needed."""

    def __init__(self) -> None:
        self.conf = STATE_DIR / "etc" / "slurm.conf"
        self._lock_file = None
        self._marker = STATE_DIR / "run" / "started_by_tests"

    @classmethod
    def acquire(cls) -> LocalSlurm:
        cluster = cls()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        cluster._lock_file = open(STATE_DIR.parent / f"{STATE_DIR.name}.users.lock", "a")
        fcntl.flock(cluster._lock_file, fcntl.LOCK_SH)  # one shared lock per test session using it
        if cluster._script("status", check=False).returncode != 0:
            cluster._script("start")
            cluster._marker.write_text(str(os.getpid()))
        return cluster

    def release(self) -> None:
        """Stop the cluster if a test session started it and no other session is still using it."""
        if self._lock_file is None:
            return
        fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another test session still uses it; the last one out stops it
        else:
            if self._marker.exists():
                self._script("stop")
                self._marker.unlink(missing_ok=True)
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()
        self._lock_file = None

    def _script(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            ["bash", str(SLURM_LOCAL), command], capture_output=True, text=True, timeout=300
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"slurm_local.sh {command} failed:\n{result.stdout}{result.stderr}\n"
                f"{self.daemon_logs()}"
            )
        return result

    def daemon_logs(self) -> str:
        logs = sorted((STATE_DIR / "log").glob("*.log"))
        return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs)

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for SLURM clients and the jobs (sbatch exports it): no SLURM_* of an
        enclosing job leaks in, SLURM_CONF points at this cluster, and its client wrappers come
        first on PATH (here they enter the controller's namespace; on the nodes they run the
        real client)."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
        }
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{STATE_DIR / 'bin'}:{env.get('PATH', os.defpath)}"
        env.update(extra or {})
        return env

    def run(self, *args: str, check: bool = True) -> str:
        result = subprocess.run(
            list(args), capture_output=True, text=True, env=self.env(), timeout=60
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result.stdout

    def submit(
        self,
        script: str | Path,
        sbatch_args: list[str],
        args: list[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> str:
        """``sbatch [sbatch_args] script [args]`` from the checkout; returns the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *sbatch_args, str(script), *args],
            capture_output=True,
            text=True,
            env=self.env(env),
            cwd=ROOT,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, TresPerNode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", text))

    def wait_for(
        self,
        job_id: str,
        until: Callable[[dict[str, str]], bool],
        what: str,
        timeout: float,
        log: Path | None = None,
        poll: float = 0.2,
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if until(info):
                return info
            if time.monotonic() > deadline:
                self.run("scancel", job_id, check=False)
                tail = log.read_text()[-6000:] if log is not None and log.exists() else "(no log)"
                raise AssertionError(
                    f"job {job_id}: timed out after {timeout:.0f} s waiting for {what}; "
                    f"state {info.get('JobState')}\n--- job log\n{tail}"
                )
            time.sleep(poll)

    def wait_done(self, job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
        return self.wait_for(
            job_id, lambda i: i.get("JobState") in FINAL_STATES, "the job to end", timeout, log
        )


def log_lines(path: Path) -> list[str]:
    """The job log without the trainer's library warnings (kept short for assertion messages)."""
    return path.read_text().splitlines() if path.exists() else []
