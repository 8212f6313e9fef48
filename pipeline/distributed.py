"""Process-group set-up under torchrun, the deepspeed launcher, srun, or a single plain process.

torchrun and the deepspeed launcher export ``RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT``. Under ``srun`` (one task per GPU) they are derived from ``SLURM_PROCID``,
``SLURM_LOCALID``, ``SLURM_NTASKS``, the first host of ``SLURM_JOB_NODELIST`` and the job id. A
plain ``python -m pipeline.train`` becomes rank 0 of 1 on a free local port. DeepSpeed needs all
five variables even for one process (otherwise it tries MPI), so they are always set.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

PORT_BASE, PORT_SPAN = 20000, 12000  # below the ephemeral range (32768+), as jobs/ does


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def first_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``gpu[003-004,007],cpu01`` -> ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(environ: dict[str, str] | None = None) -> DistEnv:
    """The rank layout of this process from the launcher's environment."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        port = env.get("MASTER_PORT") or PORT_BASE + int(env.get("SLURM_JOB_ID", "0")) % PORT_SPAN
        addr = env.get("MASTER_ADDR") or first_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            addr,
            int(port),
        )
    return DistEnv(0, 0, 1, "127.0.0.1", free_port())


def init_distributed(layout: DistEnv | None = None, timeout_minutes: float = 30.0) -> DistEnv:
    """Export the five variables of ``layout`` (default: :func:`resolve_env`), pick the device,
    and initialise DeepSpeed's process group."""
    import deepspeed
    from datetime import timedelta

    layout = resolve_env() if layout is None else layout
    os.environ.update(
        RANK=str(layout.rank),
        LOCAL_RANK=str(layout.local_rank),
        WORLD_SIZE=str(layout.world_size),
        MASTER_ADDR=layout.master_addr,
        MASTER_PORT=str(layout.master_port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(layout.local_rank)
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(minutes=timeout_minutes))
    return layout


def device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def to_device(obj: Any, dev: torch.device) -> Any:
    """Tensors of a (nested dict/list) batch moved to ``dev`` without waiting for the copy."""
    if isinstance(obj, torch.Tensor):
        return obj.to(dev, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, dev) for v in obj]
    return obj
