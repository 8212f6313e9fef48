"""Checks a training job can start, before it takes any GPU time.

    python -m pipeline.preflight --config configs/showo2_1.5b.yaml [--family showo2] [key=value ...]

Exactly what ``python -m pipeline.train`` with the same arguments would read: the recipe and
overrides validate (and the family's preset/options, and the DeepSpeed JSON against the recipe);
every dataset of an enabled stream has its manifest and every shard it lists; the model
checkpoint, tokenizer and VAE paths hold what the adapter loads; the checkpoint to resume from
matches its manifest (``resume=auto`` falls back to an older one when the newest is damaged; an
explicit path must be intact); the run dir can be created and written. Loads no weights and
touches no GPU. Then the memory planner (``python -m pipeline.plan``) checks that one micro-step
of the recipe fits the GPU memory of this host (or ``--gpu-memory-gib`` /
``INFOTOK_GPU_MEMORY_GIB``) with 10% to spare.

Prints one line and exits 0 (``preflight: ok: ...``) or 78 (``preflight: FAILED: <reason>``), the
line a SLURM job log shows when a job ends without training. ``--env-out FILE`` also writes
``run_dir=<absolute path>`` for the job script. ``python -m pipeline.train`` runs the same checks
(:func:`run_checks`) before it builds anything and prints the same line, with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the checks import torch-heavy modules lazily, after the arguments parse
    from pipeline.models.base import ModelConfig, Requirement
    from pipeline.recipe import TrainConfig

EXIT_FAILED = 78  # EX_CONFIG: fix the configuration and resubmit; never requeued


class PreflightError(Exception):
    """A job would fail; the message is the one line shown to the user."""


def _world_size() -> int:
    """Ranks the job will run (SLURM's task count inside a job, else torchrun's, else 1)."""
    for name in ("SLURM_NTASKS", "WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def check_data(cfg: TrainConfig) -> str:
    """Every dataset of an enabled stream, and every held-out one when validation is on:
    manifest present, every listed shard present."""
    from pipeline.data import STREAMS

    parts = []
    for stream in STREAMS:
        if cfg.data.micro_batch(stream) > 0:
            parts.append(_check_datasets(f"data.{stream}", getattr(cfg.data, stream), stream))
        if cfg.eval.every and getattr(cfg.eval, stream):
            held_out = _check_datasets(f"eval.{stream}", getattr(cfg.eval, stream), stream)
            parts.append(f"held-out {held_out}")
    return ", ".join(parts)


def _check_datasets(key: str, specs: list[str], stream: str) -> str:
    from pipeline.data import parse_dataset_spec, read_manifest

    shards = samples = 0
    for spec in specs:
        try:
            path, _ = parse_dataset_spec(spec)
        except ValueError as e:
            raise PreflightError(f"{key}: {e}") from None
        if not path.is_dir():
            raise PreflightError(f"{key}: dataset directory {path} does not exist")
        try:
            spans = read_manifest(path, stream)
        except (OSError, ValueError, KeyError) as e:
            raise PreflightError(f"{key}: {e}") from None
        total = sum(s.count for s in spans)
        shards += len(spans)
        samples += total
    return f"{stream} {samples} samples in {shards} shards"


def _satisfied(requirement: Requirement, path: Path) -> bool:
    from pipeline.models.common.tokenizer import holds_tokenizer
    from pipeline.models.common.weights import find_weight_files

    if requirement.kind == "tokenizer":
        return path.is_dir() and holds_tokenizer(path)
    if requirement.kind == "weights" and path.is_dir():
        try:
            return bool(find_weight_files(path))
        except (OSError, ValueError):
            return False
    return {
        "weights": path.is_file(),
        "file": path.is_file(),
        "directory": path.is_dir(),
        "any": path.exists(),
    }[requirement.kind]


def check_requirement(requirement: Requirement) -> None:
    """The key's path (or, unset or lacking it, a fallback) holds what the family reads."""
    candidates = [requirement.path] if requirement.path is not None else []
    if any(_satisfied(requirement, c) for c in [*candidates, *requirement.fallbacks]):
        return
    if requirement.path is None:
        fallbacks = ", ".join(map(str, requirement.fallbacks))
        where = f" in {fallbacks}" if fallbacks else ""
        noun = {"any": "file", "directory": "directory"}.get(requirement.kind, requirement.kind)
        raise PreflightError(
            f"{requirement.key}: not set, and no {noun} found{where} (expected {requirement.what})"
        )
    path = requirement.path
    if requirement.kind == "tokenizer":
        from pipeline.models.common.tokenizer import TOKENIZER_FILES

        problem = f"no {' or '.join(TOKENIZER_FILES)} in {path}"
    elif requirement.kind == "weights" and path.is_dir():
        from pipeline.models.common.weights import find_weight_files

        try:
            find_weight_files(path)
        except (OSError, ValueError) as e:
            problem = str(e)
    elif not path.exists():
        problem = f"{path} does not exist"
    else:
        wanted = "file" if requirement.kind in ("weights", "file") else "directory"
        problem = f"{path} is not a {wanted}"
    raise PreflightError(f"{requirement.key}: {problem} (expected {requirement.what})")


