"""The shape detector on the corpus's own ground-truth renders, and GenEval scoring with it."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from data_prep import scenes, synth, synthetic
from pipeline.eval.benchmark import (
    accuracy_by,
    generation_results,
    majority_baseline,
    prompt_agnostic_results,
    score_answer,
)
from pipeline.eval.detector import components, detect, matches_scene
from pipeline.eval.synthetic import scene_group

SCENES = 200


@pytest.fixture(scope="module", params=scenes.LAYOUTS)
def corpus(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("synth")
    synth(out, SCENES, seed=3, size=64, layout=request.param)
    records = [json.loads(line) for line in (out / synthetic.JSONL_FILE).read_text().splitlines()]
    return [(r, Image.open(out / r["image"]).convert("RGB")) for r in records]


def test_detector_finds_every_object_of_ground_truth_renders(corpus):
    correct = sum(matches_scene(detect(image), r["meta"]["scene"]) for r, image in corpus)
    print(f"detector: {correct}/{len(corpus)} scenes fully correct")
    assert correct / len(corpus) >= 0.99


@pytest.mark.parametrize("size", [96, 256])
def test_detector_at_other_resolutions(size):
    hits = 0
    for i in range(20):
        _, scene = synthetic.make_record(random.Random(f"size/{i}"), size)
        hits += matches_scene(detect(scenes.draw(scene)), scene.to_json())
    assert hits >= 19


def test_detector_ignores_noise_and_unknown_colours():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert detect(noise) == []
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    assert detect(grey) == []


def test_components_are_four_connected():
    mask = np.zeros((5, 5), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: two components
    mask[3, 1:4] = True
    assert sorted(int(c.sum()) for c in components(mask)) == [1, 1, 3]


def test_ground_truth_renders_pass_every_geneval_category_and_wrong_images_fail(corpus):
    t2i = [(r["meta"], image) for r, image in corpus if r["meta"]["kind"] == "t2i"]
    results = generation_results([m for m, _ in t2i], [image for _, image in t2i])
    table = accuracy_by(results, "category", scenes.GENEVAL_CATEGORIES)
    assert set(table) == {*scenes.GENEVAL_CATEGORIES, "overall"}
    assert all(v["accuracy"] == 1.0 for v in table.values()), table
    blank = [Image.new("RGB", (64, 64), scenes.BACKGROUND_RGB)] * len(t2i)
    assert (
        accuracy_by(
            generation_results([m for m, _ in t2i], blank), "category", scenes.GENEVAL_CATEGORIES
        )["overall"]["accuracy"]
        == 0.0
    )
    mirrored = [image.transpose(Image.Transpose.ROTATE_180) for _, image in t2i]
    position = [(m, img) for (m, _), img in zip(t2i, mirrored) if m["category"] == "position"]
    assert position and not any(r["correct"] for r in generation_results(*zip(*position)))


def test_answers_are_compared_after_normalisation():
    meta = {"question_type": "count"}
    assert score_answer(meta, "2", " 2. ") and not score_answer(meta, "2", "3")
    with pytest.raises(ValueError, match="question_type"):
        score_answer({"question_type": "colour"}, "red", "red")


def test_accuracy_carries_the_standard_error_of_each_group_and_of_their_mean():
    results = [{"category": "colors", "correct": c} for c in (True, False, False, False)]
    results += [{"category": "counting", "correct": c} for c in (1.0, 0.5)]
    table = accuracy_by(results, "category", scenes.GENEVAL_CATEGORIES)
    colors_se = (0.25 * 0.75 / 4) ** 0.5  # binomial
    counting_se = (((1.0 - 0.75) ** 2 + (0.5 - 0.75) ** 2) / 2 / 2) ** 0.5
    assert table["colors"]["se"] == pytest.approx(colors_se) and table["counting"][
        "se"
    ] == pytest.approx(counting_se)
    assert table["overall"]["se"] == pytest.approx((colors_se**2 + counting_se**2) ** 0.5 / 2)
    assert (
        accuracy_by([{"category": "colors", "correct": True}] * 3, "category", ["colors"])[
            "colors"
        ]["se"]
        == 0
    )


def test_majority_baseline_answers_the_most_common_answer_of_each_type():
    results = [{"question_type": "count", "expected": e} for e in ("1", "1", "2", "0")]
    results += [
        {"question_type": "exists", "expected": e} for e in ("Yes", "no")
    ]  # a tie: "no" comes first
    results += [{"question_type": "color", "expected": "red"}]
    table = majority_baseline(results, scenes.QUESTION_TYPES)
    assert {k: table["count"][k] for k in ("accuracy", "n")} == {"accuracy": 0.5, "n": 4}
    assert {k: table["exists"][k] for k in ("accuracy", "n")} == {"accuracy": 0.5, "n": 2}
    assert table["color"]["accuracy"] == 1.0 and "position" not in table
    assert table["overall"]["accuracy"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)


def test_the_prompt_agnostic_baseline_scores_each_prompt_against_every_other_records_truth():
    rng = random.Random(5)
    drawn = [scenes.place(rng, 64, [(shape, "red")]) for shape in ("circle", "circle", "square")]
    metas = [{"category": "single_object", "scene": scene.to_json()} for scene in drawn]
    results = prompt_agnostic_results(metas, [scenes.draw(scene) for scene in drawn])
    # each circle prompt is met by the other circle, not by the square; the square prompt by neither circle
    assert [r["correct"] for r in results] == [0.5, 0.5, 0.0]
    assert (
        accuracy_by(results, "category", scenes.GENEVAL_CATEGORIES)["single_object"]["accuracy"]
        == 1 / 3
    )


def test_questions_are_grouped_by_how_many_objects_their_scene_holds():
    rng = random.Random(3)
    lone = scenes.place(rng, 64, [("circle", "red")]).to_json()
    several = scenes.place(
        rng, 64, [("circle", "red"), ("square", "blue"), ("diamond", "red")]
    ).to_json()
    assert scene_group({"scene": lone}) == "one object"
    assert scene_group({"scene": several}) == "several objects"
