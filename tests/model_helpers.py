"""Test fixtures for the model adapters: a tiny Qwen-style tokenizer and synthetic samples.

Nothing is downloaded: the tokenizer is the package's tiny byte-level BPE
(``pipeline.models.tiny_tokenizer``); images are drawn with PIL.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from pipeline.models.tiny_tokenizer import make_tokenizer, synthetic_text  # noqa: F401 (re-exported)


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
    seed: int, question: str = "what is in this image", answer: str = "a red circle on a blue square"
) -> dict:
    return {
        "task": "i2t",
        "image": draw_image(seed),
        "messages": [{"role": "user", "content": f"<image>\n{question}"}, {"role": "assistant", "content": answer}],
        "__key__": f"i2t-{seed}",
    }


def t2i_sample(seed: int, prompt: str = "a photo of a cat on the left") -> dict:
    return {"task": "t2i", "image": draw_image(seed, (64, 96)), "prompt": prompt, "__key__": f"t2i-{seed}"}
