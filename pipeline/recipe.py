"""The training recipe: ``TrainConfig`` and its sections, loaded from YAML with dotted overrides,
and the DeepSpeed JSON it fills (the recipe owns batch sizes, clipping, precision and AdamW)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, load_config, param
from pipeline.data import DataConfig
from pipeline.infotok import InfoTokConfig
from pipeline.models.base import ModelConfig
from pipeline.param_groups import ParamGroupConfig
from pipeline.wandb_log import WandbConfig
from pipeline.watchdog import WatchdogConfig


@dataclass
class OptimConfig:
    lr: float = param(1e-5, gt=0, help="peak learning rate")
    betas: list[float] = param(default_factory=lambda: [0.9, 0.95], help="AdamW betas")
    eps: float = param(1e-8, gt=0, help="AdamW epsilon")
    weight_decay: float = param(0.0, ge=0, help="AdamW decoupled weight decay (matrices only)")
    warmup_steps: int = param(0, ge=0, help="linear warm-up steps")
    min_lr_ratio: float = param(0.0, ge=0, le=1, help="cosine decay floor, as a fraction of lr")
    grad_clip: float = param(1.0, ge=0, help="global gradient-norm clip (0: off)")
    groups: list[ParamGroupConfig] = param(
        default_factory=list,
        help="parameter groups with their own learning rate (name, params: glob patterns, "
        "lr_scale); trained parameters no group claims train at optim.lr",
    )
    heads_lr_scale: float = param(
        1.0, gt=0, help="the InfoTok heads' learning rate (their own group) as a multiple of lr"
    )
    skip_grad_norm_above: float = param(
        0.0,
        ge=0,
        help="skip the optimizer step (no update) when the global gradient norm, before "
        "clipping, is above this (0: off); a non-finite norm is always skipped",
    )


@dataclass
class CheckpointConfig:
    every: int = param(100, ge=1, help="save every N optimizer steps")
    every_minutes: float = param(
        0.0,
        ge=0,
        help="also save when this many minutes have passed since "
        "the last save (0: off); whichever comes first",
    )
    keep_last: int = param(
        3, ge=1, help="checkpoints kept (oldest removed after a newer one is complete)"
    )
    stop_signals: list[str] = param(
        default_factory=lambda: ["SIGUSR1", "SIGTERM"],
        help="signals that make every rank save and exit with code 75",
    )


@dataclass
class LogConfig:
    every: int = param(
        1,
        ge=1,
        help="write one metrics record per N optimizer steps (means over them); the ranks also "
        "agree on stop signals and time-based checkpoints then (the only host syncs of the loop)",
    )
    tensorboard: bool = param(True, help="also write TensorBoard scalars to RUN_DIR/tensorboard")
    samples: bool = param(
        False,
        help="write every step's sample keys, in global slot order, to RUN_DIR/samples.jsonl (an "
        "audit of the data order across resumes; one gather per metrics record)",
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class EvalConfig:
    every: int = param(0, ge=0, help="validate every N optimizer steps and at the end (0: off)")
    i2t: list[str] = param(
        default_factory=list, help="held-out I2T data directories (python -m data_prep output)"
    )
    t2i: list[str] = param(default_factory=list, help="held-out T2I data directories")
    batches: int = param(
        4,
        ge=1,
        help="held-out global batches per validation (each the size of the training global "
        "batch, split over the ranks and micro-steps like it)",
    )

    def check(self, source: str, prefix: str) -> None:
        if self.every and not (self.i2t or self.t2i):
            raise ConfigError(
                f"{source}: {prefix}every: validation every {self.every} steps needs held-out "
                f"data: set {prefix}i2t and/or {prefix}t2i to data directories"
            )


@dataclass
class TrainConfig:
    run_dir: str = param(
        "runs/default", help="metrics, checkpoints and the resolved config go here"
    )
    resume: str = param(
        "auto", help="auto (latest checkpoint in run_dir, if any) | none | a checkpoint path"
    )
    seed: int = param(0, help="seeds initialisation and every rank's noise")
    steps: int = param(100, ge=1, help="optimizer steps of the whole run")
    grad_accum: int = param(
        1, ge=1, help="micro-steps per optimizer step (or set data.global_batch instead)"
    )
    allow_global_batch_change: bool = param(
        False,
        help="resuming on a number of ranks that cannot keep the checkpoint's global batch: "
        "continue with this recipe's (logged) instead of refusing",
    )
    precision: Literal["fp32", "bf16"] = param("bf16", help="bf16 on GPU; fp32 or bf16 on CPU")
    deepspeed: str = param(
        "ds_configs/zero2.json",
        help="DeepSpeed JSON; batch, clip, precision, optimizer come from this recipe",
    )
    loss_weight_i2t: float = param(1.0, ge=0, help="w_i2t of Eq. 11")
    loss_weight_t2i: float = param(1.0, ge=0, help="w_t2i of Eq. 11")
    max_nonfinite_steps: int = param(
        5,
        ge=1,
        help="consecutive skipped steps (non-finite or too large gradient) before the run stops",
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infotok: InfoTokConfig = field(default_factory=InfoTokConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    def check(self, source: str, prefix: str) -> None:
        if self.data.global_batch is not None and self.grad_accum != 1:
            raise ConfigError(
                f"{source}: {prefix}grad_accum: {self.grad_accum} and data.global_batch: "
                f"{self.data.global_batch} are both set; give one (the accumulation follows from "
                "the global batch)"
            )
        if self.eval.every % self.log.every:
            raise ConfigError(
                f"{source}: eval.every: {self.eval.every} is not a multiple of log.every "
                f"({self.log.every}); held-out losses are written into that step's metrics record"
            )


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


RECIPE_OWNED = 'set it in the recipe, or use "auto"'


def grad_accum_for(cfg: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step on ``world_size`` ranks: from ``data.global_batch`` when
    it is set (it must split evenly), else ``grad_accum``."""
    if cfg.data.global_batch is None:
        return cfg.grad_accum
    micro = cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i
    accum, rest = divmod(cfg.data.global_batch, micro * world_size)
    if rest or accum == 0:
        raise ConfigError(
            f"data.global_batch: {cfg.data.global_batch} is not a multiple of the micro-batch "
            f"({micro}) x {world_size} ranks = {micro * world_size}; choose a global batch, "
            "micro-batch or number of ranks that divide"
        )
    return accum


