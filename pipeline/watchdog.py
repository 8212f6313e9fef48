"""A step watchdog: a dead or frozen rank ends the job within minutes, not at the process
group's 30-minute timeout, and the log says which rank on which host it was.

When one rank dies, the others sit in their next collective; when one freezes, the others wait
for it there too (NCCL does not notice either, gloo only the death). So every rank runs a
thread that

- writes a heartbeat (rank, host, pid, phase, time) to ``RUN_DIR/heartbeats/rank_NNNNN.json``
  every ``heartbeat_s`` seconds: a dead or stopped process stops writing it;
- ends the process when the current phase (start-up, a step, a save, an evaluation) overruns its
  limit: it names the ranks whose heartbeat stopped (or, when all are alive, where each one is),
  writes the same lines to ``RUN_DIR/heartbeats/FAULT`` (the job script reacts to it: it resumes
  stopped tasks so that they dump their stacks too, then ends the step), dumps every thread's
  Python stack with :mod:`faulthandler`, and exits :data:`EXIT_PEER_FAILED`.

``faulthandler.dump_traceback_later`` backs the thread up: it needs no GIL, so a rank stuck in C
code holding it still dumps its stacks and exits. A collective that fails outright (gloo sees a
dead peer's socket close) goes through :meth:`Watchdog.exit_if_a_peer_failed` instead, which
waits for the dead rank's heartbeat to stop and names it the same way.
"""

from __future__ import annotations

import faulthandler
import json
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pipeline.config import param

HEARTBEAT_DIR = "heartbeats"
FAULT_FILE = "FAULT"  # the first rank to diagnose a failure writes it; the job script polls it
EXIT_PEER_FAILED = 69  # EX_UNAVAILABLE: a rank died or stopped responding
STALE_BEATS = 3  # a heartbeat older than this many intervals has stopped
ENDED_BY_WATCHDOG = "its watchdog ended it"
BACKSTOP_S = 60.0  # faulthandler's own limit comes this long after the thread's


@dataclass
class WatchdogConfig:
    enabled: bool = param(True, help="end every rank when one dies or freezes (heartbeats)")
    step_timeout_s: float = param(
        60.0,
        gt=0,
        help="a step is stuck after this many seconds or step_timeout_factor x the slowest step "
        "so far, whichever is longer",
    )
    step_timeout_factor: float = param(10.0, ge=1, help="see step_timeout_s")
    startup_timeout_s: float = param(
        3600.0,
        gt=0,
        help="limit from the start (model build, checkpoint conversion and load) to the end of "
        "the first step",
    )
    phase_timeout_s: float = param(1800.0, gt=0, help="limit of one save or one evaluation")
    heartbeat_s: float = param(5.0, gt=0, help="seconds between a rank's heartbeats")


@dataclass
class Heartbeat:
    rank: int
    host: str
    pid: int
    phase: str
    time: float  # wall clock: ranks on other hosts compare it
    ended: str = ""  # why the process ended, written by its last heartbeat

    def age(self, now: float) -> float:
        return now - self.time


