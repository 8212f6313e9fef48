"""OpenUni inputs: InternVL3 tokenizer and chat template, image preprocessing, collate.

- I2T follows InternVL's ``internvl2_5`` template and ``preprocess_internvl2_5``
  (OpenGVLab/InternVL ``internvl_chat/internvl/train/dataset.py``): pieces
  ``<|im_start|>system\\n{system}<|im_end|>\\n``, ``<|im_start|>user\\n{question}<|im_end|>\\n`` and
  ``<|im_start|>assistant\\n{answer}<|im_end|>\\n`` are tokenized separately; the targets are the
  assistant piece without its ``<|im_start|>assistant\\n`` prefix and final ``\\n``. ``<image>``
  becomes ``<img>`` + N × ``<IMG_CONTEXT>`` + ``</img>`` (prepended as ``<image>\\n`` when absent).
  Images are resized to the ViT input (bicubic, no aspect padding) and ImageNet-normalised
  (``build_transform``); one 448 px tile, InternVL's dynamic tiling is not used.
- T2I follows OpenUni (``src/datasets/text2image/caption_datasets.py``):
  ``INSTRUCTION.format(GENERATION.format(prompt)) + '<img>'``, cut to ``max_prompt_len`` tokens;
  with probability ``cond_dropout_prob`` the user message is the CFG prompt instead. Targets are
  cropped to a square and resized to ``image_size`` in [-1, 1]. The official crop offset and the
  dropout are random; here the crop is centred and the dropout is a hash of the sample key, so a
  resumed run sees the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pipeline.models.openuni.config import OpenUniConfig
from pipeline.models.common.latents import LATENTS, image_fields
from pipeline.models.common.processing import prompt_dropped
from pipeline.models.common.text import IGNORE, IMAGE_PLACEHOLDER, pad_rows

PAD_ID = 0  # OpenUni's pad_index; padded positions are masked out
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class SpecialIds:
    im_start: int
    im_end: int
    img_start: int
    img_end: int
    img_context: int


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The InternVL3 tokenizer from a local directory, with its image tokens (added when absent)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    absent = [t for t in (IMG_START, IMG_END, IMG_CONTEXT) if t not in tokenizer.get_vocab()]
    if absent:
        tokenizer.add_tokens(absent, special_tokens=True)
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    vocab = tokenizer.get_vocab()
    names = {
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "img_start": IMG_START,
        "img_end": IMG_END,
        "img_context": IMG_CONTEXT,
    }
    absent = [token for token in names.values() if token not in vocab]
    if absent:
        raise ValueError(
            f"tokenizer lacks InternVL3 tokens: {', '.join(absent)} (load it with load_tokenizer)"
        )
    return SpecialIds(**{key: vocab[token] for key, token in names.items()})


def vit_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image → [3, size, size] ImageNet-normalised ViT input (bicubic resize)."""
    array = (
        np.asarray(
            image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32
        )
        / 255
    )
    array = (array - np.array(IMAGENET_MEAN, dtype=np.float32)) / np.array(
        IMAGENET_STD, dtype=np.float32
    )
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def square_tensor(image: Image.Image, size: int) -> torch.Tensor:
    """Central square crop resized to ``size`` (bicubic) → [3, size, size] in [-1, 1]."""
    image = image.convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class OpenUniProcessor:
    """Raw samples → per-sample tensors; :meth:`collate` pads them into a flat batch.

    A sample is a mapping with ``task`` (``"i2t"`` / ``"t2i"``), ``image`` (PIL) and ``messages``
    (I2T) or ``prompt`` (T2I), optionally ``__key__``.
    """

    pixels_with_latents = ("t2i",)  # the ViT encodes the T2I target too (z_g)

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: OpenUniConfig, *, train: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.train = train
        self.ids = special_ids(tokenizer)
        self.image_text = IMG_START + IMG_CONTEXT * config.num_image_tokens + IMG_END
        self._assistant_prefix = len(self._encode("<|im_start|>assistant\n"))

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        task = sample.get("task")
        if task == "i2t":
            out = self.i2t_sequence(sample["messages"])
            out["pixel_values"] = vit_tensor(sample["image"], self.config.vision.image_size)
        elif task == "t2i":
            dropped = self.train and prompt_dropped(
                sample, self.config.seed, self.config.cond_dropout_prob
            )
            message = self.config.cfg_prompt if dropped else None
            out = self.t2i_sequence(sample["prompt"], message=message)
            out["pixel_values"] = self.vae_input(sample)  # also the ViT's input for z_g
            if LATENTS in sample:
                out[LATENTS] = sample[LATENTS]
        else:
            raise ValueError(f"sample task must be 'i2t' or 't2i', got {task!r}")
        return out

    def vae_input(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """The DC-AE encodes the T2I targets only: a centred square at ``image_size``."""
        return square_tensor(sample["image"], self.config.image_size)

    def vae_preprocessing(self) -> dict[str, Any]:
        return {"image_size": self.config.image_size, "t2i": "centre square crop, bicubic"}

    def i2t_sequence(self, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        """Token ids, labels and text mask of a conversation; ending on a user turn adds the answer prompt."""
        contents = [m["content"] for m in messages]
        placeholders = sum(
            c.count(IMAGE_PLACEHOLDER) for m, c in zip(messages, contents) if m["role"] == "user"
        )
        if placeholders > 1:
            raise ValueError(
                f"an I2T conversation may hold one {IMAGE_PLACEHOLDER}, got {placeholders}"
            )
        ids: list[int] = []
        labels: list[int] = []
        if self.config.system_message:
            piece = self._encode(f"<|im_start|>system\n{self.config.system_message}<|im_end|>\n")
            ids, labels = piece, [IGNORE] * len(piece)
        first_user = True
        for message, content in zip(messages, contents):
            if message["role"] == "user":
                if first_user and not placeholders:
                    content = f"{IMAGE_PLACEHOLDER}\n{content}"
                first_user = False
                content = content.replace(IMAGE_PLACEHOLDER, self.image_text)
                piece = self._encode(f"<|im_start|>user\n{content}<|im_end|>\n")
                ids, labels = ids + piece, labels + [IGNORE] * len(piece)
            elif message["role"] == "assistant":
                piece = self._encode(f"<|im_start|>assistant\n{content}<|im_end|>\n")
                target = (
                    [IGNORE] * self._assistant_prefix
                    + piece[self._assistant_prefix : -1]
                    + [IGNORE]
                )
                ids, labels = ids + piece, labels + target
            else:
                raise ValueError(
                    f"message role must be 'user' or 'assistant', got {message['role']!r}"
                )
        if messages[-1]["role"] == "user":
            piece = self._encode("<|im_start|>assistant\n")
            ids, labels = ids + piece, labels + [IGNORE] * len(piece)
        ids, labels = ids[: self.config.max_seq_len], labels[: self.config.max_seq_len]
        if (
            ids.count(self.ids.img_context) != self.config.num_image_tokens
            or self.ids.img_end not in ids
        ):
            raise ValueError(
                f"I2T sample exceeds max_seq_len={self.config.max_seq_len} before its image ends"
            )
        if messages[-1]["role"] == "assistant" and all(label == IGNORE for label in labels):
            raise ValueError(
                f"I2T sample: the answer does not fit in max_seq_len={self.config.max_seq_len}"
            )
        ids_t, labels_t = torch.tensor(ids), torch.tensor(labels)
        image = (
            (ids_t == self.ids.img_start)
            | (ids_t == self.ids.img_context)
            | (ids_t == self.ids.img_end)
        )
        return {
            "task": "i2t",
            "input_ids": ids_t,
            "labels": labels_t,
            "text_mask": (labels_t == IGNORE) & ~image,
        }

    def t2i_sequence(self, prompt: str, *, message: str | None = None) -> dict[str, Any]:
        """Prompt ids of a T2I sample; ``message`` replaces the whole user message (CFG prompt)."""
        if message is None:
            message = self.config.generation_prompt.format(input=prompt.strip())
        ids = self._encode(
            f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n{IMG_START}"
        )
        return {"task": "t2i", "input_ids": torch.tensor(ids[: self.config.max_prompt_len])}

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A flat batch: ``i2t_*`` and ``t2i_*`` tensors (right-padded), present when their task is.

        Two host-side values let the training step run without reading the I2T tensors back:
        ``i2t_padded`` (whether the rows differ in length) and ``i2t_max_answer`` (the most answer
        tokens of a row, at least 1).
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch: dict[str, Any] = {}
        for task in ("i2t", "t2i"):
            group = [s for s in samples if s["task"] == task]
            if not group:
                continue
            ids = [s["input_ids"] for s in group]
            batch[f"{task}_input_ids"] = pad_rows(ids, PAD_ID)
            batch[f"{task}_attention_mask"] = pad_rows(
                [torch.ones(len(i), dtype=torch.bool) for i in ids], False
            )
            batch.update(image_fields(group, f"{task}_"))
            if task == "i2t":
                batch["i2t_labels"] = pad_rows([s["labels"] for s in group], IGNORE)
                batch["i2t_text_mask"] = pad_rows([s["text_mask"] for s in group], False)
                batch["i2t_padded"] = len({len(i) for i in ids}) > 1
                batch["i2t_max_answer"] = max(
                    max(int((s["labels"] != IGNORE).sum()) for s in group), 1
                )
        return batch
