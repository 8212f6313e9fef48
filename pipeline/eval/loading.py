"""The model under evaluation: a training run (consolidated DeepSpeed checkpoint, with the trained
InfoTok heads) or an exported model directory (the adapter only; export drops the heads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.checkpoint import CHECKPOINT_DIR, LATEST, find_checkpoint, locate
from pipeline.consolidate import consolidate, load_exactly
from pipeline.infotok import InfoTokConfig
from pipeline.models import MLLMAdapter, adapter_class
from pipeline.models.common.model_dir import ADAPTER_CONFIG_KEY, read_adapter_record
from pipeline.objective import InfoTokModel, build_objective, wrap_adapter
from pipeline.recipe import TrainConfig


@dataclass
class EvalModel:
    objective: InfoTokModel  # without InfoTok heads for an exported model or a run of mode off
    config: TrainConfig | None  # the run's resolved recipe; None for a model directory
    run_dir: Path | None
    step: int | None
    source: str

    @property
    def adapter(self) -> MLLMAdapter:
        return self.objective.adapter


def load_run(path: Path, step: int | None = None) -> EvalModel:
    """A run's (latest or ``step``) checkpoint, consolidated to fp32 as ``pipeline.export`` does."""
    ckpt = consolidate(*locate(path, step))
    cfg = ckpt.config
    objective = build_objective(cfg.model, cfg.infotok, cfg.loss_weight_i2t, cfg.loss_weight_t2i)
    load_exactly(objective.adapter, ckpt.adapter_state, f"{ckpt.source} (adapter)")
    load_exactly(objective.regularizer, ckpt.regularizer_state, f"{ckpt.source} (InfoTok heads)")
    run_dir = ckpt.root.parent if ckpt.root.name == CHECKPOINT_DIR else None
    return EvalModel(objective, cfg, run_dir, ckpt.step, str(ckpt.source))


def load_model_dir(
    path: Path, tokenizer_path: str | None = None, vae_path: str | None = None
) -> EvalModel:
    config_file = path / "config.json"
    try:
        family = read_adapter_record(config_file)["family"]
    except (OSError, ValueError, KeyError, TypeError):
        raise FileNotFoundError(
            f"{path}: neither a training run (no {CHECKPOINT_DIR}/{LATEST}) nor a "
            f"model directory written by pipeline.export ({config_file} without "
            f"{ADAPTER_CONFIG_KEY})"
        ) from None
    kwargs = {
        k: v
        for k, v in {"tokenizer_path": tokenizer_path, "vae_path": vae_path}.items()
        if v is not None
    }
    adapter = adapter_class(family).from_pretrained(path, **kwargs)
    return EvalModel(wrap_adapter(adapter, InfoTokConfig(mode="off")), None, None, None, str(path))


def load(path: Path, *, step: int | None = None, tokenizer_path: str | None = None) -> EvalModel:
    is_run = find_checkpoint(path) is not None
    model = load_run(path, step) if is_run else load_model_dir(path, tokenizer_path)
    model.objective.eval()
    return model