def check_model(model: ModelConfig) -> str:
    """Every path the recipe sets exists, and the family's required files are there (nothing is
    loaded)."""
    from pipeline.config import ConfigError
    from pipeline.models import family_spec

    set_paths = {
        f"model.{key}": getattr(model, key) for key in ("path", "tokenizer_path", "vae_path")
    }
    set_paths.update(
        {
            f"model.options.{key}": value
            for key, value in model.options.items()
            if key.endswith("_path")
        }
    )
    for key, value in set_paths.items():
        if value is not None and not Path(value).exists():
            raise PreflightError(f"{key}: {value} does not exist")
    try:
        requirements = family_spec(model.family).required_files(model)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    except (OSError, ValueError, KeyError) as e:  # missing parts, unreadable or malformed JSON
        raise PreflightError(f"model: {e}") from None
    for requirement in requirements:
        check_requirement(requirement)
    sources = [
        str(v) for k, v in set_paths.items() if v is not None and k != "model.tokenizer_path"
    ]
    if not sources:
        return f"{model.family}/{model.preset} random init"
    return f"{model.family} from {', '.join(sources)}"


def check_resume(cfg: TrainConfig, world: int) -> str:
    """An explicit resume path must be an intact checkpoint; ``auto`` reports what it will pick
    (an older checkpoint when the newest is damaged, saying so), and how the checkpoint's global
    batch is split over ``world`` ranks when that changes."""
    from pipeline.checkpoint import read_trainer_state, resolve_resume
    from pipeline.config import ConfigError
    from pipeline.elastic import split_batch

    notes: list[str] = []
    try:
        found = resolve_resume(Path(cfg.run_dir), cfg.resume, notes.append)
        if found is None:
            return "starts fresh" if cfg.resume == "none" else "no checkpoint yet, starts fresh"
        root, tag = found
        split = split_batch(cfg, world, read_trainer_state(root, tag), str(root / tag))
    except (OSError, ValueError) as e:
        message = str(e) if isinstance(e, ConfigError) else f"resume: {e}"
        raise PreflightError(message) from None
    changes = "".join(f"; {note}" for note in [*notes, split.changes] if note)
    return f"resumes from {root / tag}{changes}"