def read_heartbeats(directory: Path) -> dict[int, Heartbeat]:
    beats = {}
    for path in directory.glob("rank_*.json"):
        try:
            beat = Heartbeat(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # being replaced right now, or not ours
        beats[beat.rank] = beat
    return beats


def describe(beats: dict[int, Heartbeat], rank: int, stale_after: float) -> tuple[list[str], bool]:
    """What the heartbeats say about the other ranks: the ones that stopped (then True) — those
    that stopped responding or ended on their own error first, those their watchdog ended (a
    consequence) only when there are no others — else where each group of ranks is."""
    now = time.time()
    causes, consequences = [], []
    for r, b in sorted(beats.items()):
        who = f"rank {b.rank} on {b.host} (pid {b.pid})"
        if r == rank or not (b.ended or b.age(now) > stale_after):
            continue
        if not b.ended:
            causes.append(
                f"{who} is not responding: no heartbeat for {b.age(now):.0f} s, last during "
                f"{b.phase}"
            )
        elif b.ended.startswith(ENDED_BY_WATCHDOG):
            consequences.append(f"{who} ended during {b.phase}: {b.ended}")
        else:
            causes.append(f"{who} ended during {b.phase}: {b.ended}")
    if causes or consequences:
        return causes or consequences, True
    phases: dict[str, list[int]] = {}
    for r, b in sorted(beats.items()):
        phases.setdefault(b.phase, []).append(r)
    where = "; ".join(f"rank(s) {_ranks(rs)} in {phase}" for phase, rs in phases.items())
    return [f"every rank's heartbeat is fresh ({where}): a collective or a device is stuck"], False


def _ranks(ranks: list[int]) -> str:
    return ",".join(map(str, ranks))


class Watchdog:
    """One per rank: :meth:`begin` each phase with its limit; :meth:`close` at the end."""

    def __init__(self, cfg: WatchdogConfig, run_dir: Path | None, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        self.host = socket.gethostname()
        self.directory = run_dir / HEARTBEAT_DIR if run_dir is not None else None
        self.active = cfg.enabled and self.directory is not None
        self._phase, self._limit = "start-up", cfg.startup_timeout_s
        self._started = self._began = time.monotonic()
        self._timed_step = False
        self._slowest_step = 0.0
        self._steps = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, cfg: WatchdogConfig, run_dir: Path, rank: int, barrier: Any) -> Watchdog:
        """Rank 0 clears the heartbeats of an earlier attempt (possibly with more ranks),
        ``barrier()`` waits for it, then every rank's thread starts beating."""
        watchdog = cls(cfg, run_dir, rank)
        if not watchdog.active:
            return watchdog
        if rank == 0:
            shutil.rmtree(watchdog.directory, ignore_errors=True)
            watchdog.directory.mkdir(parents=True)
        barrier()
        watchdog._beat()
        watchdog._arm_backstop()
        watchdog._thread = threading.Thread(target=watchdog._watch, name="watchdog", daemon=True)
        watchdog._thread.start()
        return watchdog

    def begin(self, phase: str, limit: float, timed_step: bool = False) -> None:
        """``phase`` starts now and may last ``limit`` seconds; a ``timed_step`` counts towards
        the slowest step when it ends."""
        with self._lock:
            self._end_phase()
            self._phase, self._limit, self._began = phase, limit, time.monotonic()
            self._timed_step = timed_step
        if self.active:
            self._arm_backstop()

    def step(self, number: int) -> None:
        """Step ``number`` begins: the first of this process belongs to start-up (compilation,
        warm-up); each later one may take ``step_timeout_s`` or ``step_timeout_factor`` x the
        slowest so far."""
        cfg = self.cfg
        with self._lock:
            self._end_phase()
        if self._steps == 0:
            left = cfg.startup_timeout_s - (time.monotonic() - self._started)
            self.begin(f"step {number}", max(left, cfg.step_timeout_s))
        else:
            limit = max(cfg.step_timeout_s, cfg.step_timeout_factor * self._slowest_step)
            self.begin(f"step {number}", limit, timed_step=True)
        self._steps += 1

    def _end_phase(self) -> None:
        """The current phase ends now (lock held): a timed step's duration is recorded."""
        if self._timed_step:
            self._slowest_step = max(self._slowest_step, time.monotonic() - self._began)
            self._timed_step = False

    def close(self, ended: str = "finished") -> None:
        """Stop watching; the last heartbeat says why this process ends (for the others)."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            faulthandler.cancel_dump_traceback_later()
            self._beat(ended)

    def exit_if_a_peer_failed(self, error: BaseException) -> None:
        """After a collective failed on this rank: wait until a dead rank's heartbeat is stale;
        if one is (or this rank overran its own limit, e.g. it was frozen), report, dump the
        stacks and exit :data:`EXIT_PEER_FAILED`; otherwise return (the error is this rank's)."""
        if not self.active:
            return
        stale_after = STALE_BEATS * self.cfg.heartbeat_s
        deadline = time.monotonic() + stale_after + self.cfg.heartbeat_s
        while True:
            lines, stopped = self._diagnosis()
            if stopped or self._overran() or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if stopped or self._overran():
            failed = f"{self._phase} failed: {(str(error).splitlines() or [''])[0][:200]}"
            self._fail([failed, *lines], failed)

    def _overran(self) -> bool:
        with self._lock:
            return time.monotonic() - self._began > self._limit

    def _diagnosis(self) -> tuple[list[str], bool]:
        """This rank's phase when it overran, and the others (:func:`describe`)."""
        with self._lock:
            phase, limit, elapsed = self._phase, self._limit, time.monotonic() - self._began
        own = [f"{phase} has run {elapsed:.0f} s (limit {limit:.0f} s)"] if elapsed > limit else []
        others, stopped = describe(
            read_heartbeats(self.directory), self.rank, STALE_BEATS * self.cfg.heartbeat_s
        )
        return own + others, stopped

    def _watch(self) -> None:
        interval = min(1.0, self.cfg.heartbeat_s)
        last_beat = last_wake = time.monotonic()
        while not self._closed.wait(interval):
            now = time.monotonic()
            asleep, last_wake = now - last_wake, now
            if self._overran():  # before a heartbeat: a rank just continued must not look alive
                lines, _ = self._diagnosis()
                reason = lines[0]
                if asleep > STALE_BEATS * self.cfg.heartbeat_s:
                    reason = f"this process did not run for {asleep:.0f} s (stopped or starved)"
                    lines.append(reason)
                self._fail(lines, reason)
            if now - last_beat >= self.cfg.heartbeat_s:
                self._beat()
                last_beat = now

    def _beat(self, ended: str = "") -> None:
        beat = Heartbeat(self.rank, self.host, os.getpid(), self._phase, time.time(), ended)
        path = self.directory / f"rank_{self.rank:05d}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(beat.__dict__))
            os.replace(tmp, path)
        except OSError:
            pass  # a full or unreachable disk must not end training by itself

    def _report(self, lines: list[str]) -> None:
        prefix = f"[watchdog] rank {self.rank} on {self.host}: "
        text = "".join(prefix + line + "\n" for line in lines)
        print(text, end="", file=sys.stderr, flush=True)
        try:  # the first report wins: the job script shows it and ends the step
            fd = os.open(self.directory / FAULT_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _fail(self, lines: list[str], reason: str) -> NoReturn:
        """Report ``lines``, tell the others ``reason`` in a last heartbeat, dump every thread's
        Python stack and exit."""
        self._report(lines)
        self._beat(ended=f"{ENDED_BY_WATCHDOG}: {reason}")
        print(
            f"[watchdog] rank {self.rank} on {self.host}: Python stacks of every thread "
            f"(exiting {EXIT_PEER_FAILED}):",
            file=sys.stderr,
            flush=True,
        )
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_PEER_FAILED)

    def _arm_backstop(self) -> None:
        """faulthandler's C thread, in case this one cannot take the GIL: it dumps the stacks
        and exits (code 1) a little after the thread would have."""
        with self._lock:
            remaining = self._limit - (time.monotonic() - self._began)
        faulthandler.dump_traceback_later(
            max(1.0, remaining) + self.cfg.heartbeat_s + BACKSTOP_S, exit=True
        )
