"""The synthetic-scenes benchmark: ``answer`` accuracy per question type, ``generate`` accuracy per
GenEval category, on held-out records whose ground truth is in ``meta``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from data_prep.scenes import GENEVAL_CATEGORIES, QUESTION_TYPES
from pipeline.eval.benchmark import (
    accuracy_by,
    generation_results,
    majority_baseline,
    prompt_agnostic_results,
    score_answer,
)
from pipeline.eval.samples import benchmark_samples, question_and_answer
from pipeline.models.base import MLLMAdapter


SCENE_GROUPS = ("one object", "several objects")


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def understanding(
    adapter: MLLMAdapter, datasets: Sequence[str], limit: int, batch_size: int
) -> dict[str, Any]:
    samples = benchmark_samples(datasets, "i2t", limit)
    results = []
    for chunk in _chunks(samples, batch_size):
        qa = [question_and_answer(s) for s in chunk]
        predicted = adapter.answer([s["image"] for s in chunk], [q for q, _ in qa])
        for s, (question, expected), answer in zip(chunk, qa, predicted, strict=True):
            results.append(
                {
                    "key": s["__key__"],
                    "question_type": s["meta"]["question_type"],
                    "scene": scene_group(s["meta"]),
                    "question": question,
                    "expected": expected,
                    "predicted": answer,
                    "correct": score_answer(s["meta"], expected, answer),
                }
            )
    by_scene = {
        g: v for g, v in accuracy_by(results, "scene", SCENE_GROUPS).items() if g != "overall"
    }
    return {
        "accuracy": accuracy_by(results, "question_type", QUESTION_TYPES),
        "majority_baseline": majority_baseline(results, QUESTION_TYPES),
        "by_scene": by_scene,
        "results": results,
    }


def scene_group(meta: dict[str, Any]) -> str:
    """``SCENE_GROUPS`` entry of a record: questions about scenes of several objects need each shape
    bound to its own colour and place, those about a lone object do not."""
    one, several = SCENE_GROUPS
    return several if len(meta["scene"]["objects"]) > 1 else one


@torch.no_grad()
def generation(
    adapter: MLLMAdapter, datasets: Sequence[str], limit: int, batch_size: int, seed: int = 0
) -> dict[str, Any]:
    samples = benchmark_samples(datasets, "t2i", limit)
    generator = torch.Generator().manual_seed(seed)
    results, images = [], []
    for chunk in _chunks(samples, batch_size):
        generated = adapter.generate([s["prompt"] for s in chunk], generator=generator)
        scored = generation_results([s["meta"] for s in chunk], generated)
        for s, r in zip(chunk, scored, strict=True):
            results.append({"key": s["__key__"], "prompt": s["prompt"], **r})
        images.extend(generated)
    chance = prompt_agnostic_results([s["meta"] for s in samples], [s["image"] for s in samples])
    return {
        "accuracy": accuracy_by(results, "category", GENEVAL_CATEGORIES),
        "prompt_agnostic_baseline": accuracy_by(chance, "category", GENEVAL_CATEGORIES),
        "results": results,
        "images": images,
    }
