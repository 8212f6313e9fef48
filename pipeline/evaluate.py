"""Evaluate a training run or an exported model on held-out shards.

    python -m pipeline.evaluate --model RUN_DIR|MODEL_DIR --data SHARDS [--data ...] --output DIR
        [--recon [--inception INCEPTION.pt]]

Writes ``report.md``, ``metrics.json``, ``benchmark.jsonl`` (every benchmark item) and PNG plots:
held-out losses per term and the rate of the shared tokens (KL, nats per token; runs only, since
export drops the InfoTok heads), linear CKA between mean-pooled ``z_u`` and the pooled text
features with a bootstrap CI, and the synthetic-scenes benchmark (answer accuracy per question type
and for scenes of one object against several, generation accuracy per GenEval category judged by
the shape detector). A run directory also gets its training curves from ``metrics.jsonl``.
``--recon`` adds the reconstruction probe (a decoder trained on the frozen shared tokens: PSNR/SSIM
on held-out images, FID with ``--inception``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.eval import report, synthetic
from pipeline.eval.cka import bootstrap_cka
from pipeline.eval.heldout import evaluate_heldout
from pipeline.eval.loading import EvalModel, load
from pipeline.eval.recon_probe import ProbeConfig, load_inception, run_probe
from pipeline.eval.samples import iter_samples
from pipeline.infotok import BRANCHES
from pipeline.metrics import read_metrics


def cka_metrics(pooled: np.ndarray, text: np.ndarray, resamples: int, seed: int) -> dict[str, Any]:
    out = {}
    for name, debiased in (("debiased", True), ("normalized", False)):
        estimate = bootstrap_cka(pooled, text, debiased=debiased, resamples=resamples, seed=seed)
        out[name] = {**estimate.to_json(), "n": int(pooled.shape[0])}
    return out


def reconstruction(
    model: EvalModel,
    data: list[str],
    probe: ProbeConfig,
    inception: Path | None,
    batch_size: int,
    output: Path,
) -> dict[str, Any]:
    """The probe on the first held-out images of both tasks; writes ``reconstructions.png``."""
    records = itertools.chain(iter_samples(data, "i2t"), iter_samples(data, "t2i"))
    images = [r["image"] for r in itertools.islice(records, probe.train_images + probe.test_images)]
    result = run_probe(
        model.adapter, images, probe, load_inception(inception) if inception else None, batch_size
    )
    report.plot_reconstructions(
        result.originals, result.reconstructions, output / "reconstructions.png"
    )
    return result.metrics


def evaluate(
    model: EvalModel,
    data: list[str],
    output: Path,
    *,
    samples: int,
    batch_size: int,
    batches: int,
    resamples: int,
    seed: int,
    probe: ProbeConfig | None = None,
    inception: Path | None = None,
) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    held = evaluate_heldout(model, data, batch_size=batch_size, max_batches=batches, seed=seed)
    metrics: dict[str, Any] = {
        "model": {
            "source": model.source,
            "family": model.adapter.family,
            "step": model.step,
            "infotok_mode": model.config.infotok.mode if model.config else None,
        },
        "data": data,
        "heldout": {
            "losses": held.losses,
            "batches": held.batches,
            "samples": held.samples,
            "notes": held.notes,
        },
        "rate": {
            b: {
                "nats_per_token": held.losses[f"kl_{b}"],
                "nats_per_image": held.losses[f"nats_per_image_{b}"],
            }
            for b in BRANCHES
            if f"kl_{b}" in held.losses
        },
    }
    if held.pooled_tokens.shape[0] >= 4:
        metrics["cka"] = cka_metrics(held.pooled_tokens, held.text, resamples, seed)
    understanding = synthetic.understanding(model.adapter, data, samples, batch_size)
    generation = synthetic.generation(model.adapter, data, samples, batch_size, seed)
    metrics["benchmark"] = {
        "understanding": understanding["accuracy"],
        "generation": generation["accuracy"],
        "understanding_majority_baseline": understanding["majority_baseline"],
        "generation_prompt_agnostic_baseline": generation["prompt_agnostic_baseline"],
        "understanding_by_scene": understanding["by_scene"],
    }
    with open(output / "benchmark.jsonl", "w") as f:
        for item in understanding["results"] + generation["results"]:
            f.write(json.dumps(item) + "\n")
    (output / "generated").mkdir(exist_ok=True)
    for item, image in zip(generation["results"], generation["images"]):
        image.save(output / "generated" / f"{item['key']}.png")

    plots = []
    if probe is not None:
        metrics["reconstruction"] = reconstruction(
            model, data, probe, inception, batch_size, output
        )
        plots.append("reconstructions.png")
    if model.run_dir is not None and report.plot_training_curves(
        read_metrics(model.run_dir), output / "training_curves.png"
    ):
        plots.append("training_curves.png")
    for section, title in (
        ("understanding", "answer accuracy by question type"),
        ("generation", "generation accuracy by GenEval category"),
    ):
        if metrics["benchmark"][section]:
            name = f"{section}_accuracy.png"
            report.plot_accuracy_bars(metrics["benchmark"][section], title, output / name)
            plots.append(name)
    report.write_metrics(metrics, output / "metrics.json")
    (output / "report.md").write_text(report.markdown(metrics, plots))
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="training run directory (or a checkpoint in it), "
        "or a model directory from pipeline.export",
    )
    parser.add_argument(
        "--data", required=True, action="append", help="held-out data_prep directory (repeatable)"
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="where report.md, metrics.json and plots go"
    )
    parser.add_argument(
        "--step", type=int, help="evaluate this checkpoint step of a run instead of the latest"
    )
    parser.add_argument(
        "--tokenizer-path", help="tokenizer directory, for a model directory without one"
    )
    parser.add_argument(
        "--samples", type=int, default=64, help="benchmark items per task (answer, generate)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="samples per forward / generate / answer call"
    )
    parser.add_argument("--batches", type=int, default=16, help="held-out loss batches at most")
    parser.add_argument(
        "--bootstrap", type=int, default=200, help="bootstrap resamples of the CKA interval"
    )
    parser.add_argument("--seed", type=int, default=0)
    recon = parser.add_argument_group("reconstruction probe (Table 1's generation proxy)")
    recon.add_argument(
        "--recon", action="store_true", help="train a decoder on the frozen shared tokens"
    )
    recon.add_argument(
        "--recon-train", type=int, default=ProbeConfig.train_images, help="images it trains on"
    )
    recon.add_argument(
        "--recon-test",
        type=int,
        default=ProbeConfig.test_images,
        help="held-out images it is scored on",
    )
    recon.add_argument(
        "--recon-steps", type=int, default=ProbeConfig.steps, help="decoder optimizer steps"
    )
    recon.add_argument(
        "--inception",
        type=Path,
        help="local TorchScript Inception network (inception-2015-12-05.pt) "
        "for FID; nothing is downloaded",
    )
    args = parser.parse_args(argv)
    if args.inception and not args.recon:
        parser.error("--inception needs --recon")
    probe = (
        ProbeConfig(
            train_images=args.recon_train,
            test_images=args.recon_test,
            steps=args.recon_steps,
            seed=args.seed,
        )
        if args.recon
        else None
    )
    try:
        model = load(args.model, step=args.step, tokenizer_path=args.tokenizer_path)
        metrics = evaluate(
            model,
            args.data,
            args.output,
            samples=args.samples,
            batch_size=args.batch_size,
            batches=args.batches,
            resamples=args.bootstrap,
            seed=args.seed,
            probe=probe,
            inception=args.inception,
        )
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        sys.exit(1)
    gen = metrics["benchmark"]["generation"].get("overall", {}).get("accuracy")
    und = metrics["benchmark"]["understanding"].get("overall", {}).get("accuracy")
    print(f"wrote {args.output / 'report.md'} (understanding {und}, generation {gen})")


if __name__ == "__main__":
    main()
