"""InfoTok fine-tuning with DeepSpeed ZeRO-2: L_total = w_i2t*L_i2t + w_t2i*L_t2i + lam*L_InfoTok (Eq. 11).

    python -m pipeline.train --config configs/tiny_showo2.yaml data.i2t=[D] data.t2i=[D] [key=value ...]

Launch with torchrun, the deepspeed launcher, srun, or as one plain process. Before building
anything, every rank runs the checks of ``python -m pipeline.preflight`` (recipe, DeepSpeed JSON,
data, model files, resume path, run dir). Exit codes: 0 finished all steps; 2 a check failed
(rank 0 prints the one line the SLURM preflight prints); 75 stopped by a stop signal after saving
a checkpoint (resume with ``resume=auto``); anything else is a failure.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline import checkpoint
from pipeline.config import ConfigError, dump_yaml, to_dict
from pipeline.data import TwoStreamLoader
from pipeline.distributed import DistEnv, device, init_distributed, resolve_env
from pipeline.metrics import MetricsLog, gpu_memory
from pipeline.objective import build_objective
from pipeline.preflight import PreflightError, failure_line, run_checks
from pipeline.recipe import OptimConfig, TrainConfig, deepspeed_config, load_train_config

EXIT_BAD_SETUP = 2  # a check failed: fix the recipe, a path or a file (argparse's usage code)
EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpointed after a stop signal; run again with resume=auto


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norms, embeddings' 1-D scales and learned vectors are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warm-up to lr, then cosine to lr * min_lr_ratio at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


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


def any_rank(dev: torch.device, *flags: bool) -> list[bool]:
    """Each flag, True on every rank when it is True on any rank (one all-reduce for all)."""
    values = torch.tensor([float(f) for f in flags], device=dev)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


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


def train(cfg: TrainConfig, layout: DistEnv | None = None) -> int:
    """Run (or resume) the job; returns the process exit code."""
    layout = init_distributed(layout)
    dev = device()
    rank, world = layout.rank, layout.world_size
    run_dir = Path(cfg.run_dir)
    torch.manual_seed(cfg.seed)
    model = build_objective(cfg.model, cfg.infotok, cfg.loss_weight_i2t, cfg.loss_weight_t2i)
    torch.manual_seed(cfg.seed + 1 + rank)  # per-rank stream for dropout and any global-RNG noise
    generator = torch.Generator(device=dev).manual_seed(cfg.seed * 100_003 + rank)
    loader = TwoStreamLoader(
        cfg.data,
        model.adapter.processor,
        model.adapter.collate,
        rank=rank,
        world_size=world,
        pin_memory=dev.type == "cuda",
    )

    import deepspeed

    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=parameter_groups(model, cfg.optim.weight_decay),
        config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(cfg.optim, cfg.steps)
        ),
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
    metrics = MetricsLog(
        run_dir, enabled=rank == 0, tensorboard=cfg.log.tensorboard, truncate_after=start
    )
    stop = StopFlag(cfg.checkpoint.stop_signals)
    retention = checkpoint.Retention(ckpt_root, cfg.checkpoint.keep_last)
    save_interval_s = cfg.checkpoint.every_minutes * 60
    last_save_time = time.monotonic()

    def save(step: int) -> None:
        nonlocal last_saved, last_save_time
        client = {"step": step, "loader": loader.state_dict(), "config": to_dict(cfg)}
        tag = checkpoint.save(
            engine, ckpt_root, step, client, {"rng": checkpoint.rng_state(generator)}, retention
        )
        if rank == 0:
            (ckpt_root / tag / "config.yaml").write_text(dump_yaml(cfg))
        last_saved, last_save_time = step, time.monotonic()

    def close() -> None:
        metrics.close()
        retention.wait()  # old checkpoints are gone before the process ends

    batches = iter(loader)
    bad_in_a_row = 0
    samples_per_step = (
        (cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i) * cfg.grad_accum * world
    )
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
        record.update(
            step=step + 1,
            lr=engine.get_lr()[0],
            nonfinite=bad,
            grad_norm=None if bad or grad_norm is None else float(grad_norm),
            samples_per_s=samples_per_step / seconds,
            tokens_per_s=counts[0].item() / seconds,
            skipped_samples=int(counts[1].item()),
            seconds=seconds,
            **gpu_memory(dev),
        )
        metrics.write(record)
        bad_in_a_row = bad_in_a_row + 1 if bad else 0
        if bad_in_a_row >= cfg.max_nonfinite_steps:
            close()
            raise RuntimeError(
                f"{bad_in_a_row} consecutive steps with a non-finite loss (last: step {step + 1}); "
                f"stopping without saving. Lower optim.lr or check the data."
            )
        done = step + 1
        healthy = bad_in_a_row == 0  # never checkpoint weights a non-finite step may have touched
        stopping, clock_due = False, False
        if done < cfg.steps:  # every rank agrees on both, whatever its own clock and signals say
            overdue = 0 < save_interval_s <= time.monotonic() - last_save_time
            stopping, clock_due = any_rank(dev, stop.requested, overdue)
        if healthy and (done % cfg.checkpoint.every == 0 or done == cfg.steps or clock_due):
            save(done)
        if stopping:
            if healthy and last_saved != done:
                save(done)
            if rank == 0:
                print(
                    f"[train] stop signal: saved step {done} to {ckpt_root}; exiting {EXIT_STOPPED}",
                    flush=True,
                )
            close()
            return EXIT_STOPPED
    close()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-6"
    )
    args = parser.parse_args(argv)
    layout = resolve_env()
    try:
        cfg = load_train_config(args.config, args.overrides)
        run_checks(cfg, layout.world_size)
    except (ConfigError, PreflightError) as e:
        if layout.rank == 0:  # every rank fails the same check; one line in the job log
            print(failure_line(str(e)), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_SETUP)
    code = train(cfg, layout)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
