"""The ``synth`` command: the synthetic scenes corpus, a jsonl source with ground truth in ``meta``.

Record ``i`` depends only on (seed, i): question/answer and caption records (I2T) and prompts in
GenEval's categories (T2I), each with the scene it describes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep import scenes
from data_prep.errors import CommandError
from data_prep.manifest import write_atomic
from data_prep.scenes import (
    COLORS,
    GENEVAL_CATEGORIES,
    NUMBER_WORDS,
    OPPOSITE,
    RELATIONS,
    SHAPES,
    Scene,
)

JSONL_FILE = "synth.jsonl"
IMAGE_DIR = "images"
KIND_WEIGHTS = {"qa": 2, "caption": 1, "t2i": 2}
TEXT_FIELDS = ("question", "answer", "caption", "prompt")  # the text a record carries, by kind


def run(output: Path, count: int, seed: int, size: int, layout: str) -> Path:
    """Write ``output/synth.jsonl`` and the images it refers to; returns the jsonl path."""
    jsonl = output / JSONL_FILE
    if jsonl.exists():
        raise CommandError(
            f"--output {output}: {JSONL_FILE} already exists; choose another directory or remove it"
        )
    try:
        (output / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CommandError(f"--output {output}: cannot create directory ({e.strerror})") from None
    lines = []
    for index in tqdm(range(count), desc="synth", unit="scene", disable=None):
        fields, scene = make_record(random.Random(f"{seed}/{index}"), size, layout)
        image = f"{IMAGE_DIR}/{index:06d}.png"
        scenes.draw(scene).save(output / image)
        lines.append(json.dumps({"image": image, **fields}, sort_keys=True) + "\n")
    write_atomic(jsonl, "".join(lines).encode())
    print(f"wrote {count} records to {jsonl} (shard it with --source jsonl:{jsonl})")
    return jsonl


def make_record(
    rng: random.Random, size: int, layout: str = "free"
) -> tuple[dict[str, Any], Scene]:
    """The text fields of one record (with ``meta``) and the scene its image shows (``scenes.place``'s layout)."""
    kind = rng.choices(list(KIND_WEIGHTS), weights=list(KIND_WEIGHTS.values()))[0]
    if kind == "t2i":
        category = rng.choice(GENEVAL_CATEGORIES)
        prompt, scene, extra = _t2i(rng, size, category, layout)
        return {
            "prompt": prompt,
            "meta": {"kind": kind, "category": category, **extra, "scene": scene.to_json()},
        }, scene
    scene = scenes.place(
        rng, size, _random_items(rng, rng.randint(1, 5 if kind == "qa" else 4)), layout=layout
    )
    if kind == "caption":
        return {"caption": _caption(scene), "meta": {"kind": kind, "scene": scene.to_json()}}, scene
    qtype, query, question, answer = _question(rng, scene)
    return {
        "question": question,
        "answer": answer,
        "meta": {"kind": kind, "question_type": qtype, "query": query, "scene": scene.to_json()},
    }, scene


def _t2i(
    rng: random.Random, size: int, category: str, layout: str
) -> tuple[str, Scene, dict[str, Any]]:
    shape, other = rng.sample(SHAPES, 2)
    color, other_color = rng.sample(list(COLORS), 2)
    if category in ("single_object", "colors"):
        scene = scenes.place(rng, size, [(shape, color)], layout=layout)
        what = _a(f"{color} {shape}") if category == "colors" else _a(shape)
        return f"a photo of {what}", scene, {}
    if category == "counting":
        n = rng.randint(*scenes.COUNTING_RANGE)
        scene = scenes.place(rng, size, [(shape, color)] * n, layout=layout)
        return f"a photo of {NUMBER_WORDS[n]} {shape}s", scene, {"count": n}
    if category == "position":
        rel = rng.choice(RELATIONS)
        scene = scenes.place(
            rng, size, [(shape, color), (other, other_color)], wanted=(0, rel, 1), layout=layout
        )
        return f"a photo of {_a(shape)} {rel} {_a(other)}", scene, {"relation": [0, rel, 1]}
    scene = scenes.place(rng, size, [(shape, color), (other, other_color)], layout=layout)
    if category == "two_object":
        return f"a photo of {_a(shape)} and {_a(other)}", scene, {}
    return (
        f"a photo of {_a(f'{color} {shape}')} and {_a(f'{other_color} {other}')}",
        scene,
        {},
    )  # color_attr


def _random_items(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(rng.choice(SHAPES), rng.choice(list(COLORS))) for _ in range(n)]


def _question(rng: random.Random, scene: Scene) -> tuple[str, dict[str, Any], str, str]:
    """A question type this scene answers unambiguously, what it asks about, the question, the answer."""
    objects = scene.objects
    unique = [i for i, o in enumerate(objects) if sum(p.name == o.name for p in objects) == 1]
    pairs = [
        (i, j, scenes.relation(objects[i], objects[j])) for i in unique for j in unique if i != j
    ]
    pairs = [(i, j, rel) for i, j, rel in pairs if rel is not None]
    lone_shapes = [o for o in objects if scene.count(o.shape) == 1]
    qtype = rng.choice(
        ["count", "exists"] + ["color"] * bool(lone_shapes) + ["position"] * bool(pairs)
    )
    if qtype == "count":
        shape = rng.choice(objects).shape if rng.random() < 0.8 else rng.choice(SHAPES)
        color = rng.choice(list(COLORS)) if rng.random() < 0.5 else None
        what = f"{color} {shape}s" if color else f"{shape}s"
        query = {"shape": shape, "color": color}
        return qtype, query, f"How many {what} are there?", str(scene.count(shape, color))
    if qtype == "exists":
        shape, color = (
            (rng.choice(objects).shape, rng.choice(objects).color)
            if rng.random() < 0.5
            else (rng.choice(SHAPES), rng.choice(list(COLORS)))
        )
        answer = "yes" if scene.count(shape, color) else "no"
        return (
            qtype,
            {"shape": shape, "color": color},
            f"Is there {_a(f'{color} {shape}')} in the image?",
            answer,
        )
    if qtype == "color":
        obj = rng.choice(lone_shapes)
        return qtype, {"shape": obj.shape}, f"What color is the {obj.shape}?", obj.color
    i, j, rel = rng.choice(pairs)
    asked = rel if rng.random() < 0.5 else OPPOSITE[rel]
    question = f"Is the {objects[i].name} {asked} the {objects[j].name}?"
    return qtype, {"relation": [i, asked, j]}, question, "yes" if asked == rel else "no"


def _caption(scene: Scene) -> str:
    """e.g. 'Two red circles, a blue square and a green triangle on a white background.'"""
    groups: dict[str, int] = {}
    for obj in sorted(scene.objects, key=lambda o: o.center[0]):  # left to right
        groups[obj.name] = groups.get(obj.name, 0) + 1
    parts = [_a(name) if n == 1 else f"{NUMBER_WORDS[n]} {name}s" for name, n in groups.items()]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{text[0].upper()}{text[1:]} on a {scenes.BACKGROUND} background."


def _a(noun_phrase: str) -> str:
    return ("an " if noun_phrase[0] in "aeiou" else "a ") + noun_phrase
