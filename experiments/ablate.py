"""Table 5 of the paper: Finetune vs InfoTok C&S vs C&S&A from the same start on the same data.

    python -m experiments.ablate --config configs/tiny_showo2.yaml --modes off,cs,csa --steps 100 --workdir runs/ablation

1. Data (unless ``--data``/``--heldout`` are given): ``data_prep synth`` train and held-out corpora
   (different seeds, ``--scene-layout``) as shards, and the package's tiny tokenizer (unless the
   recipe's exists).
2. The "original" model: the recipe's frozen autoencoder is first trained as one on the training
   images (the adapter keeps it frozen, so this happens here; ``--vae-steps 0`` keeps the recipe's),
   with the latent normalisation measured on them (``adapter.autoencoder_options``); then every
   trainable part of the recipe is pretrained (``infotok.mode=off``, its own batch and learning
   rate; ``--pretrain-override`` applies to it alone) and exported. Cached under ``WORKDIR/pretrain/<key>``,
   where the key hashes everything that determines it (recipe, overrides, budgets, seed, ranks, data
   manifests, tokenizer), and reused (the trained VAE is cached the same way under ``WORKDIR/vae/<key>``,
   apart from the pretraining).
3. One fine-tuning per mode from the exported weights (``model.path``), same seed, same data order.
4. ``pipeline.evaluate`` on the held-out data for the original and every fine-tuning, then
   ``WORKDIR/ablation.md`` (the table with deltas against the original), ``ablation.json`` and plots.

The exported original keeps the model options it was pretrained with. OpenUni trains no part of its
InternVL3 (the released one is already trained); the tiny one is random, so its LLM is pretrained here
and frozen again for the fine-tunings:

    python -m experiments.ablate --config configs/tiny_openuni.yaml --workdir runs/ablation_openuni \\
        --pretrain-override 'model.options={trainable: [llm, connector, transformer]}' \\
        'model.options={trainable: [connector, transformer]}'
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import torch
from tqdm import tqdm

import data_prep
from data_prep.scenes import BACKGROUND_RGB, GENEVAL_CATEGORIES, LAYOUTS
import pipeline
from pipeline.config import ConfigError
from pipeline.eval import report
from pipeline.eval.benchmark import accuracy_by, generation_results
from pipeline.eval.loading import load
from pipeline.eval.recon_probe import ProbeConfig, psnr, ssim, targets
from pipeline.eval.samples import benchmark_samples, iter_samples
from pipeline.evaluate import evaluate
from pipeline.export import export
from pipeline.launch import LocalRun
from pipeline.metrics import read_metrics
from pipeline.models import build_model
from pipeline.models.base import in_chunks
from pipeline.models.common.presets import deep_merge
from pipeline.models.common.processing import to_pil
from pipeline.models.common.tiny_tokenizer import make_tokenizer
from pipeline.recipe import load_train_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

MODES = ("off", "cs", "csa")
ROW_NAMES = {
    "original": "original",
    "off": "Finetune (off)",
    "cs": "C&S (cs)",
    "csa": "C&S&A (csa)",
}
DONE = "DONE.json"


@dataclass(frozen=True)
class Column:
    label: str
    get: Callable[[dict[str, Any]], float | None]
    higher_is_better: bool | None  # None: no preferred direction (the rate)
    se: Callable[[dict[str, Any]], float | None] | None = (
        None  # its standard error, where one is measured
    )


def _path(*keys: str) -> Callable[[dict[str, Any]], float | None]:
    def get(metrics: dict[str, Any]) -> float | None:
        node: Any = metrics
        for key in keys:
            if not isinstance(node, dict) or key not in node:
                return None
            node = node[key]
        return node if isinstance(node, (int, float)) else None

    return get


COLUMNS = (
    Column("held-out loss_i2t", _path("heldout", "losses", "loss_i2t"), False),
    Column("held-out loss_t2i", _path("heldout", "losses", "loss_t2i"), False),
    Column("rate z_u (nats/token)", _path("rate", "u", "nats_per_token"), None),
    Column("rate z_g (nats/token)", _path("rate", "g", "nats_per_token"), None),
    Column("CKA (debiased)", _path("cka", "debiased", "value"), True),
    Column(
        "understanding acc.",
        _path("benchmark", "understanding", "overall", "accuracy"),
        True,
        _path("benchmark", "understanding", "overall", "se"),
    ),
    Column(
        "generation acc.",
        _path("benchmark", "generation", "overall", "accuracy"),
        True,
        _path("benchmark", "generation", "overall", "se"),
    ),
    Column("recon. PSNR (dB)", _path("reconstruction", "psnr"), True),
    Column("recon. SSIM", _path("reconstruction", "ssim"), True),
)


# ----------------------------------------------------------------------------- data and the original model


def synth_corpus(directory: Path, count: int, seed: int, layout: str) -> Path:
    """``data_prep synth`` + ``shard`` into ``directory/shards``, reused when made with the same arguments
    (``directory/corpus.json``); the intermediate PNG/jsonl corpus is removed once sharded (the shards
    hold every record)."""
    shards, source, recipe = directory / "shards", directory / "synth", directory / "corpus.json"
    arguments = {"count": count, "seed": seed, "size": 64, "layout": layout}
    if (
        (shards / "manifest.json").is_file()
        and recipe.is_file()
        and json.loads(recipe.read_text()) == arguments
    ):
        return shards
    shutil.rmtree(directory, ignore_errors=True)
    jsonl = data_prep.synth(source, **arguments)
    data_prep.shard([f"jsonl:{jsonl}"], shards, shard_size=256)
    shutil.rmtree(source)
    recipe.write_text(json.dumps(arguments))
    return shards


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


SOURCE_DIRS = (Path(pipeline.__file__).resolve().parent, Path(__file__).resolve().parent)
"""The library and these experiments: their presets and training code decide a cached result."""


def cache_key(**parts: Any) -> str:
    """Hash of everything a cached artefact depends on: ``parts`` (data directories enter by their
    manifests) and the source in ``SOURCE_DIRS``."""
    parts["code"] = _digest([p for d in SOURCE_DIRS for p in d.rglob("*.py")])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def manifests(datasets: list[str]) -> list[str]:
    return [_digest([Path(d) / "manifest.json"]) for d in datasets]


def foreground(x: torch.Tensor, tolerance: float = 0.1) -> torch.Tensor:
    """[B, 1, ...] 1.0 where a pixel of ``x`` (in [-1, 1], channels on dim 1) is not the scenes' background."""
    background = (
        torch.tensor(BACKGROUND_RGB, dtype=x.dtype).view(1, 3, *([1] * (x.ndim - 2))) / 127.5 - 1
    )
    return ((x - background).abs().amax(1, keepdim=True) > tolerance).to(x.dtype)


def alternate(*iterables: Iterable[Any]) -> Iterator[Any]:
    """The iterables' items in turn (a, b, a, b, ...) until every one is exhausted."""
    missing = object()
    for group in itertools.zip_longest(*iterables, fillvalue=missing):
        yield from (item for item in group if item is not missing)


def random_crops(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random crop of half the side from each image [B, C, S, S], starting at a multiple of S/4.

    The autoencoders are convolutional, so a crop teaches them what a whole scene does at a quarter
    of the cost. Starts on the S/4 lattice keep each crop in phase with the autoencoder's stride
    (4–8 px at the tiny recipes' 32–64 px), as the whole images it will encode are.
    """
    side = images.shape[-1]
    size, step = side // 2, side // 4
    starts = (torch.randint(0, 3, (len(images), 2), generator=generator) * step).tolist()
    return torch.stack(
        [image[:, y : y + size, x : x + size] for image, (y, x) in zip(images, starts)]
    )


def pretrain_vae(
    recipe: Path,
    overrides: list[str],
    data: list[str],
    heldout: list[str],
    steps: int,
    seed: int,
    output: Path,
    batch_size: int = 16,
    lr: float = 1e-3,
    foreground_weight: float = 10.0,
    kl_weight: float = 0.0,
    max_images: int = 10000,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Train the recipe's frozen autoencoder (``adapter.vae``) on training images (the first ``max_images``,
    I2T and T2I alternating, held in memory); save it (diffusers layout).

    Each step reconstructs ``random_crops`` of the images: at equal time, four times the steps of
    whole scenes, which a tiny VAE needs to keep the palette's close colours (red, orange, yellow)
    and the shapes' corners apart. The reconstruction term weights pixels off the white background
    ``foreground_weight`` times: the shapes cover a tenth of a scene, and with a plain mean a tiny
    VAE first settles on blurred blobs of averaged colour, which the shape detector cannot read.
    ``kl_weight`` defaults to 0: under Adam even 1e-6 of KL grows the posterior noise, in 4,800
    steps, to the spread of the posterior means, and a generator trained on such latents learns
    mostly their noise. One-cycle schedule. Returns the
    model options that normalise its latents (``adapter.autoencoder_options`` on the training
    images) and its held-out quality: PSNR/SSIM, and the detector's GenEval accuracy on the
    reconstructed ground truth of the held-out T2I scenes (the ceiling of generation accuracy). The
    options do not include the recipe's own.
    """
    cfg = load_train_config(recipe, overrides)
    torch.manual_seed(seed)
    adapter = build_model(cfg.model)
    size = adapter.config.image_size
    vae = adapter.vae.requires_grad_(True).train()

    def images(records: Iterable[dict[str, Any]]) -> torch.Tensor:
        return targets([r["image"] for r in records], size) * 2 - 1

    train_x = images(
        itertools.islice(
            alternate(iter_samples(data, "i2t"), iter_samples(data, "t2i")), max_images
        )
    )
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=steps, pct_start=0.05
    )
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="VAE", unit="step", disable=None):
        x = random_crops(
            train_x[torch.randint(len(train_x), (batch_size,), generator=generator)], generator
        )
        reconstruction, kl = adapter.autoencoder_pass(x, generator)
        weight = 1 + (foreground_weight - 1) * foreground(x)
        loss = (weight * (reconstruction - x).square()).mean() + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.requires_grad_(False).eval()
    scenes = benchmark_samples(heldout, "t2i", 200)
    test_x = images(scenes)
    with torch.no_grad():
        options = adapter.autoencoder_options(train_x)
        decoded = in_chunks(lambda x: adapter.autoencoder_pass(x)[0], test_x).clamp(-1, 1)
    vae.save_pretrained(str(output))
    detected = generation_results([r["meta"] for r in scenes], to_pil(decoded))
    original, decoded = (test_x + 1) / 2, (decoded + 1) / 2
    quality = {
        "steps": steps,
        "train_images": len(train_x),
        "heldout_images": len(test_x),
        "psnr": float(psnr(decoded, original).mean()),
        "ssim": float(ssim(decoded, original).mean()),
        "detector_accuracy": accuracy_by(detected, "category", GENEVAL_CATEGORIES)
        .get("overall", {})
        .get("accuracy"),
    }
    return options, quality


