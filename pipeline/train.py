"""InfoTok fine-tuning with DeepSpeed ZeRO-2: L_total = w_i2t*L_i2t + w_t2i*L_t2i + lam*L_InfoTok (Eq. 11).

    python -m pipeline.train --config configs/tiny_showo2.yaml data.i2t=[D] data.t2i=[D] [key=value ...]

Launch with torchrun, the deepspeed launcher, srun, or as one plain process. Exit codes:
0 finished all steps; 75 stopped by a stop signal after saving a checkpoint (resume with
``resume=auto``); anything else is a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.config import ConfigError, dump_yaml, load_config, param, to_dict
from pipeline.data import DataConfig, TwoStreamLoader
from pipeline.distributed import device, init_distributed
from pipeline.infotok import InfoTokConfig, InfoTokDims, InfoTokRegularizer
from pipeline.metrics import MetricsLog
from pipeline.models import ModelConfig, build_model
from pipeline.models.base import MLLMAdapter

EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpointed after a stop signal; run again with resume=auto


@dataclass
class OptimConfig:
    lr: float = param(1e-5, gt=0, help="peak learning rate")
    betas: list[float] = param(default_factory=lambda: [0.9, 0.95], help="AdamW betas")
    eps: float = param(1e-8, gt=0, help="AdamW epsilon")
    weight_decay: float = param(0.0, ge=0, help="AdamW decoupled weight decay (matrices only)")
    warmup_steps: int = param(0, ge=0, help="linear warm-up steps")
    min_lr_ratio: float = param(0.0, ge=0, le=1, help="cosine decay floor, as a fraction of lr")
    grad_clip: float = param(1.0, ge=0, help="global gradient-norm clip (0: off)")


@dataclass
class CheckpointConfig:
    every: int = param(100, ge=1, help="save every N optimizer steps")
    keep_last: int = param(3, ge=1, help="checkpoints kept (oldest removed after a newer one is complete)")
    stop_signals: list[str] = param(default_factory=lambda: ["SIGUSR1", "SIGTERM"],
                                    help="signals that make every rank save and exit with code 75")


@dataclass
class LogConfig:
    tensorboard: bool = param(True, help="also write TensorBoard scalars to RUN_DIR/tensorboard")


@dataclass
class TrainConfig:
    run_dir: str = param("runs/default", help="metrics, checkpoints and the resolved config go here")
    resume: str = param("auto", help="auto (latest checkpoint in run_dir, if any) | none | a checkpoint path")
    seed: int = param(0, help="seeds initialisation and every rank's noise")
    steps: int = param(100, ge=1, help="optimizer steps of the whole run")
    grad_accum: int = param(1, ge=1, help="micro-steps per optimizer step")
    precision: Literal["fp32", "bf16"] = param("bf16", help="bf16 on GPU; fp32 or bf16 on CPU")
    deepspeed: str = param("ds_configs/zero2.json", help="DeepSpeed JSON; batch, clip, precision, optimizer come "
                                                         "from this recipe")
    loss_weight_i2t: float = param(1.0, ge=0, help="w_i2t of Eq. 11")
    loss_weight_t2i: float = param(1.0, ge=0, help="w_t2i of Eq. 11")
    max_nonfinite_steps: int = param(5, ge=1, help="consecutive non-finite losses before the run stops")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    infotok: InfoTokConfig = field(default_factory=InfoTokConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def load_train_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    return load_config(TrainConfig, path, overrides)


class InfoTokModel(nn.Module):
    """The adapter and the regularizer in one module, so ZeRO-2 shards all their optimizer state."""

    def __init__(self, adapter: MLLMAdapter, regularizer: InfoTokRegularizer, w_i2t: float, w_t2i: float):
        super().__init__()
        self.adapter = adapter
        self.regularizer = regularizer
        self.weights = {"loss_i2t": w_i2t, "loss_t2i": w_t2i}

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor], int]:
        """(total loss, every term, tokens processed)."""
        out = self.adapter(batch, generator=generator)
        terms: dict[str, Tensor] = {}
        loss = None
        for name, weight in self.weights.items():
            value = getattr(out, name)
            if value is not None:
                terms[name] = value
                loss = weight * value if loss is None else loss + weight * value
        reg = self.regularizer(**out.infotok_inputs())
        terms.update(reg.terms)
        loss = reg.total if loss is None else loss + reg.total
        terms["loss"] = loss
        return loss, terms, out.num_text_tokens + out.num_image_tokens


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms, embeddings' 1-D scales and learned vectors are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warm-up to lr, then cosine to lr * min_lr_ratio at the last step."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


RECIPE_OWNED = "set it in the recipe, or use \"auto\""


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict[str, Any]:
    """The JSON of ``cfg.deepspeed`` with everything the recipe owns filled in; disagreements fail."""
    path = Path(cfg.deepspeed)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read DeepSpeed config ({e})") from None
    micro = cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i
    owned = {
        ("train_micro_batch_size_per_gpu",): (micro, "data.micro_batch_i2t + data.micro_batch_t2i"),
        ("gradient_accumulation_steps",): (cfg.grad_accum, "grad_accum"),
        ("train_batch_size",): (micro * cfg.grad_accum * world_size, "micro batch x grad_accum x world size"),
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
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        current = node.get(keys[-1], "auto")
        if current != "auto" and current != value:
            raise ConfigError(f"{path}: {'.'.join(keys)} is {current!r} but the recipe gives {value!r} "
                              f"(from {owner}); {RECIPE_OWNED}")
        node[keys[-1]] = value
    if ds.get("fp16", {}).get("enabled") not in (None, False, "auto"):
        raise ConfigError(f"{path}: fp16 is enabled; precision comes from the recipe (fp32 or bf16)")
    ds.pop("fp16", None)
    if "scheduler" in ds:
        raise ConfigError(f"{path}: has a scheduler; the LR schedule comes from the recipe (optim.*)")
    return ds


class StopFlag:
    """Set by a stop signal; every rank agrees at the next step boundary."""

    def __init__(self, names: list[str]):
        self.requested = False
        for name in names:
            try:
                signal.signal(getattr(signal, name), self._handle)
            except AttributeError:
                raise ConfigError(f"checkpoint.stop_signals: unknown signal {name!r}") from None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def agreed(self, dev: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.requested else 0.0], device=dev)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def to_device(obj: Any, dev: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dev, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, dev) for v in obj]
    return obj


def mean_across_ranks(terms: dict[str, Tensor], dev: torch.device) -> dict[str, float]:
    names = sorted(terms)
    values = torch.stack([terms[n].detach().float().reshape(()) for n in names]).to(dev)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def train(cfg: TrainConfig) -> int:
    """Run (or resume) the job; returns the process exit code."""
    layout = init_distributed()
    dev = device()
    rank, world = layout.rank, layout.world_size
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    adapter = build_model(cfg.model)
    regularizer = InfoTokRegularizer(cfg.infotok, InfoTokDims(**adapter.infotok_dims()))
    model = InfoTokModel(adapter, regularizer, cfg.loss_weight_i2t, cfg.loss_weight_t2i)
    torch.manual_seed(cfg.seed + 1 + rank)  # per-rank stream for dropout and any global-RNG noise
    generator = torch.Generator(device=dev).manual_seed(cfg.seed * 100_003 + rank)
    loader = TwoStreamLoader(cfg.data, adapter.processor, adapter.collate, rank=rank, world_size=world,
                             pin_memory=dev.type == "cuda")

    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=parameter_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.optim, cfg.steps)),
    )
    ckpt_root = run_dir / checkpoint.CHECKPOINT_DIR
    start = 0
    resume = checkpoint.resolve_resume(run_dir, cfg.resume)
    if resume is not None:
        client_state, rank_state = checkpoint.load(engine, *resume)
        start = int(client_state["step"])
        loader.load_state_dict(client_state["loader"])
        checkpoint.set_rng_state(rank_state["rng"], generator)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
    metrics = MetricsLog(run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard, truncate_after=start)
    stop = StopFlag(cfg.checkpoint.stop_signals)

    def save(step: int) -> None:
        client = {"step": step, "loader": loader.state_dict(), "config": to_dict(cfg)}
        tag = checkpoint.save(engine, ckpt_root, step, client, {"rng": checkpoint.rng_state(generator)},
                              cfg.checkpoint.keep_last)
        if rank == 0:
            (ckpt_root / tag / "config.yaml").write_text(dump_yaml(cfg))

    batches = iter(loader)
    bad_in_a_row = 0
    samples_per_step = (cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i) * cfg.grad_accum * world
    last_saved = start
    for step in range(start, cfg.steps):
        began = time.perf_counter()
        tokens, skipped, bad = 0, 0, False
        sums: dict[str, Tensor] = {}
        for _ in range(cfg.grad_accum):
            batch = next(batches)
            skipped += sum(batch["skipped"].values())
            loss, terms, n_tokens = engine(to_device(batch["inputs"], dev), generator)
            tokens += n_tokens
            finite = torch.tensor([float(torch.isfinite(loss).item())], device=dev)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                bad = True
                if cfg.grad_accum == 1:
                    break  # skip this step entirely: no backward, no optimizer update
                loss = sum(p.sum() * 0 for p in engine.module.parameters() if p.requires_grad)
            engine.backward(loss)
            engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach() / cfg.grad_accum
        record = mean_across_ranks(sums, dev) if sums else {}
        counts = torch.tensor([float(tokens), float(skipped)], device=dev)
        dist.all_reduce(counts)
        seconds = time.perf_counter() - began
        grad_norm = engine.get_global_grad_norm()
        record.update(step=step + 1, lr=engine.get_lr()[0], nonfinite=bad,
                      grad_norm=None if bad or grad_norm is None else float(grad_norm),
                      samples_per_s=samples_per_step / seconds, tokens_per_s=counts[0].item() / seconds,
                      skipped_samples=int(counts[1].item()), seconds=seconds)
        metrics.write(record)
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if bad_in_a_row >= cfg.max_nonfinite_steps:
            metrics.close()
            raise RuntimeError(f"{bad_in_a_row} consecutive steps with a non-finite loss (last: step {step + 1}); "
                               f"stopping without saving. Lower optim.lr or check the data.")
        done = step + 1
        healthy = bad_in_a_row == 0  # never checkpoint weights a non-finite step may have touched
        if healthy and (done % cfg.checkpoint.every == 0 or done == cfg.steps):
            save(done)
            last_saved = done
        if done < cfg.steps and stop.agreed(dev):
            if healthy and last_saved != done:
                save(done)
            metrics.close()
            if rank == 0:
                print(f"[train] stop signal: saved step {done} to {ckpt_root}; exiting {EXIT_STOPPED}", flush=True)
            return EXIT_STOPPED
    metrics.close()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-6")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    code = train(cfg)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
