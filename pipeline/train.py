"""InfoTok fine-tuning with DeepSpeed ZeRO-2 (Eq. 11):
L_total = w_i2t*L_i2t + w_t2i*L_t2i + lam*L_InfoTok.

    python -m pipeline.train --config configs/tiny_showo2.yaml data.i2t=[D] data.t2i=[D] \\
        [key=value ...]

Launch with torchrun, the deepspeed launcher, srun, or as one plain process. Before building
anything, every rank runs the checks of ``python -m pipeline.preflight`` (recipe, DeepSpeed JSON,
data, model files, resume path, run dir). Exit codes: 0 finished all steps; 2 a check failed
(rank 0 prints the one line the SLURM preflight prints); 75 stopped by a stop signal after saving
a checkpoint (resume with ``resume=auto``); 74 a checkpoint could not be saved, e.g. on a full
disk (rank 0 prints ``checkpoint: FAILED: ...`` with the space needed and free; ``latest`` still
names the previous checkpoint; never requeued); 69 another rank died or froze, or this one overran
a phase's limit (``pipeline.watchdog`` names the rank); anything else is a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline import checkpoint, plan
from pipeline.config import ConfigError, dump_yaml, to_dict
from pipeline.data import TwoStreamLoader
from pipeline.distributed import DistEnv, device, init_distributed, resolve_env, to_device
from pipeline.elastic import split_batch
from pipeline.grad_guard import SKIPPED_STEPS_FILE, GradGuard, injected_fault
from pipeline.latent_cache import latent_source
from pipeline.metrics import MetricsLog, StepLog, gpu_memory, throughput
from pipeline.noise import seed_noise
from pipeline.objective import InfoTokModel, build_objective
from pipeline.param_groups import format_groups, optimizer_groups
from pipeline.preflight import PreflightError, failure_line, run_checks
from pipeline.progress import ConsoleProgress
from pipeline.recipe import OptimConfig, TrainConfig, deepspeed_config, load_train_config
from pipeline.validation import Validator
from pipeline.watchdog import Watchdog

EXIT_BAD_SETUP = 2  # a check failed: fix the recipe, a path or a file (argparse's usage code)
SAMPLES_FILE = "samples.jsonl"
EXIT_STOPPED = 75  # EX_TEMPFAIL: checkpointed after a stop signal; run again with resume=auto
EXIT_SAVE_FAILED = 74  # EX_IOERR: a checkpoint could not be written (full disk); not requeued


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Linear warm-up to lr, then cosine to lr * min_lr_ratio at the last step."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def universal_resume(root: Path, tag: str, into: Path, rank: int) -> tuple[Path, str]:
    """(root, tag) of checkpoint ``tag`` in DeepSpeed's universal format under ``into``,
    converted by rank 0 while the others wait; every rank raises the same error if the
    conversion fails."""
    outcome: list[Any] = [None]
    if rank == 0:
        try:
            outcome[0] = str(checkpoint.universal_copy(root, tag, into).parent)
        except checkpoint.ConversionError as e:
            outcome[0] = e
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return Path(outcome[0]), tag


def gather_sample_keys(
    steps: list[tuple[int, list[dict[str, Any]]]], world: int
) -> list[dict[str, Any]]:
    """Every rank's sample keys of ``steps`` (this rank's ``StepResult.samples`` per step),
    gathered and put in global slot order: one ``{"step", "keys": {stream: [...]}}`` per step
    on rank 0, nothing elsewhere."""
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, steps)
    if dist.get_rank() != 0:
        return []
    lines = []
    for j, (step, _) in enumerate(steps):
        micro_batches = sorted(
            (m for rank_steps in everyone for m in rank_steps[j][1]),
            key=lambda m: m["micro_batch"],
        )
        keys: dict[str, list[str]] = {}
        for m in micro_batches:
            for stream, stream_keys in m["keys"].items():
                keys.setdefault(stream, []).extend(stream_keys)
        lines.append({"step": step, "keys": keys})
    return lines


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


class LogInterval:
    """What the steps since the last record add up to, kept on the device until it is written:
    the loop reads nothing back from the GPU between records."""

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.began = time.perf_counter()
        self.steps = self.healthy = self.skipped = 0
        self.nonfinite = False
        self.terms: dict[str, Tensor] = {}
        self.tokens = torch.zeros((), dtype=torch.float64, device=dev)
        self.grad_norm: Tensor | None = None

    def add_step(
        self,
        terms: dict[str, Tensor],
        tokens: Tensor,
        skipped: int,
        applied: bool,
        grad_norm: Tensor | float | None,
    ) -> None:
        """One optimizer step: its loss terms (means over micro-steps) count when it was applied."""
        self.steps += 1
        self.skipped += skipped
        self.tokens += tokens
        if not applied:
            self.nonfinite = True
            return
        self.healthy += 1
        for name, value in terms.items():
            self.terms[name] = self.terms[name] + value if name in self.terms else value
        if grad_norm is not None:
            norm = torch.as_tensor(grad_norm, dtype=torch.float64, device=self.dev)
            self.grad_norm = norm if self.grad_norm is None else self.grad_norm + norm

    def reduce(self, *flags: bool) -> tuple[dict[str, Any], list[bool]]:
        """The record of the interval (terms averaged across ranks and steps, counts summed) and
        each flag ORed across ranks: two all-reduces and one read back to the host."""
        names = sorted(self.terms)
        f64 = partial(torch.tensor, dtype=torch.float64, device=self.dev)
        norm = self.grad_norm if self.grad_norm is not None else f64(math.nan)
        counts = torch.stack([self.tokens, f64(float(self.skipped)), *map(f64, map(float, flags))])
        dist.all_reduce(counts)
        values = counts.new_zeros(0)
        if names:
            values = torch.stack([self.terms[n].detach().float().reshape(()) for n in names])
            dist.all_reduce(values)
            values /= dist.get_world_size()
        read = torch.cat([values.double(), counts, norm.reshape(1)]).tolist()
        means, (tokens, skipped, *agreed, grad_norm) = read[: len(names)], read[len(names) :]
        seconds = time.perf_counter() - self.began
        record = {n: v / self.healthy for n, v in zip(names, means)}
        record.update(
            nonfinite=self.nonfinite,
            grad_norm=None if math.isnan(grad_norm) else grad_norm / self.healthy,
            tokens_per_s=tokens / seconds,
            skipped_samples=int(skipped),
            seconds=seconds / self.steps,
        )
        return record, [a > 0 for a in agreed]


@dataclass
class StepResult:
    """One optimizer step of one rank: its loss terms (means over the micro-steps, on the
    device), what it processed and whether the optimizer applied it."""

    terms: dict[str, Tensor]
    tokens: Tensor | int
    skipped_samples: int
    applied: bool
    samples: list[dict[str, Any]]  # per micro-step: its micro_batch number, keys, sources


class Trainer:
    """The model, the data, the DeepSpeed engine and the run's logs, resumed when the recipe
    says so. :meth:`train_step` runs one optimizer step; :meth:`run` the whole job."""

    def __init__(
        self,
        cfg: TrainConfig,
        layout: DistEnv | None = None,
        recipe: str = "",
        watchdog: Watchdog | None = None,
    ) -> None:
        layout = init_distributed(layout)
        self.cfg, self.recipe = cfg, recipe
        self.watchdog = watchdog or Watchdog(cfg.watchdog, None, layout.rank)  # None: not watched
        self.dev = dev = device()
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's convolutions: fixed shapes every step
        self.rank, self.world = rank, world = layout.rank, layout.world_size
        self.run_dir = Path(cfg.run_dir)
        notice = partial(print, "[train] resume:", flush=True) if rank == 0 else None
        resume = checkpoint.resolve_resume(self.run_dir, cfg.resume, notice)  # verified
        saved = checkpoint.read_trainer_state(*resume) if resume is not None else None
        where = str(resume[0] / resume[1]) if resume is not None else ""
        self.split = split = split_batch(cfg, world, saved, where)
        torch.manual_seed(cfg.seed)
        model = build_objective(cfg.model, cfg.infotok, cfg.loss_weight_i2t, cfg.loss_weight_t2i)
        latents = latent_source(
            cfg.data.datasets(),
            model.adapter,
            cfg.precision,
            cfg.data.latent_cache,
            partial(print, "[train] latent cache:", flush=True) if rank == 0 else None,
        )
        # The recipe copy in each checkpoint records the path taken (replay takes it too).
        cfg.data.latent_cache = "required" if latents is not None else "off"
        self.flops_per_sample = plan.flops_per_sample(
            model,
            cfg.data.micro_batch_i2t,
            cfg.data.micro_batch_t2i,
            cached_latents=latents is not None,
        )  # counted on fake tensors: the model's weights and the RNG streams are untouched
        self.generator = torch.Generator(device=dev)
        self.loader = TwoStreamLoader(
            cfg.data,
            model.adapter.processor,
            model.adapter.collate,
            rank=rank,
            world_size=world,
            grad_accum=split.grad_accum,
            pin_memory=dev.type == "cuda",
            latents=latents,
        )
        if saved is not None:
            try:
                self.loader.load_state_dict(saved["loader"])
            except ValueError as e:  # another data set or seed: before any conversion
                raise ConfigError(f"resume: {where}: {e}") from None
        if resume is not None and split.resharded:
            into = self.run_dir / checkpoint.CHECKPOINT_DIR / checkpoint.UNIVERSAL_DIR
            resume = universal_resume(*resume, into, rank)
        self.validator = (
            Validator(cfg, model, rank=rank, world_size=world, grad_accum=split.grad_accum)
            if cfg.eval.every
            else None
        )
        groups, self.groups = optimizer_groups(
            model, cfg.optim.groups, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.heads_lr_scale
        )

        import deepspeed

        ds_config = deepspeed_config(cfg, world, split.grad_accum)
        if split.resharded:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=groups,
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
                opt, lr_lambda(cfg.optim, cfg.steps)
            ),
        )
        self.guard = GradGuard(self.engine.optimizer, cfg.optim.skip_grad_norm_above)
        self.fault = injected_fault()
        self.start = 0
        if resume is not None:
            checkpoint.load(self.engine, *resume)
            self.start = int(saved["step"])
        self.batches = iter(self.loader)
        self.done = self.start  # optimizer steps done
        self.samples_per_step = split.total

    @property
    def model(self) -> InfoTokModel:
        return self.engine.module

    def train_step(self) -> StepResult:
        """The next optimizer step: ``grad_accum`` micro-steps, then the update (skipped by
        DeepSpeed when the gradient guard finds the global norm non-finite or too large)."""
        cfg, engine = self.cfg, self.engine
        accum = self.split.grad_accum
        tokens, skipped = 0, 0
        terms: dict[str, Tensor] = {}
        samples = []
        skipped_before = engine.skipped_steps
        self.done += 1
        for micro in range(accum):
            batch = next(self.batches)
            samples.append({k: batch[k] for k in ("micro_batch", "keys", "sources")})
            skipped += sum(batch["skipped"].values())
            seed_noise(self.generator, cfg.seed, batch["step"], batch["micro_batch"])
            loss, micro_terms, n_tokens = engine(
                to_device(batch["inputs"], self.dev), self.generator
            )
            tokens += n_tokens
            if micro == 0 and self.fault and self.fault[0] == self.done:
                loss = loss * self.fault[1]
            engine.backward(loss)
            engine.step()  # the update comes at the last micro-step
            for k, v in micro_terms.items():
                terms[k] = terms.get(k, 0) + v.detach() / accum
        applied = engine.skipped_steps == skipped_before
        return StepResult(terms, tokens, skipped, applied, samples)

    def run(self) -> int:
        """Train (or resume) to ``cfg.steps``; returns the process exit code."""
        cfg, engine, rank, world = self.cfg, self.engine, self.rank, self.world
        run_dir, start = self.run_dir, self.start
        ckpt_root = run_dir / checkpoint.CHECKPOINT_DIR
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            resolved = "\n".join(f"#   {line}" for line in format_groups(self.groups))
            (run_dir / "config.yaml").write_text(
                dump_yaml(cfg) + f"# optimizer groups as resolved at start:\n{resolved}\n"
            )
        metrics = MetricsLog(
            run_dir,
            enabled=rank == 0,
            tensorboard=cfg.log.tensorboard,
            truncate_after=start,
            wandb=cfg.log.wandb,
            config=to_dict(cfg),
        )
        skip_log = StepLog(run_dir / SKIPPED_STEPS_FILE, enabled=rank == 0, truncate_after=start)
        sample_log = StepLog(
            run_dir / SAMPLES_FILE, enabled=rank == 0 and cfg.log.samples, truncate_after=start
        )
        pending_samples: list[tuple[int, list[dict[str, Any]]]] = []
        progress = ConsoleProgress(enabled=rank == 0, total_steps=cfg.steps, start_step=start)
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        progress.banner(
            recipe=f"{self.recipe or 'recipe'} -> {cfg.run_dir}",
            family=cfg.model.family,
            world_size=world,
            trainable=trained,
            frozen=sum(p.numel() for p in self.model.parameters()) - trained,
            samples_per_step=self.samples_per_step,
            grad_accum=self.split.grad_accum,
            groups=format_groups(self.groups),
            changes=self.split.changes,
        )
        stop = StopFlag(cfg.checkpoint.stop_signals)
        watchdog = self.watchdog
        retention = checkpoint.Retention(ckpt_root, cfg.checkpoint.keep_last)
        save_interval_s = cfg.checkpoint.every_minutes * 60
        last_save_time = time.monotonic()
        last_saved = start

        def save(step: int) -> None:
            nonlocal last_saved, last_save_time
            watchdog.begin(f"saving step {step}", cfg.watchdog.phase_timeout_s)
            state = {
                "step": step,
                "world_size": world,
                "grad_accum": self.split.grad_accum,
                "loader": self.loader.state_dict(),
            }
            files = {
                checkpoint.TRAINER_STATE: json.dumps(state, indent=1),
                checkpoint.RECIPE_COPY: dump_yaml(cfg),
            }
            try:
                checkpoint.save(engine, ckpt_root, step, files, retention)
            except checkpoint.SaveError:  # on every rank; main() exits EXIT_SAVE_FAILED
                close(f"checkpoint failed (exit {EXIT_SAVE_FAILED})", step)
                raise
            last_saved, last_save_time = step, time.monotonic()

        def close(outcome: str, step: int) -> None:
            watchdog.begin("finishing", cfg.watchdog.phase_timeout_s)
            metrics.close()
            retention.wait()  # old checkpoints are gone before the process ends
            progress.finish(step, outcome)

        bad_in_a_row = 0
        peak_tflops = (
            plan.peak_bf16_tflops(torch.cuda.get_device_name(self.dev))
            if self.dev.type == "cuda"
            else None
        )
        interval = LogInterval(self.dev)
        for step in range(start, cfg.steps):
            watchdog.step(step + 1)
            result = self.train_step()
            done = step + 1
            grad_norm = self.guard.norm if result.applied else None
            interval.add_step(
                result.terms, result.tokens, result.skipped_samples, result.applied, grad_norm
            )
            if not result.applied:
                self._log_skip(done, result, skip_log, progress)
            if cfg.log.samples:
                pending_samples.append((done, result.samples))
            bad_in_a_row = 0 if result.applied else bad_in_a_row + 1
            failing = bad_in_a_row >= cfg.max_nonfinite_steps
            stopping, clock_due = False, False
            if done % cfg.log.every == 0 or done == cfg.steps or failing:
                overdue = 0 < save_interval_s <= time.monotonic() - last_save_time
                record, (stopping, clock_due) = interval.reduce(stop.requested, overdue)
                record.update(
                    step=done,
                    lr=engine.get_lr()[0],
                    samples_per_s=self.samples_per_step / record["seconds"],
                    **throughput(
                        self.flops_per_sample,
                        self.samples_per_step / world,
                        record["seconds"],
                        peak_tflops,
                    ),
                    **gpu_memory(self.dev),
                )
                if self.validator and (done % cfg.eval.every == 0 or done == cfg.steps):
                    watchdog.begin(f"evaluation after step {done}", cfg.watchdog.phase_timeout_s)
                    record.update(self.validator.run(self.model, self.dev))
                metrics.write(record)
                progress.step(record)
                if cfg.log.samples:
                    for line in gather_sample_keys(pending_samples, world):
                        sample_log.write(line)
                    pending_samples = []
                interval = LogInterval(self.dev)
            if failing:
                close("stopped: too many skipped steps", done)
                raise RuntimeError(
                    f"{bad_in_a_row} consecutive steps with a non-finite loss or gradient, or a "
                    f"gradient norm above optim.skip_grad_norm_above (last: step {done}); "
                    f"stopping without saving. Lower optim.lr or check the data "
                    f"({SKIPPED_STEPS_FILE} lists the samples)."
                )
            healthy = bad_in_a_row == 0  # never checkpoint weights a bad step may have touched
            stopping = stopping and done < cfg.steps
            if healthy and (done % cfg.checkpoint.every == 0 or done == cfg.steps or clock_due):
                save(done)
            if stopping:
                if healthy and last_saved != done:
                    save(done)
                if rank == 0:
                    saved = f"saved step {done} to {ckpt_root}"
                    print(f"[train] stop signal: {saved}; exiting {EXIT_STOPPED}", flush=True)
                close(f"stopped by signal (exit {EXIT_STOPPED}, resume=auto continues)", done)
                return EXIT_STOPPED
        close("finished", cfg.steps)
        return 0

    def _log_skip(
        self, step: int, result: StepResult, log: StepLog, progress: ConsoleProgress
    ) -> None:
        """A skipped step's record with every rank's sample keys (one gather; rare)."""
        norm = float(self.guard.norm) if self.guard.norm is not None else math.nan
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, result.samples)
        reason = self.guard.reason(norm)
        log.write({"step": step, "reason": reason, "grad_norm": norm, "ranks": everyone})
        progress.skipped(step, reason)


def train(cfg: TrainConfig, layout: DistEnv | None = None, recipe: str = "") -> int:
    """Run (or resume) the job under the watchdog; returns the process exit code. A collective
    that fails because another rank died ends this rank with exit 69 and a line naming that
    rank (pipeline.watchdog)."""
    layout = init_distributed(layout)
    watchdog = Watchdog.start(cfg.watchdog, Path(cfg.run_dir), layout.rank, dist.barrier)
    try:
        code = Trainer(cfg, layout, recipe, watchdog).run()
    except BaseException as e:
        if isinstance(e, RuntimeError) and layout.world_size > 1:
            watchdog.exit_if_a_peer_failed(e)
        first_line = (str(e).splitlines() or [""])[0][:200]
        watchdog.close(ended=f"{type(e).__name__}: {first_line}")
        raise
    watchdog.close(ended=f"exit {code}")
    return code


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
        code = train(cfg, layout, args.config or "")
    except (ConfigError, PreflightError, checkpoint.ConversionError) as e:
        # every rank fails the same check (an optim.groups pattern only against the built
        # model); one line in the job log
        if layout.rank == 0:
            print(failure_line(str(e)), file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_SETUP)
    except checkpoint.SaveError as e:  # every rank, the same message; the partial save is gone
        if layout.rank == 0:
            print(f"checkpoint: FAILED: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_SAVE_FAILED)
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