def train(recipe: Path, overrides: list[str], log_dir: Path, ranks: int) -> None:
    run = LocalRun(str(recipe), overrides, log_dir, world=ranks)
    codes = run.wait(timeout=4 * 3600)
    if codes != [0] * ranks:
        raise RuntimeError(f"trainer exited with {codes}:\n{run.output()}")


def cache_entry(root: Path, key: str, what: str) -> tuple[Path, dict[str, Any] | None]:
    """``root/key`` with its ``DONE.json`` record when complete; otherwise that directory emptied and None."""
    home = root / key
    if (home / DONE).is_file():
        print(f"[ablate] original model: cached {what} {home}", flush=True)
        return home, json.loads((home / DONE).read_text())
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    return home, None


def trained_autoencoder(
    recipe: Path,
    overrides: list[str],
    args: argparse.Namespace,
    data: list[str],
    heldout: list[str],
) -> tuple[Path, dict[str, Any]]:
    """The recipe's VAE trained as an autoencoder (``pretrain_vae``), cached apart from the pretraining
    so that a new pretraining budget reuses it: its directory and ``{"options", "quality"}``."""
    key = cache_key(
        recipe=recipe.read_text(),
        overrides=overrides,
        steps=args.vae_steps,
        seed=args.seed,
        data=manifests(data),
        heldout=manifests(heldout),
    )
    home, cached = cache_entry(args.workdir / "vae", key, "VAE")
    if cached is not None:
        return home / "vae", cached
    print(
        f"[ablate] original model: training the VAE as an autoencoder ({args.vae_steps} steps)",
        flush=True,
    )
    options, quality = pretrain_vae(
        recipe, overrides, data, heldout, args.vae_steps, args.seed, home / "vae"
    )
    info = {"key": key, "options": options, "quality": quality}
    (home / DONE).write_text(json.dumps(info, indent=2) + "\n")
    return home / "vae", info


