"""Test fixtures for the model adapters: a tiny Qwen-style tokenizer and synthetic samples.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on synthetic text with the
Qwen2.5 special tokens the Show-o2 templates use; images are drawn with PIL.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = ("a red circle on a blue square the green triangle near yellow sky what is in this image describe "
         "picture there are two three shapes small large left right top bottom photo of cat dog").split()


def synthetic_text(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def make_tokenizer(directory: str | Path, vocab_size: int = 320) -> Path:
    """Train and save a tiny byte-level BPE tokenizer with eos ``<|im_end|>``, like Qwen2.5-Instruct."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(synthetic_text(500) + ["system\nYou are a helpful assistant.\nuser\nassistant\n"], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    return directory


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
