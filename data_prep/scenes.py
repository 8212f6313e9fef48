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
SIDE_FRACTION = (0.16, 0.26)  # object size relative to the image side ("free" layout)
LAYOUTS = ("free", "grid")
GRID_CELLS = 4  # cells per side of the "grid" layout
GRID_SIDE_FRACTION = (0.8, 0.9)  # object size relative to its grid cell
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
            "objects": [
                {"shape": o.shape, "color": o.color, "bbox": list(o.box), "center": list(o.center)}
                for o in self.objects
            ],
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


def place(
    rng: random.Random,
    size: int,
    items: list[tuple[str, str]],
    wanted: tuple[int, str, int] | None = None,
    layout: str = "free",
) -> Scene:
    """Non-overlapping objects for ``(shape, color)`` items; ``wanted`` = (i, relation, j) holds.

    ``free``: anywhere, at 0.16–0.26 of the side. ``grid``: each object centred in its own cell of
    a 4×4 grid, at 0.8–0.9 of the cell. At 64 px a cell is 16 px, so a grid object lies on a fixed
    2×2 block of a model's 8 px visual tokens, and which pixels a token holds depends on the
    object alone, not on a continuous offset.
    """
    boxes_for = {"free": _free_boxes, "grid": _grid_boxes}[layout]
    for _ in range(1000):
        boxes = boxes_for(rng, size, len(items))
        if boxes is None:
            continue
        scene = Scene(
            size, tuple(SceneObject(s, c, b) for (s, c), b in zip(items, boxes, strict=True))
        )
        if (
            wanted is None
            or relation(scene.objects[wanted[0]], scene.objects[wanted[2]]) == wanted[1]
        ):
            return scene
    raise RuntimeError(f"cannot place {len(items)} objects in {size}x{size} px ({layout} layout)")


Box = tuple[int, int, int, int]


def _free_boxes(rng: random.Random, size: int, n: int) -> list[Box] | None:
    low, high = (max(4, round(size * f)) for f in SIDE_FRACTION)
    gap = max(2, size // 32)
    boxes: list[Box] = []
    for _item in range(n):
        side = rng.randint(low, high)
        for _try in range(100):
            x0, y0 = rng.randint(gap, size - gap - side), rng.randint(gap, size - gap - side)
            box = (x0, y0, x0 + side, y0 + side)
            if not any(_overlap(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _grid_boxes(rng: random.Random, size: int, n: int) -> list[Box]:
    cell = size // GRID_CELLS
    low, high = (round(cell * f) for f in GRID_SIDE_FRACTION)
    boxes = []
    for index in rng.sample(range(GRID_CELLS**2), n):
        side = rng.randint(low, high)
        x0 = index % GRID_CELLS * cell + (cell - side) // 2
        y0 = index // GRID_CELLS * cell + (cell - side) // 2
        boxes.append((x0, y0, x0 + side, y0 + side))
    return boxes


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
            pen.polygon(
                [(x0 + q, y0), (x1 - q, y0), (x1, cy), (x1 - q, y1), (x0 + q, y1), (x0, cy)],
                fill=fill,
            )
    return img


def _overlap(a: Box, b: Box, gap: int) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap
