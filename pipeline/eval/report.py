"""``report.md``, ``metrics.json`` and the PNG plots of an evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

from pipeline.metrics import LOSS_TERMS  # noqa: E402


def plot_training_curves(records: list[dict[str, Any]], path: Path) -> bool:
    """One panel per logged loss term over optimizer steps; False when nothing was logged."""
    keys = [k for k in LOSS_TERMS if any(_finite(r.get(k)) for r in records)]
    if not keys:
        return False
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
        ax.plot(*zip(*points), lw=1.2)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy_bars(table: dict[str, dict[str, float]], title: str, path: Path) -> None:
    names = list(table)
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 3.2))
    bars = ax.bar(
        names,
        [table[n]["accuracy"] for n in names],
        yerr=[table[n]["se"] for n in names],
        capsize=3,
        color=["#4c72b0" if n != "overall" else "#dd8452" for n in names],
    )
    for bar, name in zip(bars, names):
        ax.annotate(
            f"{table[name]['accuracy']:.2f}\n(n={table[name]['n']})",
            (bar.get_x() + bar.get_width() / 2, bar.get_height() + table[name]["se"]),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reconstructions(originals: Any, reconstructions: Any, path: Path) -> None:
    """Held-out images (top row) over the probe decoder's reconstructions (bottom row)."""
    k = len(originals)
    fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 2.9), squeeze=False)
    for row, (images, label) in enumerate(((originals, "image"), (reconstructions, "probe"))):
        for col in range(k):
            ax = axes[row][col]
            ax.imshow(images[col].permute(1, 2, 0).clamp(0, 1).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row][0].set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_metrics(metrics: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True, allow_nan=False) + "\n")


def markdown(metrics: dict[str, Any], plots: list[str]) -> str:
    m = metrics
    lines = [f"# Evaluation of `{m['model']['source']}`", ""]
    if m["model"].get("step") is not None:
        lines.append(
            f"Step {m['model']['step']}, family `{m['model']['family']}`, InfoTok mode "
            f"`{m['model']['infotok_mode']}`; held-out data: "
            f"{', '.join(f'`{d}`' for d in m['data'])}."
        )
    else:
        lines.append(
            f"Family `{m['model']['family']}`; held-out data: "
            f"{', '.join(f'`{d}`' for d in m['data'])}."
        )
    h = m["heldout"]
    lines += [
        "",
        f"## Held-out losses ({h['batches']} batches; samples: "
        f"{', '.join(f'{k} {v}' for k, v in h['samples'].items())})",
        "",
        "| term | value |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in h["losses"].items()]
    if m.get("rate"):
        lines += [
            "",
            "Rate of the shared tokens (KL to N(0, I)): "
            + "; ".join(f"{b}: {r['nats_per_token']:.3f} nats/token" for b, r in m["rate"].items())
            + ".",
        ]
    if h["notes"]:
        lines += ["", *[f"_{n}_" for n in h["notes"]]]
    c = m.get("cka")
    if c:
        lines += [
            "",
            "## CKA (mean-pooled z_u vs pooled text features)",
            "",
            "| estimator | CKA | 95% CI | n |",
            "|---|---:|---|---:|",
        ]
        for name, e in c.items():
            lines.append(
                f"| {name} | {e['value']:.4f} | [{e['ci_low']:.4f}, {e['ci_high']:.4f}] "
                f"| {e['n']} |"
            )
    r = m.get("reconstruction")
    if r:
        cfg, base = r["config"], r["baseline_mean_image"]
        fid = "n/a (no --inception)" if r["fid"] is None else f"{r['fid']:.2f}"
        lines += [
            "",
            f"## Reconstruction probe (frozen V_enc, {cfg['steps']}-step decoder on "
            f"{cfg['train_images']} "
            f"images, scored on {cfg['test_images']} held-out; {r['resolution']} px, "
            f"{r['token_grid']}×{r['token_grid']} token grid)",
            "",
            "| metric | probe | mean-image baseline |",
            "|---|---:|---:|",
            f"| PSNR (dB) | {r['psnr']:.2f} | {base['psnr']:.2f} |",
            f"| SSIM | {r['ssim']:.4f} | {base['ssim']:.4f} |",
            f"| FID | {fid} | |",
        ]
    benchmark = m.get("benchmark", {})
    if benchmark.get("understanding"):
        lines += [
            "",
            "## Understanding accuracy by question type",
            "",
            "The baseline answers every question with the most common answer of its type on these "
            "items; "
            "± is one standard error over the items.",
            "",
            *_accuracy_table(
                benchmark["understanding"],
                benchmark.get("understanding_majority_baseline", {}),
                "majority-answer baseline",
            ),
        ]
        if benchmark.get("understanding_by_scene"):
            lines += [
                "",
                "Questions about a lone object against those about scenes of several objects, "
                "where each shape must be bound to its own colour and place:",
                "",
                "| scene | accuracy ± SE | n |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {g} | {accuracy_cell(v)} | {v['n']} |"
                for g, v in benchmark["understanding_by_scene"].items()
            ]
    if benchmark.get("generation"):
        lines += [
            "",
            "## Generation accuracy by GenEval category (shape detector)",
            "",
            "The baseline scores each prompt against the ground-truth images of the other held-out "
            "prompts: "
            "flawless shapes that ignore the prompt; ± is one standard error over the items.",
            "",
            *_accuracy_table(
                benchmark["generation"],
                benchmark.get("generation_prompt_agnostic_baseline", {}),
                "prompt-agnostic baseline",
            ),
        ]
    if plots:
        lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in plots]]
    return "\n".join(lines) + "\n"


def _accuracy_table(
    accuracy: dict[str, dict[str, float]],
    baseline: dict[str, dict[str, float]],
    baseline_label: str,
) -> list[str]:
    """Markdown rows: accuracy per group beside its baseline."""
    rows = [f"| group | accuracy ± SE | {baseline_label} | n |", "|---|---:|---:|---:|"]
    for g, v in accuracy.items():
        base = f"{baseline[g]['accuracy']:.3f}" if g in baseline else "n/a"
        rows.append(f"| {g} | {accuracy_cell(v)} | {base} | {v['n']} |")
    return rows


def accuracy_cell(entry: dict[str, float]) -> str:
    """An ``accuracy_by`` entry as ``accuracy ± standard error``."""
    return f"{entry['accuracy']:.3f} ± {entry['se']:.3f}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
