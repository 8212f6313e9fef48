"""A deterministic detector of the synthetic scenes' shapes, and GenEval-style scoring with it.

Pixels are assigned to the nearest palette colour (``data_prep.scenes.COLORS``) or to the
background when within ``max_distance`` of it (RGB Euclidean), and to nothing otherwise. Each
colour's mask is split into 4-connected components; components smaller than a fraction of the
smallest object the corpus draws are noise. A component's shape is classified geometrically: every
candidate shape is rasterised by the corpus's own drawing code into the component's bounding box
and the one with the highest IoU against the component wins (fill ratio alone cannot separate a
circle, 0.785, from a hexagon, 0.75, at 10 px). Components whose best IoU is below ``min_iou``
are not objects, and so are components whose box is far from square or outside the corpus's size
range (every shape is drawn in a square box of ``SIDE_FRACTION`` of the image side), which
rejects the blobs an untrained generator paints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_prep import scenes
from data_prep.scenes import COLORS, SHAPES, Scene, SceneObject

PALETTE_NAMES = tuple(COLORS)
MAX_DISTANCE = 80.0  # RGB distance under which a pixel counts as a palette colour
MIN_IOU = 0.8
SIDE_SLACK = (0.75, 1.3)  # accepted box sides, as multiples of the corpus's smallest / largest side
MAX_ASPECT_GAP = 0.15  # |width - height| / side allowed for a box (1 px always allowed)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive (the scenes' convention)
    iou: float
    area: int

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def as_scene_object(self) -> SceneObject:
        return SceneObject(self.shape, self.color, self.box)

    def to_json(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "bbox": list(self.box),
            "center": list(self.center),
            "iou": round(self.iou, 4),
            "area": self.area,
        }


def colour_labels(image: Image.Image, max_distance: float = MAX_DISTANCE) -> np.ndarray:
    """[H, W] palette index per pixel (``PALETTE_NAMES`` order), -1 for background or no colour."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    refs = np.array([scenes.BACKGROUND_RGB, *COLORS.values()], dtype=np.float32)
    dist = np.linalg.norm(rgb[:, :, None, :] - refs[None, None], axis=-1)
    nearest = dist.argmin(axis=-1)
    labels = nearest - 1  # background -> -1
    labels[dist.min(axis=-1) > max_distance] = -1
    return labels


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as a boolean mask (min-label propagation)."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:
        pad = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [pad[1:-1, 1:-1], pad[:-2, 1:-1], pad[2:, 1:-1], pad[1:-1, :-2], pad[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    return [labels == value for value in np.unique(labels[mask])]


def template(shape: str, box: tuple[int, int, int, int], size: tuple[int, int]) -> np.ndarray:
    """The mask the corpus's drawing code paints for ``shape`` in ``box`` on a ``size`` (w, h) canvas."""
    img = scenes.draw(Scene(max(size), (SceneObject(shape, PALETTE_NAMES[0], box),)))
    return np.asarray(img)[: size[1], : size[0], 0] != scenes.BACKGROUND_RGB[0]


def classify(mask: np.ndarray) -> tuple[str, float, tuple[int, int, int, int]]:
    """(shape, IoU with its template, inclusive box) of one component."""
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    x0, y0, x1, y1 = box
    crop = mask[y0 : y1 + 1, x0 : x1 + 1]
    local = (0, 0, x1 - x0, y1 - y0)
    best = ("", -1.0)
    for shape in SHAPES:
        t = template(shape, local, (x1 - x0 + 1, y1 - y0 + 1))
        iou = float((t & crop).sum() / max((t | crop).sum(), 1))
        if iou > best[1]:
            best = (shape, iou)
    return best[0], best[1], box


def detect(
    image: Image.Image, *, max_distance: float = MAX_DISTANCE, min_iou: float = MIN_IOU
) -> list[Detection]:
    """The shapes drawn in ``image``, left to right then top to bottom."""
    labels = colour_labels(image, max_distance)
    low, high = (side * min(image.size) for side in scenes.SIDE_FRACTION)
    low, high = SIDE_SLACK[0] * max(4, low), SIDE_SLACK[1] * high + 1
    min_area = low * low / 2  # a triangle of the smallest side
    found = []
    for index, colour in enumerate(PALETTE_NAMES):
        mask = labels == index
        if not mask.any():
            continue
        for part in components(mask):
            area = int(part.sum())
            if area < min_area:
                continue
            shape, iou, box = classify(part)
            width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
            square = abs(width - height) <= max(1, MAX_ASPECT_GAP * max(width, height))
            if iou >= min_iou and square and low <= max(width, height) <= high:
                found.append(Detection(shape, colour, box, iou, area))
    return sorted(found, key=lambda d: (d.center[0], d.center[1], d.color))


def matches_scene(
    detections: Sequence[Detection], scene: Mapping[str, Any], tolerance: int = 1
) -> bool:
    """Every object of a ``Scene.to_json()`` found once with its shape, colour and box (± ``tolerance`` px),
    and nothing else."""
    wanted = list(scene["objects"])
    if len(wanted) != len(detections):
        return False
    for d in detections:
        hit = next(
            (
                o
                for o in wanted
                if o["shape"] == d.shape
                and o["color"] == d.color
                and max(abs(a - b) for a, b in zip(o["bbox"], d.box)) <= tolerance
            ),
            None,
        )
        if hit is None:
            return False
        wanted.remove(hit)
    return True
