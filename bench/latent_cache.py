"""What does a latent cache save? Training steps that read cached VAE posteriors against steps that
encode every image on the fly, measured in one run; and the planner's prediction at real size.

(a) Measured on the three tiny CPU recipes (``configs/tiny_*.yaml``). A synthetic dataset of
``--samples`` scenes of ``--size`` px is sharded and encoded once per family (``pipeline.encode``,
which ``python -m data_prep encode`` runs). The model is built as the trainer builds it (the
recipe's seed, ``build_objective``, AdamW over its optimizer groups). Two loaders give the same
samples in the same order, one with ``data.latent_cache=off`` and one with ``required``; both
take their batches in the main process (no workers), so the loader's time per batch is timed apart
from the step's (forward, backward, optimizer step, the noise seeded as the trainer seeds it). The
two alternate batch by batch (A B B A ...) on the same model after 1 + ``--warmup`` untimed steps
each. The table gives medians, and as each ratio cached / on the fly the median of the rounds'
ratios: a round's two batches run back to back, so a machine that slows down for a while slows
both. In a run the loader's workers prepare batches beside the step, so the step column is what a
run with enough workers sees. Beside it, the ratio FLOPs predict for the same batch: 1 - the
frozen autoencoder's share of the step's FLOPs (``pipeline.plan.profile_step``; the optimizer
step, in the measured time, has none it counts). The first batch's loss is compared between the
two loaders (same samples, weights and noise), and the one-off encode is timed (model build
included).

(b) Predicted for the six released recipes: ``pipeline.plan.plan_recipe`` on 16 H100s, the
frozen autoencoder's share of a micro-step's FLOPs (``Plan.latent_cache_saving``), the step time
that leaves (1 - share) and the speed-up 1 / (1 - share) at the same MFU. Tens of seconds each.

    python bench/latent_cache.py [--samples 64] [--size 256] [--steps 20] [--warmup 2]
    python bench/latent_cache.py --smoke  # seconds: Show-o2 only, 3 steps, harmon_0.5b planned

``--smoke``: the test suite runs it so the bench cannot rot; its figures mean nothing. On a shared
machine run it with ``OMP_NUM_THREADS=1``: with more OpenMP threads than free cores, step times
swing tenfold from one minute to the next.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data_prep  # noqa: E402
from bench.measure import parse_args  # noqa: E402
from data_prep.latents import cache_dir, read_cache_manifest  # noqa: E402
from pipeline import encode, plan  # noqa: E402
from pipeline.data import TwoStreamLoader  # noqa: E402
from pipeline.latent_cache import latent_source  # noqa: E402
from pipeline.models.common.tiny_tokenizer import make_tokenizer  # noqa: E402
from pipeline.noise import seed_noise  # noqa: E402
from pipeline.objective import InfoTokModel, build_objective  # noqa: E402
from pipeline.param_groups import optimizer_groups  # noqa: E402
from pipeline.recipe import TrainConfig, load_train_config  # noqa: E402

FAMILIES = ("showo2", "harmon", "openuni")
RECIPES = (
    "showo2_1.5b",
    "showo2_7b",
    "harmon_0.5b",
    "harmon_1.5b",
    "openuni_b_512",
    "openuni_l_512",
)
MODES = ("off", "required")
GPUS = 16


@dataclass(frozen=True)
class Measured:
    """One tiny family: seconds per batch, per ``data.latent_cache`` mode (medians), and the
    rounds' ratios cached / on the fly."""

    family: str
    micro: str
    """I2T+T2I samples per step."""
    tasks: tuple[str, ...]
    encode_ms_per_image: float
    load: dict[str, float]
    step: dict[str, float]
    load_ratio: float
    """Median of the rounds' loader ratios."""
    step_ratio: tuple[float, float, float]
    """Quartiles (first, median, third) of the rounds' step ratios."""
    flop_ratio: float
    """1 - the frozen autoencoder's share of the FLOPs of the first batch's step."""
    loss_rel_diff: float
    """|loss cached - loss on the fly| / |loss on the fly| on the first batch, same weights."""


def make_dataset(root: Path, samples: int, size: int) -> tuple[Path, Path]:
    """Shards of ``samples`` synthetic scenes (both tasks) and the tiny tokenizer."""
    source = data_prep.synth(root / "synth", samples, size=size)
    data_prep.shard([f"jsonl:{source}"], root / "shards", shard_size=16)
    return root / "shards", make_tokenizer(root / "tokenizer")


