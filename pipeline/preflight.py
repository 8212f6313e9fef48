"""Checks a training job can start, before it takes any GPU time.

    python -m pipeline.preflight --config configs/showo2_1.5b.yaml [--family showo2] [key=value ...]

Exactly what ``python -m pipeline.train`` with the same arguments would read: the recipe and
overrides validate (and the family's preset/options, and the DeepSpeed JSON against the recipe);
every dataset of an enabled stream has its manifest and every shard it lists; the model
checkpoint, tokenizer and VAE paths hold what the adapter loads; an explicit ``resume`` path is a
checkpoint; the run dir can be created and written. Loads no weights and touches no GPU.

Prints one line and exits 0 (``preflight: ok: ...``) or 78 (``preflight: FAILED: <reason>``), the
line a SLURM job log shows when a job ends without training. ``--env-out FILE`` also writes
``run_dir=<absolute path>`` for the job script.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the checks import torch-heavy modules lazily, after the arguments parse
    from pipeline.models.base import ModelConfig
    from pipeline.train import TrainConfig

EXIT_FAILED = 78  # EX_CONFIG: fix the configuration and resubmit; never requeued

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class PreflightError(Exception):
    """A job would fail; the message is the one line shown to the user."""


def _world_size() -> int:
    """Ranks the job will run (SLURM's task count inside a job, else torchrun's, else 1)."""
    for name in ("SLURM_NTASKS", "WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def check_data(cfg: TrainConfig, world: int) -> str:
    """Every dataset of an enabled stream: manifest present, every listed shard present."""
    from pipeline.data import STREAMS, parse_dataset_spec, read_manifest

    parts = []
    for stream in STREAMS:
        if cfg.data.micro_batch(stream) == 0:
            continue
        shards = samples = 0
        for spec in getattr(cfg.data, stream):
            try:
                path, _ = parse_dataset_spec(spec)
            except ValueError as e:
                raise PreflightError(f"data.{stream}: {e}") from None
            if not path.is_dir():
                raise PreflightError(f"data.{stream}: dataset directory {path} does not exist")
            try:
                spans = read_manifest(path, stream)
            except (OSError, ValueError, KeyError) as e:
                raise PreflightError(f"data.{stream}: {e}") from None
            total = sum(s.count for s in spans)
            if total < world:
                raise PreflightError(f"data.{stream}: {path} has {total} {stream} samples, fewer than the "
                                     f"{world} ranks of this job (each rank needs at least one per epoch)")
            shards += len(spans)
            samples += total
        parts.append(f"{stream} {samples} samples in {shards} shards")
    return ", ".join(parts)


def _tokenizer_dir(*candidates: str | Path | None) -> Path | None:
    for candidate in candidates:
        if candidate is not None and any((Path(candidate) / f).is_file() for f in TOKENIZER_FILES):
            return Path(candidate)
    return None


def _require_tokenizer(model: ModelConfig, *fallbacks: str | Path | None) -> None:
    """A tokenizer directory: ``model.tokenizer_path`` when set, else the first fallback holding one."""
    if model.tokenizer_path is not None and _tokenizer_dir(model.tokenizer_path) is None:
        raise PreflightError(f"model.tokenizer_path {model.tokenizer_path}: no {' or '.join(TOKENIZER_FILES)} there")
    if _tokenizer_dir(model.tokenizer_path, *fallbacks) is None:
        where = ", ".join(str(f) for f in fallbacks if f is not None) or "model.path"
        raise PreflightError(f"model: no tokenizer: set model.tokenizer_path (none found in {where})")


def check_model(model: ModelConfig) -> str:
    """The files the family's adapter reads to build the model (nothing is loaded)."""
    from pipeline.models import FAMILIES

    if model.family not in FAMILIES:
        raise PreflightError(f"model.family: unknown family {model.family!r} (available: {', '.join(sorted(FAMILIES))})")
    for key in ("path", "tokenizer_path", "vae_path"):
        value = getattr(model, key)
        if value is not None and not Path(value).exists():
            raise PreflightError(f"model.{key}: {value} does not exist")
    for key, value in model.options.items():
        if key.endswith("_path") and value is not None and not Path(value).exists():
            raise PreflightError(f"model.options.{key}: {value} does not exist")
    options_paths = {k: v for k, v in model.options.items() if k.endswith("_path") and v}

    if model.path is None and (model.family != "openuni" or not options_paths):
        # Random init: the preset and options must validate, and training needs a tokenizer.
        module = importlib.import_module(f"pipeline.models.{model.family}_config")
        getattr(module, f"{model.family}_config")(model.preset, model.options, source="model")
        _require_tokenizer(model)
        return f"{model.family}/{model.preset} random init"

    from pipeline.models.weights import find_weight_files

    path = Path(model.path) if model.path is not None else None
    try:
        if model.family == "showo2":
            if not (path / "config.json").is_file():
                raise PreflightError(f"model.path: {path / 'config.json'} does not exist (a Show-o2 checkpoint directory)")
            find_weight_files(path)
            _require_tokenizer(model, path)
            if model.vae_path is None and not (path / "vae").exists():
                raise PreflightError(f"model.vae_path: not set and {path / 'vae'} does not exist (Wan2.1_VAE.pth)")
        elif model.family == "harmon":
            if path.is_dir():
                find_weight_files(path)
            _require_tokenizer(model, path if path.is_dir() else None)
        elif model.family == "openuni":
            from pipeline.models.openuni_config import PRESETS
            from pipeline.models.openuni_files import locate

            preset = model.preset if model.preset in PRESETS else None
            parts = locate(path, internvl_path=None, sana_path=None, vae_path=model.vae_path, preset=preset,
                           options=model.options)
            _require_tokenizer(model, parts.internvl)
    except (OSError, ValueError, KeyError) as e:  # missing files, unreadable or malformed JSON
        raise PreflightError(f"model: {e}") from None
    return f"{model.family} from {path if path is not None else ', '.join(options_paths.values())}"


def check_resume(cfg: TrainConfig) -> str:
    """An explicit resume path must be a checkpoint; ``auto`` reports what it will pick."""
    from pipeline.checkpoint import resolve_resume

    try:
        found = resolve_resume(Path(cfg.run_dir), cfg.resume)
    except (OSError, ValueError) as e:
        raise PreflightError(f"resume: {e}") from None
    if found is None:
        return "starts fresh" if cfg.resume == "none" else "no checkpoint yet, starts fresh"
    root, tag = found
    return f"resumes from {root / tag}"


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


def preflight(config: str, overrides: list[str], family: str | None = None) -> tuple[str, Path]:
    """All checks; returns (summary, absolute run dir) or raises PreflightError."""
    from pipeline.config import ConfigError
    from pipeline.train import deepspeed_config, load_train_config

    try:
        cfg = load_train_config(config, overrides)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    if family is not None and cfg.model.family != family:
        raise PreflightError(f"{config}: model.family is {cfg.model.family!r}, but this job runs {family!r} "
                             f"(use jobs/infotok_{cfg.model.family}.sh or a {family} recipe)")
    world = _world_size()
    try:
        deepspeed_config(cfg, world)
        data = check_data(cfg, world)
        model = check_model(cfg.model)
    except ConfigError as e:
        raise PreflightError(str(e)) from None
    run_dir = Path(check_run_dir(Path(cfg.run_dir)))
    resume = check_resume(cfg)
    return f"{config}: {model}; {data}; {world} rank(s); run_dir {run_dir} ({resume})", run_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--family", help="fail unless the recipe's model.family is this one")
    parser.add_argument("--env-out", help="also write run_dir=<absolute path> to this file")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, as given to pipeline.train")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    args = parser.parse_args(argv)
    try:
        summary, run_dir = preflight(args.config, args.overrides, args.family)
        if args.env_out:
            Path(args.env_out).write_text(f"run_dir={run_dir}\n")
    except Exception as e:  # noqa: BLE001 - every failure becomes the one line a job log shows
        if args.debug and not isinstance(e, PreflightError):
            raise
        reason = str(e) if isinstance(e, PreflightError) else f"unexpected {type(e).__name__}: {e} (rerun with --debug)"
        print(f"preflight: FAILED: {' '.join(reason.split())}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    print(f"preflight: ok: {summary}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
