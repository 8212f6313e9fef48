"""Shared by the benches: time a callable and take its peak memory, each case in its own process;
the ``--smoke`` flag every bench takes."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_and_peak(
    step: Callable[[], Any], reps: int, device: torch.device
) -> tuple[float, int, Any]:
    """(median seconds of ``reps`` calls after one warm-up, peak memory above the start, last result).

    On CPU the peak is the process's max RSS (so it covers the warm-up too) above the RSS before it;
    on CUDA it is the allocator's peak above what was allocated after the warm-up.
    """

    def timed() -> Any:
        out = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    base = _rss_bytes()
    timed()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = timed()
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return statistics.median(times), max(peak - base, 0), out


def in_fresh_process(target: Callable[..., Any], *args: Any) -> Any:
    """Run ``target(*args)`` in a spawned process (so its peak memory is its own); return its result."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(queue, target, args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"{target.__name__}{args[:1]} died (exit {proc.exitcode}); see its traceback above"
                )
    proc.join()
    return result


def _call(queue, target: Callable[..., Any], args: tuple) -> None:
    queue.put(target(*args))


def parse_args(parser: argparse.ArgumentParser, smoke: dict[str, Any]) -> argparse.Namespace:
    """``parser``'s arguments plus ``--smoke``, which makes ``smoke`` the defaults (flags win).

    The smoke sizes are the smallest that run the same code and print the same lines, in seconds:
    the test suite runs every bench that way (``tests/test_bench.py``) so none can rot unnoticed.
    """
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run at tiny sizes: checks that the bench works",
    )
    args = parser.parse_args()
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args()
    return args
