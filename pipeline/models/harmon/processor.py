"""Harmon inputs: the Qwen chat template, image preprocessing, per-sample tensors and collate.

Sequences follow the official data code (wusize/Harmon with xtuner's ``qwen_chat`` template and
``encode_fn``; Qwen tokenizers add no BOS):

- I2T (``src/datasets/understanding/caption_datasets.py``): per turn
  ``"<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"`` (no loss), then the answer +
  ``<|im_end|>`` (the cross-entropy targets), then ``"\\n"`` (no loss); no system prompt. The text
  around ``<image>`` is tokenized in separate pieces and ``<image>`` becomes ``N + buffer_size``
  image slots (no begin/end markers). Images: padded to a square with grey (127, 127, 127)
  (``expand2square``), resized to ``image_size``.
- T2I (``src/datasets/text2image/text2image.py``): the instruction ``"Generate an image: {caption}"``
  (or, with probability ``uncond_prob``, ``"Generate an image."``) inside the user/assistant template,
  tokenized as one string and truncated to ``t2i_max_prompt_tokens``; the image tokens are appended
  by the model. Images: a square crop at a random offset along the long side (``crop2square``),
  resized to ``image_size``.
- Pixels are scaled to [-1, 1]; batches are right-padded with ``<|im_end|>`` (``pad_index=151645``).
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

from pipeline.models.harmon.config import HarmonConfig
from pipeline.models.common.latents import LATENTS, image_fields
from pipeline.models.common.processing import keyed_fraction
from pipeline.models.common.text import IGNORE, IMAGE_PLACEHOLDER, pad_rows

INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
SUFFIX = "<|im_end|>"
SEP = "\n"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The Qwen2.5-Instruct tokenizer from a local directory (Harmon adds no tokens)."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def expand_to_square(
    image: Image.Image, fill: tuple[int, int, int] = (127, 127, 127)
) -> Image.Image:
    """Pad the short side (content centred, offset rounded down) to a square of ``fill``."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def crop_to_square(image: Image.Image, fraction: float) -> Image.Image:
    """The square whose offset along the long side is ``fraction`` ∈ [0, 1) of the free range (inclusive)."""
    w, h = image.size
    offset = int(fraction * (abs(w - h) + 1))
    box = (offset, 0, offset + h, h) if w > h else (0, offset, w, offset + w)
    return image.crop(box)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → [3, H, W] float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(2.0 * array - 1.0).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class SpecialIds:
    eos: int
    pad: int


