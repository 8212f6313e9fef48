"""Test fixtures for the model adapters: a tiny Qwen-style tokenizer and synthetic samples.

Nothing is downloaded: the tokenizer is the package's tiny byte-level BPE
(``pipeline.models.common.tiny_tokenizer``); images are drawn with PIL.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch.nn import Module

from pipeline.models.common.tiny_tokenizer import make_tokenizer  # noqa: F401 (re-exported)
from pipeline.models.base import MLLMAdapter
from pipeline.models.common.weights import CheckpointMismatchError


def draw_image(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        box = (x0, y0, x0 + rng.randrange(8, size[0] // 2), y0 + rng.randrange(8, size[1] // 2))
        draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def i2t_sample(
    seed: int,
    question: str = "what is in this image",
    answer: str = "a red circle on a blue square",
) -> dict:
    return {
        "task": "i2t",
        "image": draw_image(seed),
        "messages": [
            {"role": "user", "content": f"<image>\n{question}"},
            {"role": "assistant", "content": answer},
        ],
        "__key__": f"i2t-{seed}",
    }


def t2i_sample(seed: int, prompt: str = "a photo of a cat on the left") -> dict:
    return {
        "task": "t2i",
        "image": draw_image(seed, (64, 96)),
        "prompt": prompt,
        "__key__": f"t2i-{seed}",
    }


def parameter_counts(
    model: Module, group: Callable[[str], str] = lambda name: name.split(".")[0]
) -> dict[str, int]:
    """Parameters per ``group(name)``, without the frozen VAE."""
    counts: dict[str, int] = {}
    for name, parameter in model.named_parameters():
        if not name.startswith("vae."):
            counts[group(name)] = counts.get(group(name), 0) + parameter.numel()
    return counts


def assert_keys_match(keys: Iterable[str], patterns: dict[str, int]) -> None:
    """Each pattern matches its count of ``keys`` and every key matches a pattern."""
    keys = list(keys)
    for pattern, count in patterns.items():
        assert sum(bool(re.fullmatch(pattern, k)) for k in keys) == count, pattern
    assert not [k for k in keys if not any(re.fullmatch(p, k) for p in patterns)]
    assert len(keys) == sum(patterns.values())


def copy_checkpoint(saved_dir: Path, tmp_path: Path) -> Path:
    """A copy of the files (not the folders) of ``saved_dir`` in ``tmp_path/ckpt``."""
    target = tmp_path / "ckpt"
    target.mkdir()
    for item in saved_dir.iterdir():
        if item.is_file():
            (target / item.name).write_bytes(item.read_bytes())
    return target


def break_checkpoint(target: Path, change: str, key: str, extra_key: str) -> str:
    """Delete ``key``, add ``extra_key`` or reshape ``key`` (``change``) in ``target/model.safetensors``;
    returns the key the load error must name."""
    state = load_file(target / "model.safetensors")
    if change == "missing":
        del state[key]
    elif change == "extra":
        key = extra_key
        state[key] = torch.zeros(3)
    else:
        state[key] = torch.zeros(5)
    save_file(state, target / "model.safetensors")
    return key


def assert_mismatch_named(load: Callable[[], object], key: str, change: str) -> str:
    """``load()`` fails with a :class:`CheckpointMismatchError` naming ``key`` in the ``change`` section;
    returns the message."""
    with pytest.raises(CheckpointMismatchError, match=re.escape(key)) as info:
        load()
    section = {"missing": "missing keys", "extra": "unexpected keys", "shape": "shape mismatches"}[
        change
    ]
    assert section in str(info.value)
    return str(info.value)


def assert_same_outputs(a: Module, b: Module, batch: dict) -> None:
    """Both models give bit-identical training outputs on ``batch`` with the same noise."""
    with torch.no_grad():
        x = a(batch, generator=torch.Generator().manual_seed(3))
        y = b(batch, generator=torch.Generator().manual_seed(3))
    for key in ("loss_i2t", "loss_t2i", "z_u", "z_g", "text_u", "text_g", "target_patches"):
        torch.testing.assert_close(getattr(x, key), getattr(y, key), rtol=0, atol=0)


def collated_batch(model: MLLMAdapter, tasks: str = "ugug") -> dict:
    """A collated batch; ``u`` = an I2T sample, ``g`` = a T2I sample, seeded by position."""
    samples = [
        model.processor(i2t_sample(i) if task == "u" else t2i_sample(i))
        for i, task in enumerate(tasks)
    ]
    return model.collate(samples)


def fill_zeroed(model: Module, prefix: str, std: float) -> Module:
    """Give the all-zero parameters under ``prefix`` (zero-initialised heads) small random values."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith(prefix) and not parameter.any():
                parameter.normal_(std=std)
    return model


def trained_parameters(model: Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters the optimizer updates (``requires_grad``)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