def deepspeed_config(
    cfg: TrainConfig, world_size: int, grad_accum: int | None = None
) -> dict[str, Any]:
    """The JSON of ``cfg.deepspeed`` with all the recipe owns filled in; disagreements fail.
    ``grad_accum`` overrides the recipe's accumulation (a resume that keeps its global batch)."""
    accum = grad_accum_for(cfg, world_size) if grad_accum is None else grad_accum
    path = Path(cfg.deepspeed)
    where = f"deepspeed: {path}"
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{where}: cannot read DeepSpeed config ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(ds).__name__}")
    micro = cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i
    owned = {
        ("train_micro_batch_size_per_gpu",): (micro, "data.micro_batch_i2t + data.micro_batch_t2i"),
        ("gradient_accumulation_steps",): (accum, "grad_accum or data.global_batch"),
        ("train_batch_size",): (
            micro * accum * world_size,
            "micro batch x grad_accum x world size",
        ),
        ("gradient_clipping",): (cfg.optim.grad_clip, "optim.grad_clip"),
        ("bf16", "enabled"): (cfg.precision == "bf16", "precision"),
        ("optimizer", "type"): ("AdamW", "the trainer (AdamW)"),
        ("optimizer", "params", "lr"): (cfg.optim.lr, "optim.lr"),
        ("optimizer", "params", "betas"): (list(cfg.optim.betas), "optim.betas"),
        ("optimizer", "params", "eps"): (cfg.optim.eps, "optim.eps"),
        ("optimizer", "params", "weight_decay"): (cfg.optim.weight_decay, "optim.weight_decay"),
    }
    for keys, (value, owner) in owned.items():
        node = ds
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {'.'.join(keys[: depth + 1])} must be a JSON object")
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            raise ConfigError(
                f"{where}: {'.'.join(keys)} is {current!r} but the recipe gives "
                f"{value!r} (from {owner}); {RECIPE_OWNED}"
            )
        node[keys[-1]] = value
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(
            f"{where}: fp16 is enabled; precision comes from the recipe (fp32 or bf16)"
        )
    ds.pop("fp16", None)
    if "scheduler" in ds:
        raise ConfigError(
            f"{where}: has a scheduler; the LR schedule comes from the recipe (optim.*)"
        )
    checkpointing = ds.get("checkpoint", {})
    if isinstance(checkpointing, dict) and checkpointing.get("writer") is not None:
        raise ConfigError(
            f"{where}: checkpoint.writer is set; the trainer writes checkpoints itself (every "
            "file fsynced before the manifest and `latest`), so DeepSpeed's writers are not used"
        )
    return ds