class HarmonProcessor:
    """Raw samples → per-sample tensors; :meth:`collate` pads them into a batch.

    A sample is a mapping with ``task`` (``"i2t"`` / ``"t2i"``), ``image`` (PIL) and ``messages``
    (I2T) or ``prompt`` (T2I), optionally ``__key__``. With ``train=True`` the T2I prompt dropout
    and the crop offset are decided by a hash of ``seed`` and the sample key (or prompt): stateless,
    so a resumed run makes the same choices.
    """

    pixels_with_latents = ()

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: HarmonConfig, *, train: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.train = train
        vocab = tokenizer.get_vocab()
        absent = [t for t in ("<|im_start|>", SUFFIX) if t not in vocab]
        if absent:
            raise ValueError(f"tokenizer lacks the Qwen chat tokens {', '.join(absent)}")
        if tokenizer.eos_token != SUFFIX:
            raise ValueError(
                f"tokenizer eos_token is {tokenizer.eos_token!r}; Harmon needs the Instruct {SUFFIX!r}"
            )
        self.ids = SpecialIds(eos=vocab[SUFFIX], pad=vocab[SUFFIX])
        self.image_len = config.num_llm_image_tokens

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _hash(self, sample: Mapping[str, Any], purpose: str) -> float:
        return keyed_fraction(
            self.config.seed, purpose, sample.get("__key__", sample.get("prompt", ""))
        )

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        task = sample.get("task")
        if task == "i2t":
            out = self.i2t_sequence(sample["messages"])
        elif task == "t2i":
            dropped = self.train and self._hash(sample, "drop") < self.config.uncond_prob
            out = self.t2i_sequence(None if dropped else sample["prompt"])
        else:
            raise ValueError(f"sample task must be 'i2t' or 't2i', got {task!r}")
        if LATENTS in sample:
            out[LATENTS] = sample[LATENTS]
        else:
            out["pixel_values"] = self.vae_input(sample)
        return out

    def vae_input(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """Both tasks' images go through the KL-16 VAE: I2T padded to a square, T2I cropped."""
        image, size = sample["image"].convert("RGB"), self.config.image_size
        if sample["task"] == "i2t":
            square = expand_to_square(image)
        else:
            square = crop_to_square(image, self._hash(sample, "crop") if self.train else 0.5)
        return to_tensor(square.resize((size, size), Image.Resampling.BICUBIC))

    def vae_preprocessing(self) -> dict[str, Any]:
        return {
            "image_size": self.config.image_size,
            "i2t": "expand_to_square grey 127, bicubic",
            "t2i": f"crop_to_square at keyed offset (seed {self.config.seed}), bicubic"
            if self.train
            else "crop_to_square centred, bicubic",
        }

    def i2t_sequence(self, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        """Token ids and labels of a conversation; ending on a user turn leaves the answer prompt open."""
        ids: list[int] = []
        labels: list[int] = []
        offset = None
        for message in messages:
            if message["role"] == "user":
                text = INSTRUCTION.format(input=message["content"])
                pieces = text.split(IMAGE_PLACEHOLDER)
                if len(pieces) > 2 or (len(pieces) == 2 and offset is not None):
                    raise ValueError(f"an I2T conversation needs exactly one {IMAGE_PLACEHOLDER}")
                for i, piece in enumerate(pieces):
                    if i:
                        offset = len(ids)
                        ids += [self.ids.pad] * self.image_len
                    ids += self._encode(piece)
                labels += [IGNORE] * (len(ids) - len(labels))
            elif message["role"] == "assistant":
                answer = self._encode(message["content"].strip() + SUFFIX)
                sep = self._encode(SEP)
                ids += answer + sep
                labels += answer + [IGNORE] * len(sep)
            else:
                raise ValueError(
                    f"message role must be 'user' or 'assistant', got {message['role']!r}"
                )
        if offset is None:
            raise ValueError(
                f"an I2T conversation needs exactly one {IMAGE_PLACEHOLDER} in its user turns"
            )
        budget = self.config.i2t_max_text_tokens
        ids, labels = ids[: budget + self.image_len], labels[: budget + self.image_len]
        if offset + self.image_len > len(ids):
            raise ValueError(f"I2T sample: the image does not fit in i2t_max_text_tokens={budget}")
        if messages[-1]["role"] == "assistant" and all(label == IGNORE for label in labels):
            raise ValueError(f"I2T sample: the answer does not fit in i2t_max_text_tokens={budget}")
        labels_t = torch.tensor(labels)
        text_mask = labels_t == IGNORE
        text_mask[offset : offset + self.image_len] = False
        return {
            "task": "i2t",
            "input_ids": torch.tensor(ids),
            "labels": labels_t,
            "text_mask": text_mask,
            "image_offset": offset,
        }

    def t2i_sequence(self, prompt: str | None) -> dict[str, Any]:
        """The templated T2I prompt; ``None`` gives the unconditional prompt."""
        text = (
            self.config.uncond_prompt
            if prompt is None
            else self.config.t2i_prompt.format(prompt=prompt.strip())
        )
        ids = self._encode(INSTRUCTION.format(input=text))[: self.config.t2i_max_prompt_tokens]
        return {"task": "t2i", "input_ids": torch.tensor(ids)}

    def pad_ids(self, rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded token ids and their validity mask."""
        return pad_rows(rows, self.ids.pad), pad_rows(
            [torch.ones(len(r), dtype=torch.bool) for r in rows], False
        )

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A training batch of flat tensors: ``u_*`` for the I2T samples, ``g_*`` for the T2I samples
        (a branch without samples has no keys), sample order kept within each branch.

        ``u_max_answer`` (an int: the most answer tokens of a row, at least 1) lets the training
        step size the answer tensors without reading the labels back from the device.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")
        batch: dict[str, Any] = {}
        und = [s for s in samples if s["task"] == "i2t"]
        gen = [s for s in samples if s["task"] == "t2i"]
        if und:
            batch["u_input_ids"], batch["u_attention_mask"] = self.pad_ids(
                [s["input_ids"] for s in und]
            )
            batch["u_labels"] = pad_rows([s["labels"] for s in und], IGNORE)
            batch["u_text_mask"] = pad_rows([s["text_mask"] for s in und], False)
            batch["u_image_offset"] = torch.tensor([s["image_offset"] for s in und])
            batch.update(image_fields(und, "u_"))
            batch["u_max_answer"] = max(max(int((s["labels"] != IGNORE).sum()) for s in und), 1)
        if gen:
            batch["g_input_ids"], batch["g_attention_mask"] = self.pad_ids(
                [s["input_ids"] for s in gen]
            )
            batch.update(image_fields(gen, "g_"))
        return batch