def original_model(
    recipe: Path,
    base: list[str],
    args: argparse.Namespace,
    data: list[str],
    heldout: list[str],
    tokenizer: Path,
) -> tuple[Path, dict[str, Any]]:
    """The exported pretrained model directory and its description (cached by everything it depends on)."""
    key = cache_key(
        recipe=recipe.read_text(),
        overrides=base,
        pretrain_overrides=args.pretrain_overrides,
        steps=args.pretrain_steps,
        batch=(args.pretrain_batch_i2t, args.pretrain_batch_t2i),
        lr=args.pretrain_lr,
        vae_steps=args.vae_steps,
        seed=args.seed,
        ranks=args.ranks,
        data=manifests(data),
        heldout=manifests(heldout),
        tokenizer=_digest([p for p in tokenizer.iterdir() if p.is_file()]),
    )
    home, cached = cache_entry(args.workdir / "pretrain", key, "model")
    if cached is not None:
        return home / "model", cached
    began = time.monotonic()
    shared = [*base, f"model.tokenizer_path={tokenizer}"]
    overrides = [*shared, *args.pretrain_overrides]
    info: dict[str, Any] = {
        "key": key,
        "steps": args.pretrain_steps,
        "overrides": args.pretrain_overrides,
        "batch": {"i2t": args.pretrain_batch_i2t, "t2i": args.pretrain_batch_t2i},
        "lr": args.pretrain_lr,
        "vae": None,
    }
    if args.vae_steps:
        vae_dir, vae = trained_autoencoder(recipe, shared, args, data, heldout)
        options = deep_merge(load_train_config(recipe, overrides).model.options, vae["options"])
        overrides += [f"model.vae_path={vae_dir}", f"model.options={json.dumps(options)}"]
        info["vae"] = vae["quality"]
    print(
        f"[ablate] original model: pretraining every trainable part ({args.pretrain_steps} steps, "
        f"infotok.mode=off, {args.ranks} ranks)",
        flush=True,
    )
    run_dir = home / "run"
    train(
        recipe,
        [
            *overrides,
            f"run_dir={run_dir}",
            f"steps={args.pretrain_steps}",
            "infotok.mode=off",
            f"data.micro_batch_i2t={args.pretrain_batch_i2t}",
            f"data.micro_batch_t2i={args.pretrain_batch_t2i}",
            f"optim.lr={args.pretrain_lr}",
            f"optim.warmup_steps={max(1, args.pretrain_steps // 20)}",
            "resume=none",
            f"checkpoint.every={args.pretrain_steps}",
            "checkpoint.keep_last=1",
        ],
        home / "logs",
        args.ranks,
    )
    export(run_dir, home / "model")
    info["seconds"] = round(time.monotonic() - began, 1)
    (home / DONE).write_text(json.dumps(info, indent=2) + "\n")
    return home / "model", info


