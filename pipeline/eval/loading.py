"""The model under evaluation: a training run (consolidated DeepSpeed checkpoint, with the trained
InfoTok heads) or an exported model directory (the adapter only; export drops the heads)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import CHECKPOINT_DIR, LATEST, step_of
from pipeline.export import ADAPTER_PREFIX, REGULARIZER_PREFIX, locate
from pipeline.infotok import InfoTokDims, InfoTokRegularizer
from pipeline.models import adapter_class, build_model
from pipeline.models.base import MLLMAdapter
from pipeline.train import TrainConfig, load_train_config

ADAPTER_CONFIG_KEY = "_infotok_adapter"  # where every family's save_pretrained records itself in config.json


@dataclass
class EvalModel:
    adapter: MLLMAdapter
    regularizer: InfoTokRegularizer | None  # None: no trained heads (exported model, or mode off)
    config: TrainConfig | None  # the run's resolved recipe; None for a model directory
    run_dir: Path | None
    step: int | None
    source: str


def is_run(path: Path) -> bool:
    return (path / CHECKPOINT_DIR / LATEST).is_file() or (path / LATEST).is_file() or path.name.startswith("step_")


def load_run(path: Path, step: int | None = None) -> EvalModel:
    """Consolidate a run's (latest or ``step``) ZeRO checkpoint to fp32, as ``pipeline.export`` does."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = locate(path, step)
    cfg = load_train_config(root / tag / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    adapter = build_model(cfg.model)
    _load(adapter, {k.removeprefix(ADAPTER_PREFIX): v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)},
          f"{root / tag} (adapter)")
    regularizer = None
    if cfg.infotok.enabled:
        regularizer = InfoTokRegularizer(cfg.infotok, InfoTokDims(**adapter.infotok_dims()))
        _load(regularizer, {k.removeprefix(REGULARIZER_PREFIX): v for k, v in state.items()
                            if k.startswith(REGULARIZER_PREFIX)}, f"{root / tag} (InfoTok heads)")
    run_dir = root.parent if root.name == CHECKPOINT_DIR else None
    return EvalModel(adapter, regularizer, cfg, run_dir, step_of(tag), f"{root / tag}")


def load_model_dir(path: Path, tokenizer_path: str | None = None, vae_path: str | None = None) -> EvalModel:
    config_file = path / "config.json"
    try:
        family = json.loads(config_file.read_text())[ADAPTER_CONFIG_KEY]["family"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileNotFoundError(f"{path}: neither a training run (no {CHECKPOINT_DIR}/{LATEST}) nor a model "
                                f"directory written by pipeline.export ({config_file} without {ADAPTER_CONFIG_KEY})"
                                ) from None
    kwargs = {k: v for k, v in {"tokenizer_path": tokenizer_path, "vae_path": vae_path}.items() if v is not None}
    adapter = adapter_class(family).from_pretrained(path, **kwargs)
    return EvalModel(adapter, None, None, None, None, str(path))


def load(path: Path, *, step: int | None = None, tokenizer_path: str | None = None) -> EvalModel:
    model = load_run(path, step) if is_run(path) else load_model_dir(path, tokenizer_path)
    model.adapter.eval()
    if model.regularizer is not None:
        model.regularizer.eval()
    return model


def _load(module, state, source: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
