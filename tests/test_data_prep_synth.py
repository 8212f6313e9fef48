"""synth: deterministic scenes whose ground truth matches the pixels and the text, and that shard."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from data_prep import scenes, synth
from data_prep.cli import main
from data_prep_helpers import files, samples, shard

COUNT, SIZE = 80, 64


@pytest.fixture(scope="module", params=scenes.LAYOUTS)
def corpus(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("synth")
    synth(out, COUNT, seed=3, size=SIZE, layout=request.param)
    records = [json.loads(line) for line in (out / "synth.jsonl").read_text().splitlines()]
    return out, records, request.param


@pytest.mark.parametrize("size", [64, 256])
def test_the_grid_layout_centres_each_object_in_its_own_cell(size):
    cell = size // 4
    for index in range(40):
        items = [(s, "red") for s in scenes.SHAPES[: 1 + index % 5]]
        scene = scenes.place(random.Random(index), size, items, layout="grid")
        cells = set()
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            low, high = (f * cell for f in scenes.GRID_SIDE_FRACTION)
            assert x1 - x0 == y1 - y0 and low - 1 <= x1 - x0 <= high + 1, obj
            column, row = x0 // cell, y0 // cell
            assert (x1 - 1) // cell == column and (y1 - 1) // cell == row, obj  # inside one cell
            assert (
                abs(obj.center[0] - (column + 0.5) * cell) <= 1
                and abs(obj.center[1] - (row + 0.5) * cell) <= 1
            )
            cells.add((column, row))
        assert len(cells) == len(items)


def test_deterministic_for_a_seed(corpus, tmp_path):
    out, _, layout = corpus
    synth(tmp_path / "a", 10, seed=3, size=SIZE, layout=layout)
    first_ten = (out / "synth.jsonl").read_text().splitlines()[:10]
    assert (tmp_path / "a" / "synth.jsonl").read_text().splitlines() == first_ten
    assert files(tmp_path / "a" / "images") == {
        k: v for k, v in files(out / "images").items() if k < "000010"
    }
    synth(tmp_path / "b", 10, seed=4, size=SIZE, layout=layout)
    assert (tmp_path / "b" / "synth.jsonl").read_text() != (
        tmp_path / "a" / "synth.jsonl"
    ).read_text()


def test_ground_truth_matches_pixels(corpus):
    out, records, _ = corpus
    for record in records:
        img = Image.open(out / record["image"]).convert("RGB")
        scene = record["meta"]["scene"]
        assert img.size == tuple(scene["size"]) == (SIZE, SIZE)
        for obj in scene["objects"]:
            cx, cy = (round(v) for v in obj["center"])
            assert img.getpixel((cx, cy)) == scenes.COLORS[obj["color"]], (record["image"], obj)
        assert sum(scene["counts"].values()) == len(scene["objects"])


def _objects(record):
    return [
        scenes.SceneObject(o["shape"], o["color"], tuple(o["bbox"]))
        for o in record["meta"]["scene"]["objects"]
    ]


def test_answers_and_prompts_follow_the_scene(corpus):
    _, records, _ = corpus
    kinds, categories, qtypes = set(), set(), set()
    for record in records:
        meta, objs = record["meta"], _objects(record)
        kinds.add(meta["kind"])
        if meta["kind"] == "qa":
            query, answer, qtype = meta["query"], record["answer"], meta["question_type"]
            qtypes.add(qtype)
            if qtype == "count":
                assert int(answer) == sum(
                    o.shape == query["shape"] and query["color"] in (None, o.color) for o in objs
                )
                assert query["shape"] in record["question"]
            elif qtype == "color":
                (obj,) = (o for o in objs if o.shape == query["shape"])
                assert answer == obj.color and obj.shape in record["question"]
            elif qtype == "exists":
                assert (answer == "yes") == any(
                    (o.shape, o.color) == (query["shape"], query["color"]) for o in objs
                )
            else:
                i, asked, j = query["relation"]
                assert (answer == "yes") == (scenes.relation(objs[i], objs[j]) == asked)
                assert record["question"] == f"Is the {objs[i].name} {asked} the {objs[j].name}?"
        elif meta["kind"] == "t2i":
            categories.add(meta["category"])
            assert record["prompt"].startswith("a photo of ")
            if meta["category"] == "counting":
                assert len(objs) == meta["count"] and len({o.shape for o in objs}) == 1
            if meta["category"] == "position":
                i, rel, j = meta["relation"]
                assert scenes.relation(objs[i], objs[j]) == rel and f" {rel} " in record["prompt"]
            if meta["category"] in ("colors", "color_attr"):
                assert all(o.color in record["prompt"] for o in objs)
        else:
            assert all(o.shape in record["caption"] and o.color in record["caption"] for o in objs)
    assert kinds == {"qa", "caption", "t2i"}
    assert categories == set(scenes.GENEVAL_CATEGORIES)
    assert qtypes == set(scenes.QUESTION_TYPES)


def test_shards_carry_ground_truth(corpus, tmp_path, capsys):
    out, records, _ = corpus
    shard(f"jsonl:{out / 'synth.jsonl'}", tmp_path / "shards")
    got = samples(tmp_path / "shards")
    assert len(got) == COUNT
    metas = sorted(json.dumps(s["json"]["meta"], sort_keys=True) for s in got.values())
    assert metas == sorted(json.dumps(r["meta"], sort_keys=True) for r in records)
    assert main(["synth", "--output", str(out), "--count", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