# ----------------------------------------------------------------------------- the table


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per model, every column with its delta against the original (accuracies with
    their standard error)."""
    columns = [c for c in COLUMNS if any(c.get(m) is not None for m in rows.values())]
    arrows = {True: " ↑", False: " ↓", None: ""}
    lines = [
        "| model | " + " | ".join(c.label + arrows[c.higher_is_better] for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    original = rows["original"]
    for name, metrics in rows.items():
        cells = []
        for c in columns:
            value, base = c.get(metrics), c.get(original)
            se = c.se(metrics) if c.se else None
            cell = _fmt(value) + ("" if se is None else f" ± {se:.3f}")
            if name != "original" and value is not None and base is not None:
                cell += f" ({value - base:+.4f})"
            cells.append(cell)
        lines.append(f"| {ROW_NAMES[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_metrics(rows: dict[str, dict[str, Any]], path: Path) -> None:
    columns = [c for c in COLUMNS if any(c.get(m) is not None for m in rows.values())]
    cols = min(3, len(columns))
    fig, axes = plt.subplots(
        -(-len(columns) // cols),
        cols,
        figsize=(4.2 * cols, 3.0 * -(-len(columns) // cols)),
        squeeze=False,
    )
    colours = ["#8c8c8c", "#4c72b0", "#dd8452", "#55a868"]
    for ax, c in zip(axes.flat, columns):
        names = [n for n in rows if c.get(rows[n]) is not None]
        ax.bar(
            [ROW_NAMES[n] for n in names],
            [c.get(rows[n]) for n in names],
            color=[colours[list(rows).index(n)] for n in names],
        )
        ax.set_title(c.label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=25, labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(runs: dict[str, Path], path: Path) -> None:
    """The fine-tunings' task losses over steps, one line per mode."""
    keys = ("loss_i2t", "loss_t2i", "loss")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.0), squeeze=False)
    for mode, run_dir in runs.items():
        records = read_metrics(run_dir)
        for ax, key in zip(axes[0], keys):
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), lw=1.2, label=ROW_NAMES[mode])
    for ax, key in zip(axes[0], keys):
        ax.set_title(key)
        ax.set_xlabel("fine-tuning step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _baseline_line(metrics: dict[str, Any]) -> str:
    """What chance scores on the held-out benchmark (understanding: the majority answer; generation:
    flawless scenes that ignore the prompt)."""
    understanding = _path("benchmark", "understanding_majority_baseline", "overall", "accuracy")(
        metrics
    )
    generation = _path("benchmark", "generation_prompt_agnostic_baseline", "overall", "accuracy")(
        metrics
    )
    line = (
        ""
        if understanding is None
        else (
            f"Answering every held-out question with the most common answer of "
            f"its type would score {understanding:.4f} (understanding accuracy). "
        )
    )
    if generation is not None:
        line += (
            f"Scoring each held-out prompt against the other prompts' ground-truth images (flawless shapes that "
            f"ignore the prompt) gives {generation:.4f} (generation accuracy). "
        )
    return line


def write_report(
    args: argparse.Namespace,
    rows: dict[str, dict[str, Any]],
    runs: dict[str, Path],
    pretrained: dict[str, Any],
    seconds: float,
) -> str:
    out = args.workdir
    plot_metrics(rows, out / "ablation_metrics.png")
    plot_curves(runs, out / "ablation_curves.png")
    vae = pretrained["vae"]
    vae_line = (
        "the recipe's VAE was kept as is (--vae-steps 0)"
        if vae is None
        else f"its VAE was first trained as an autoencoder for {vae['steps']} steps on {vae['train_images']} "
        f"training images (held-out reconstruction PSNR {vae['psnr']:.2f} dB, SSIM {vae['ssim']:.3f}; "
        f"the shape detector passes {vae['detector_accuracy']:.0%} of the held-out T2I scenes after a "
        f"round trip through it, the ceiling of generation accuracy)"
    )
    overrides = "".join(f", `{o}`" for o in pretrained["overrides"])
    batch = pretrained["batch"]
    lines = [
        f"# Ablation: `{args.config}` (Table 5)",
        "",
        f"Original: {pretrained['steps']} pretraining steps of {batch['i2t']} I2T + {batch['t2i']} T2I samples per "
        f"rank at peak lr {pretrained['lr']:g} (`infotok.mode=off`, every trainable part{overrides}; "
        f"cache key `{pretrained['key']}`); {vae_line}. Each fine-tuning: {args.steps} steps from the exported "
        f"original, seed {args.seed}, the same data order, {args.ranks} ranks. Held-out: "
        f"{', '.join(f'`{d}`' for d in args.heldout)}. Deltas are against the original; the rate exists only "
        f"where InfoTok heads were trained. {_baseline_line(rows['original'])}Total time {seconds / 60:.1f} min.",
        "",
        table(rows),
        "",
        "Per-model reports: "
        + ", ".join(f"[{ROW_NAMES[n]}](eval/{n}/report.md)" for n in rows)
        + ".",
        "",
        "![metrics](ablation_metrics.png)",
        "",
        "![fine-tuning curves](ablation_curves.png)",
        "",
    ]
    text = "\n".join(lines)
    (out / "ablation.md").write_text(text)
    report.write_metrics(
        {
            "rows": rows,
            "pretrained": pretrained,
            "steps": args.steps,
            "seed": args.seed,
            "modes": list(runs),
            "seconds": round(seconds, 1),
        },
        out / "ablation.json",
    )
    return text


# ----------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> str:
    began = time.monotonic()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if args.data is None:
        args.data = [
            str(synth_corpus(work / "data" / "train", args.samples, args.seed, args.scene_layout))
        ]
    if args.heldout is None:
        args.heldout = [
            str(
                synth_corpus(
                    work / "data" / "heldout",
                    args.heldout_samples,
                    args.seed + 1,
                    args.scene_layout,
                )
            )
        ]
    tokenizer = work / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        make_tokenizer(tokenizer)
    data = [
        f"data.i2t=[{','.join(args.data)}]",
        f"data.t2i=[{','.join(args.data)}]",
        f"seed={args.seed}",
        "log.tensorboard=false",
    ]
    base = [*data, *args.overrides]
    load_train_config(
        args.config, [*base, *args.pretrain_overrides]
    )  # fail on a bad override before any work
    model_dir, pretrained = original_model(
        args.config, base, args, args.data, args.heldout, tokenizer
    )

    runs = {}
    for mode in args.modes:
        run_dir = work / "finetune" / mode
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[ablate] fine-tuning {ROW_NAMES[mode]}: {args.steps} steps", flush=True)
        train(
            args.config,
            [
                *base,
                f"model.path={model_dir}",
                f"model.tokenizer_path={model_dir}",
                f"infotok.mode={mode}",
                f"run_dir={run_dir}",
                f"steps={args.steps}",
                "resume=none",
                f"checkpoint.every={args.steps}",
                "checkpoint.keep_last=1",
            ],
            work / "logs" / mode,
            args.ranks,
        )
        runs[mode] = run_dir

    probe = (
        ProbeConfig(
            train_images=args.recon_train,
            test_images=args.recon_test,
            steps=args.recon_steps,
            seed=args.seed,
        )
        if args.recon_steps
        else None
    )
    rows = {}
    for name, source in {"original": model_dir, **runs}.items():
        print(f"[ablate] evaluating {ROW_NAMES[name]}", flush=True)
        rows[name] = evaluate(
            load(source),
            args.heldout,
            work / "eval" / name,
            samples=args.eval_samples,
            batch_size=8,
            batches=args.eval_batches,
            resamples=args.bootstrap,
            seed=args.seed,
            probe=probe,
        )
    return write_report(args, rows, runs, pretrained, time.monotonic() - began)


def _modes(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated subset of {', '.join(MODES)}"
        )
    return modes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", required=True, type=Path, help="YAML recipe (e.g. configs/tiny_showo2.yaml)"
    )
    parser.add_argument(
        "--modes", type=_modes, default=list(MODES), help="fine-tunings to run (default off,cs,csa)"
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="optimizer steps of each fine-tuning"
    )
    parser.add_argument(
        "--workdir", required=True, type=Path, help="everything goes here; the original is cached"
    )
    parser.add_argument(
        "--pretrain-steps", type=int, default=3000, help="steps that make the original model"
    )
    parser.add_argument(
        "--pretrain-batch-i2t", type=int, default=16, help="pretraining I2T micro-batch per rank"
    )
    parser.add_argument(
        "--pretrain-batch-t2i", type=int, default=16, help="pretraining T2I micro-batch per rank"
    )
    parser.add_argument(
        "--pretrain-lr", type=float, default=2e-3, help="pretraining peak learning rate"
    )
    parser.add_argument(
        "--pretrain-override",
        dest="pretrain_overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the pretraining only, after the ones for "
        "every run (repeatable; see above for OpenUni)",
    )
    parser.add_argument(
        "--vae-steps",
        type=int,
        default=4800,
        help="steps training the recipe's VAE / autoencoder (0: keep it)",
    )
    parser.add_argument(
        "--data", action="append", help="training shards (default: a synthetic corpus)"
    )
    parser.add_argument(
        "--heldout", action="append", help="held-out shards (default: a synthetic corpus)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=100000,
        help="synthetic training scenes (pretraining repeats each only a few times)",
    )
    parser.add_argument(
        "--heldout-samples", type=int, default=400, help="synthetic held-out scenes"
    )
    parser.add_argument(
        "--scene-layout",
        choices=LAYOUTS,
        default="grid",
        help="synthetic scenes' layout (data_prep synth --layout; default grid: a tiny model learns "
        "to draw the free layout's arbitrary offsets only as blobs)",
    )
    parser.add_argument(
        "--ranks", type=int, default=2, help="local trainer processes (DeepSpeed, gloo)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=192,
        help="benchmark items per task, capped by the held-out corpus (fewer items, larger "
        "standard errors: about 0.03 for generation at 64)",
    )
    parser.add_argument(
        "--eval-batches", type=int, default=16, help="held-out loss batches (of 8 + 8)"
    )
    parser.add_argument("--bootstrap", type=int, default=200, help="CKA bootstrap resamples")
    parser.add_argument(
        "--recon-steps", type=int, default=300, help="reconstruction probe decoder steps (0: off)"
    )
    parser.add_argument("--recon-train", type=int, default=256)
    parser.add_argument("--recon-test", type=int, default=64)
    parser.add_argument(
        "overrides", nargs="*", help="recipe overrides for every run, e.g. optim.lr=5e-4"
    )
    args = parser.parse_args(argv)
    args.config = args.config if args.config.is_absolute() else (Path.cwd() / args.config)
    args.workdir = args.workdir.resolve()
    for name in (
        "steps",
        "pretrain_steps",
        "pretrain_batch_i2t",
        "pretrain_batch_t2i",
        "samples",
        "heldout_samples",
        "ranks",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        text = run(args)
    except (FileNotFoundError, ValueError, ConfigError, RuntimeError) as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(text)
    print(f"wrote {args.workdir / 'ablation.md'}")


if __name__ == "__main__":
    main()