def check_run_dir(run_dir: Path) -> str:
    """The run dir exists (created if needed) and a file can be written and removed in it."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".preflight-{uuid.uuid4().hex}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(f"run_dir: {run_dir} is not writable ({e.strerror or e})") from None
    return str(run_dir.resolve())


def run_checks(cfg: TrainConfig, world: int) -> str:
    """Every check of a loaded recipe for a job of ``world`` ranks; returns the summary or raises
    PreflightError. The trainer runs it on every rank before it builds anything."""
    from pipeline.config import ConfigError
    from pipeline.recipe import deepspeed_config

    try:
        deepspeed_config(cfg, world)
        data = check_data(cfg)
        model = check_model(cfg.model)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    run_dir = check_run_dir(Path(cfg.run_dir))
    resume = check_resume(cfg, world)
    return f"{model}; {data}; {world} rank(s); run_dir {run_dir} ({resume})"


def gpu_memory_gib(given: float | None) -> float | None:
    """Memory per GPU to plan for: ``given``, else ``INFOTOK_GPU_MEMORY_GIB``, else this host's
    first GPU; None on a host without one (the fit is then not checked)."""
    if given is None and os.environ.get("INFOTOK_GPU_MEMORY_GIB"):
        try:
            given = float(os.environ["INFOTOK_GPU_MEMORY_GIB"])
        except ValueError:
            raise PreflightError(
                f"INFOTOK_GPU_MEMORY_GIB={os.environ['INFOTOK_GPU_MEMORY_GIB']!r} is not a number"
            ) from None
    if given is not None:
        return given
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def check_fit(cfg: TrainConfig, world: int, memory_gib: float | None) -> str:
    """The planner's peak per GPU for ``world`` ranks leaves 10% of ``memory_gib`` free."""
    if memory_gib is None:
        return "fit not checked (no GPU here; set INFOTOK_GPU_MEMORY_GIB to check it)"
    from pipeline import plan

    result = plan.plan_recipe(cfg, world, plan.Device("this GPU", memory_gib, 0.0))
    if not result.fits:
        raise PreflightError(f"does not fit in {memory_gib:.1f} GiB per GPU: {result.advice()}")
    return f"plan: peak {result.peak / plan.GIB:.1f} of {memory_gib:.1f} GiB per GPU"


def failure_line(reason: str) -> str:
    """The one line a failed check prints, whether in the SLURM preflight or in the trainer."""
    return f"preflight: FAILED: {' '.join(reason.split())}"


def preflight(
    config: str,
    overrides: list[str],
    family: str | None = None,
    memory_gib: float | None = None,
) -> tuple[str, Path]:
    """All checks and the memory plan; returns (summary, absolute run dir) or raises
    PreflightError."""
    from pipeline.config import ConfigError
    from pipeline.recipe import load_train_config

    try:
        cfg = load_train_config(config, overrides)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if family is not None and cfg.model.family != family:
        raise PreflightError(
            f"{config}: model.family is {cfg.model.family!r}, but this job runs {family!r} "
            f"(use jobs/infotok_{cfg.model.family}.sh or a {family} recipe)"
        )
    world = _world_size()
    summary = run_checks(cfg, world)
    fit = check_fit(cfg, world, gpu_memory_gib(memory_gib))
    return f"{config}: {summary}; {fit}", Path(cfg.run_dir).resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--family", help="fail unless the recipe's model.family is this one")
    parser.add_argument("--env-out", help="also write run_dir=<absolute path> to this file")
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="memory per GPU the plan must fit (default: INFOTOK_GPU_MEMORY_GIB, else this "
        "host's GPU, else the fit is not checked)",
    )
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, as given to pipeline.train"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    args = parser.parse_args(argv)
    try:
        summary, run_dir = preflight(args.config, args.overrides, args.family, args.gpu_memory_gib)
        if args.env_out:
            Path(args.env_out).write_text(f"run_dir={run_dir}\n")
    except Exception as e:  # noqa: BLE001 - every failure becomes the one line a job log shows
        if args.debug and not isinstance(e, PreflightError):
            raise
        reason = (
            str(e)
            if isinstance(e, PreflightError)
            else f"unexpected {type(e).__name__}: {e} (rerun with --debug)"
        )
        print(failure_line(reason), file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(f"preflight: ok: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