def tiny_recipe(family: str, shards: Path, tokenizer: Path) -> list[str]:
    """The tiny recipe's path and its overrides: the dataset for both tasks, the tokenizer."""
    return [
        str(ROOT / f"configs/tiny_{family}.yaml"),
        f"data.i2t=[{shards}]",
        f"data.t2i=[{shards}]",
        f"model.tokenizer_path={tokenizer}",
    ]


def tiny_config(family: str, shards: Path, tokenizer: Path) -> TrainConfig:
    """The tiny recipe as the trainer loads it, its batches made in the main process."""
    recipe, *overrides = tiny_recipe(family, shards, tokenizer)
    cfg = load_train_config(recipe, overrides)
    return replace(cfg, data=replace(cfg.data, num_workers=0))


def encode_cache(family: str, shards: Path, tokenizer: Path) -> float:
    """Encode the dataset's cache for ``family`` as ``python -m data_prep encode`` does; seconds
    per image (model build included)."""
    start = time.perf_counter()
    code = encode.main(["--config", *tiny_recipe(family, shards, tokenizer)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"encode {family}: exit {code}")
    manifest = read_cache_manifest(cache_dir(shards, family))
    return seconds / manifest["totals"]["samples"]


def loaders(cfg: TrainConfig, model: InfoTokModel) -> dict[str, TwoStreamLoader]:
    """One loader per ``data.latent_cache`` mode, the same samples in the same order."""
    adapter = model.adapter
    return {
        mode: TwoStreamLoader(
            cfg.data,
            adapter.processor,
            adapter.collate,
            latents=latent_source(cfg.data.datasets(), adapter, cfg.precision, mode),
        )
        for mode in MODES
    }


def flop_ratio(model: InfoTokModel, inputs: dict[str, Any]) -> float:
    """1 - the frozen autoencoder's share of one step's FLOPs on ``inputs`` (fake tensors)."""
    profile = plan.profile_step(model, inputs, memory=False)
    return 1 - profile.flops_by_part[type(model.adapter).FROZEN_MODULE] / profile.flops


def first_losses(
    model: InfoTokModel, batches: dict[str, dict[str, Any]], seed: int
) -> dict[str, float]:
    """Each mode's loss on its first batch, same weights and noise, no update."""
    out = {}
    generator = torch.Generator()
    with torch.no_grad():
        for mode, batch in batches.items():
            seed_noise(generator, seed, batch["step"], batch["micro_batch"])
            out[mode] = model(batch["inputs"], generator)[0].item()
    return out


def paired_ratios(seconds: dict[str, list[float]]) -> tuple[float, float, float]:
    """Quartiles over the rounds of the round's time cached / on the fly."""
    ratios = [c / o for c, o in zip(seconds["required"], seconds["off"])]
    q1, median, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, median, q3


def measure_family(
    family: str, shards: Path, tokenizer: Path, args: argparse.Namespace
) -> Measured:
    """Encode, then alternate the two loaders' batches through one model's training steps."""
    encoded = encode_cache(family, shards, tokenizer)
    cfg = tiny_config(family, shards, tokenizer)
    torch.manual_seed(cfg.seed)
    model = build_objective(cfg.model, cfg.infotok, cfg.loss_weight_i2t, cfg.loss_weight_t2i)
    model.train()
    groups, _ = optimizer_groups(
        model, cfg.optim.groups, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.heads_lr_scale
    )
    optimizer = torch.optim.AdamW(groups)
    generator = torch.Generator()
    streams = {mode: iter(loader) for mode, loader in loaders(cfg, model).items()}

    def step(batch: dict[str, Any]) -> None:
        seed_noise(generator, cfg.seed, batch["step"], batch["micro_batch"])
        loss, _, _ = model(batch["inputs"], generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    load: dict[str, list[float]] = {m: [] for m in MODES}
    steps: dict[str, list[float]] = {m: [] for m in MODES}
    first = {mode: next(stream) for mode, stream in streams.items()}
    losses = first_losses(model, first, cfg.seed)
    ratio = flop_ratio(model, first["off"]["inputs"])
    for batch in first.values():
        step(batch)
    for i in range(args.warmup + args.steps):
        for mode in MODES if i % 2 == 0 else MODES[::-1]:
            start = time.perf_counter()
            batch = next(streams[mode])
            loaded = time.perf_counter()
            step(batch)
            if i >= args.warmup:
                load[mode].append(loaded - start)
                steps[mode].append(time.perf_counter() - loaded)
    return Measured(
        family=family,
        micro=f"{cfg.data.micro_batch_i2t}+{cfg.data.micro_batch_t2i}",
        tasks=type(model.adapter).LATENT_TASKS,
        encode_ms_per_image=encoded * 1e3,
        load={m: statistics.median(t) for m, t in load.items()},
        step={m: statistics.median(t) for m, t in steps.items()},
        load_ratio=paired_ratios(load)[1],
        step_ratio=paired_ratios(steps),
        flop_ratio=ratio,
        loss_rel_diff=abs(losses["required"] - losses["off"]) / abs(losses["off"]),
    )


def measured_table(rows: list[Measured]) -> list[str]:
    lines = [
        "| recipe | I2T+T2I | VAE encodes | encode once (ms/image) | loader on the fly (ms/batch) "
        "| loader cached (ms/batch) | cached / on the fly | step on the fly (ms) "
        "| step cached (ms) | cached / on the fly | middle half of the rounds | FLOPs predict "
        "| first loss rel. diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        load, step, (q1, ratio, q3) = r.load, r.step, r.step_ratio
        lines.append(
            f"| {r.family} tiny | {r.micro} | {'+'.join(r.tasks)} | {r.encode_ms_per_image:.1f} "
            f"| {load['off'] * 1e3:.2f} | {load['required'] * 1e3:.2f} | {r.load_ratio:.2f} "
            f"| {step['off'] * 1e3:.1f} | {step['required'] * 1e3:.1f} | {ratio:.2f} "
            f"| {q1:.2f}-{q3:.2f} | {r.flop_ratio:.2f} | {r.loss_rel_diff:.1e} |"
        )
    return lines


def planned_row(recipe: str) -> str:
    """The planner's latent-cache figures for one released recipe, as a table row."""
    path = f"configs/{recipe}.yaml"
    p = plan.plan_recipe(load_train_config(ROOT / path), GPUS, plan.DEVICES["h100"], path)
    total, share = p.flops_per_sample, p.latent_cache_saving
    return (
        f"| {path} | {total / 1e9:,.0f} | {total * share / 1e9:,.0f} | {share:.1%} "
        f"| {1 - share:.3f} | {p.latent_cache_speedup:.3f}x |"
    )


def planned_table(recipes: list[str]) -> list[str]:
    return [
        "| recipe | GFLOP/sample | VAE GFLOP/sample | VAE share | step time cached / on the fly "
        "| speed-up at the same MFU |",
        "|---|---:|---:|---:|---:|---:|",
        *(planned_row(recipe) for recipe in recipes),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=64, help="synthetic scenes in the dataset")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per mode (median)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps per mode after the first"
    )
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), choices=RECIPES)
    args = parse_args(
        parser,
        {
            "samples": 16,
            "size": 64,
            "steps": 3,
            "warmup": 1,
            "families": ["showo2"],
            "recipes": ["harmon_0.5b"],
        },
    )
    if args.steps < 2:
        parser.error(f"--steps: at least 2 (the ratios' quartiles), got {args.steps}")
    with tempfile.TemporaryDirectory(prefix="bench-latent-cache-") as tmp:
        shards, tokenizer = make_dataset(Path(tmp), args.samples, args.size)
        rows = [measure_family(f, shards, tokenizer, args) for f in args.families]
    print(
        f"\n(a) measured: {args.samples} scenes of {args.size} px, "
        f"CPU, {torch.get_num_threads()} torch thread(s), no loader workers, median of "
        f"{args.steps} steps per mode after {1 + args.warmup}, modes alternating"
    )
    print("\n".join(measured_table(rows)))
    skipped = sorted(set(RECIPES) - set(args.recipes))
    print(
        f"\n(b) planned: one micro-step of each recipe on fake tensors, {GPUS} x H100; "
        "the VAE only encodes, in the forward"
        + (f" (not planned in this run: {', '.join(skipped)})" if skipped else "")
    )
    print("\n".join(planned_table(args.recipes)))


if __name__ == "__main__":
    main()
