"""Scoring the synthetic-scenes benchmark against the ground truth each record carries in ``meta``.

Generation follows GenEval's rules per category (Ghosh et al. 2023), with the shape detector in
place of an object detector; understanding is exact-match of the normalised answer.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from PIL import Image

from data_prep.scenes import GENEVAL_CATEGORIES, QUESTION_TYPES, relation
from pipeline.eval.detector import Detection, detect


def _has(found: Sequence[Detection], shape: str, color: str | None = None) -> bool:
    return any(d.shape == shape and color in (None, d.color) for d in found)


def score_generation(meta: Mapping[str, Any], found: Sequence[Detection]) -> bool:
    """Whether the detections satisfy the prompt of a T2I record's ``meta`` (kind ``t2i``)."""
    category = meta.get("category")
    objects = meta["scene"]["objects"]
    first = objects[0]
    if category == "single_object":
        return _has(found, first["shape"])
    if category == "colors":
        return _has(found, first["shape"], first["color"])
    if category == "counting":
        return sum(d.shape == first["shape"] for d in found) == meta["count"]
    second = objects[1]
    if category == "two_object":
        return _has(found, first["shape"]) and _has(found, second["shape"])
    if category == "color_attr":
        return _has(found, first["shape"], first["color"]) and _has(
            found, second["shape"], second["color"]
        )
    if category == "position":
        i, wanted, j = meta["relation"]
        a_shape, b_shape = objects[i]["shape"], objects[j]["shape"]
        return any(
            relation(a.as_scene_object(), b.as_scene_object()) == wanted
            for a in found
            if a.shape == a_shape
            for b in found
            if b.shape == b_shape and b is not a
        )
    raise ValueError(
        f"meta.category: unknown GenEval category {category!r} (expected one of {GENEVAL_CATEGORIES})"
    )


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".!").strip()


def score_answer(meta: Mapping[str, Any], expected: str, predicted: str) -> bool:
    if meta.get("question_type") not in QUESTION_TYPES:
        raise ValueError(
            f"meta.question_type: {meta.get('question_type')!r} is not one of {QUESTION_TYPES}"
        )
    return normalise_answer(predicted) == normalise_answer(expected)


def generation_results(
    metas: Sequence[Mapping[str, Any]], images: Sequence[Image.Image]
) -> list[dict[str, Any]]:
    """Per generated image: category, correctness and what the detector found."""
    out = []
    for meta, image in zip(metas, images, strict=True):
        found = detect(image)
        out.append(
            {
                "category": meta["category"],
                "correct": score_generation(meta, found),
                "detections": [d.to_json() for d in found],
            }
        )
    return out


def prompt_agnostic_results(
    metas: Sequence[Mapping[str, Any]], truths: Sequence[Image.Image]
) -> list[dict[str, Any]]:
    """Per record, the fraction of the other records' ground-truth images that satisfy its prompt: what
    a painter scores that draws flawless corpus scenes but ignores the prompt. The chance level of
    generation accuracy, as the majority answer is for understanding."""
    found = [detect(image) for image in truths]
    out = []
    for i, meta in enumerate(metas):
        hits = [score_generation(meta, other) for j, other in enumerate(found) if j != i]
        out.append({"category": meta["category"], "correct": sum(hits) / max(len(hits), 1)})
    return out


def accuracy_by(
    results: Iterable[Mapping[str, Any]], key: str, order: Sequence[str]
) -> dict[str, dict[str, float]]:
    """``{group: {"accuracy", "n", "se"}}`` in ``order`` (groups with no sample are left out), plus
    ``overall`` as the mean over groups (GenEval's convention).

    ``se`` is the standard error of the mean over the group's items (binomial ``sqrt(p(1 - p)/n)`` for
    right/wrong items); overall's combines the groups' as independent: ``sqrt(sum se²)/groups``. A
    benchmark of a few dozen items resolves only differences of a few of these.
    """
    groups: dict[str, list[float]] = defaultdict(list)
    for r in results:
        groups[r[key]].append(float(r["correct"]))
    table = {g: _mean_and_se(groups[g]) for g in order if groups[g]}
    if table:
        table["overall"] = {
            "accuracy": sum(v["accuracy"] for v in table.values()) / len(table),
            "n": sum(v["n"] for v in table.values()),
            "se": math.sqrt(sum(v["se"] ** 2 for v in table.values())) / len(table),
        }
    return table


def _mean_and_se(values: Sequence[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return {"accuracy": mean, "n": len(values), "se": math.sqrt(variance / len(values))}


def majority_baseline(
    results: Sequence[Mapping[str, Any]], order: Sequence[str]
) -> dict[str, dict[str, float]]:
    """What answering every question with the most common expected answer of its type scores on
    these items (an optimistic prior-only reference: the majority is taken on the items themselves;
    ties go to the alphabetically first answer). Same layout as :func:`accuracy_by`."""
    answers: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        answers[r["question_type"]][normalise_answer(r["expected"])] += 1
    majority = {t: min(c, key=lambda a: (-c[a], a)) for t, c in answers.items()}
    return accuracy_by(
        [
            {
                "question_type": r["question_type"],
                "correct": normalise_answer(r["expected"]) == majority[r["question_type"]],
            }
            for r in results
        ],
        "question_type",
        order,
    )
