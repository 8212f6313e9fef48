"""Synthetic scenes: coloured shapes on a plain background, with exact ground truth.

The constants here are the vocabulary of the synthetic corpus; an evaluator imports them to
score generated images or answers against the ``meta.scene`` stored with every sample.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 38, 38),
    "green": (22, 163, 74),
    "blue": (37, 99, 235),
    "yellow": (234, 179, 8),
    "purple": (147, 51, 234),
    "orange": (249, 115, 22),
}
BACKGROUND = "white"
BACKGROUND_RGB = (255, 255, 255)
GENEVAL_CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
QUESTION_TYPES = ("count", "color", "position", "exists")
NUMBER_WORDS = {0: "zero", 1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
COUNTING_RANGE = (2, 4)  # GenEval's counting prompts ask for two to four objects
SIDE_FRACTION = (0.16, 0.26)  # object size relative to the image side
DOMINANCE = 2.0  # a relation holds when its axis offset is at least this times the other axis's


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; the shape touches all four sides

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    size: int
    objects: tuple[SceneObject, ...]

    def count(self, shape: str, color: str | None = None) -> int:
        return sum(o.shape == shape and color in (None, o.color) for o in self.objects)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": [self.size, self.size],
            "background": BACKGROUND,
            "objects": [{"shape": o.shape, "color": o.color, "bbox": list(o.box), "center": list(o.center)}
                        for o in self.objects],
            "counts": dict(sorted(Counter(o.shape for o in self.objects).items())),
        }


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where ``a`` is relative to ``b`` (a RELATIONS entry), or None when it is diagonal."""
    dx = a.center[0] - b.center[0]
    dy = a.center[1] - b.center[1]
    if abs(dx) >= DOMINANCE * abs(dy) and dx:
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= DOMINANCE * abs(dx) and dy:
        return "above" if dy < 0 else "below"
    return None


def place(rng: random.Random, size: int, items: list[tuple[str, str]],
          wanted: tuple[int, str, int] | None = None) -> Scene:
    """Non-overlapping objects for ``(shape, color)`` items; ``wanted`` = (i, relation, j) holds."""
    low, high = (max(4, round(size * f)) for f in SIDE_FRACTION)
    gap = max(2, size // 32)
    for _ in range(1000):
        boxes: list[tuple[int, int, int, int]] = []
        for _item in items:
            side = rng.randint(low, high)
            for _try in range(100):
                x0, y0 = rng.randint(gap, size - gap - side), rng.randint(gap, size - gap - side)
                box = (x0, y0, x0 + side, y0 + side)
                if not any(_overlap(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) < len(items):
            continue
        scene = Scene(size, tuple(SceneObject(s, c, b) for (s, c), b in zip(items, boxes, strict=True)))
        if wanted is None or relation(scene.objects[wanted[0]], scene.objects[wanted[2]]) == wanted[1]:
            return scene
    raise RuntimeError(f"cannot place {len(items)} objects in {size}x{size} px")


def draw(scene: Scene) -> Image.Image:
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND_RGB)
    pen = ImageDraw.Draw(img)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            pen.ellipse(obj.box, fill=fill)
        elif obj.shape == "square":
            pen.rectangle(obj.box, fill=fill)
        elif obj.shape == "triangle":
            pen.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
        elif obj.shape == "diamond":
            pen.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)
        else:  # hexagon
            q = (x1 - x0) / 4
            pen.polygon([(x0 + q, y0), (x1 - q, y0), (x1, cy), (x1 - q, y1), (x0 + q, y1), (x0, cy)], fill=fill)
    return img


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap
