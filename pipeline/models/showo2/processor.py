"""Show-o2 inputs: tokenizer with the Show-o2 tokens, chat template, image preprocessing, collate.

Sequences follow the official data code (``show-o2/datasets``):

- I2T (``mmu_dataset.py``, ``stage: tuning``): ``<|im_start|>`` + system prompt, then per turn
  ``"\\n<|im_start|>user\\n" + question + <|im_end|> + "\\n<|im_start|>assistant\\n"`` and the
  answer + ``<|im_end|>`` (the cross-entropy targets). ``<image>`` in the question becomes
  ``<|vision_start|>``, N+1 ``<|image_pad|>`` slots (the time token, then N image tokens) and
  ``<|vision_end|>``. Pieces are tokenized separately, as the official code does.
- T2I (``datasets/utils.py`` ``format_sequence_gen_qwen2_5``): ``<|im_start|>`` + prompt +
  ``<|vision_start|>`` + N+1 slots + ``<|vision_end|>`` + ``<|im_end|>``; no text targets.
- Images: I2T images are resized to fit and zero-padded to a square (``resize_and_pad_image``);
  T2I targets are resized on the short side and center-cropped (``image_transform``); both are
  scaled to [-1, 1].
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

from pipeline.models.common.latents import LATENTS, image_fields
from pipeline.models.common.processing import prompt_dropped
from pipeline.models.common.text import IGNORE, IMAGE_PLACEHOLDER, pad_rows
from pipeline.models.showo2.config import Showo2Config

ADDED_TOKENS = (IMAGE_PLACEHOLDER, "<|vid_start|>", "<|vid_end|>")


@dataclass(frozen=True)
class SpecialIds:
    bos: int
    eos: int
    boi: int
    eoi: int
    image_pad: int
    image: int
    pad: int


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """A Qwen2.5 tokenizer from a local directory with Show-o2's added tokens (``get_text_tokenizer``)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token != "[PAD]":
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.add_tokens([t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()])
    return tokenizer


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    vocab = tokenizer.get_vocab()
    names = {
        "bos": "<|im_start|>",
        "eos": "<|im_end|>",
        "boi": "<|vision_start|>",
        "eoi": "<|vision_end|>",
        "image_pad": "<|image_pad|>",
        "image": IMAGE_PLACEHOLDER,
        "pad": "[PAD]",
    }
    absent = [token for token in names.values() if token not in vocab]
    if absent:
        raise ValueError(
            f"tokenizer lacks Show-o2 tokens: {', '.join(absent)} (load it with load_tokenizer)"
        )
    if tokenizer.eos_token != "<|im_end|>":
        raise ValueError(
            f"tokenizer eos_token is {tokenizer.eos_token!r}; Show-o2 needs the Instruct '<|im_end|>'"
        )
    return SpecialIds(**{key: vocab[token] for key, token in names.items()})


def resize_and_pad(image: Image.Image, size: int) -> Image.Image:
    """Fit inside ``size``×``size`` keeping the aspect ratio, centred on black."""
    w, h = image.size
    scale = min(size / w, size / h)
    new_w, new_h = min(size, int(np.ceil(w * scale))), min(size, int(np.ceil(h * scale)))
    canvas = Image.new("RGB", (size, size))
    canvas.paste(
        image.resize((new_w, new_h), Image.Resampling.BICUBIC),
        ((size - new_w) // 2, (size - new_h) // 2),
    )
    return canvas


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Short side to ``size`` (bicubic), then the central ``size``×``size`` square."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image → [3, H, W] float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → PIL images."""
    array = (
        ((images.float().clamp(-1, 1) + 1) * 127.5)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .cpu()
        .numpy()
    )
    return [Image.fromarray(a) for a in array]


class Showo2Processor:
    """Raw samples → per-sample tensors; :meth:`collate` pads them into a batch.

    A sample is a mapping with ``task`` (``"i2t"`` / ``"t2i"``), ``image`` (PIL) and ``messages``
    (I2T) or ``prompt`` (T2I), optionally ``__key__``. With ``train=True``, a T2I prompt is
    dropped (replaced by ``""``) with probability ``cond_dropout_prob``, decided by a hash of
    ``seed`` and the sample key (or prompt): stateless, so a resumed run drops the same samples.
    """

    pixels_with_latents = ()

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, config: Showo2Config, *, train: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.train = train
        self.ids = special_ids(tokenizer)
        self.slot_len = config.num_image_tokens + 1
        self._system = self._encode(config.system_prompt) if config.system_prompt else []
        self._user = self._encode("\n<|im_start|>user\n")
        self._assistant = self._encode("\n<|im_start|>assistant\n")

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def __call__(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        task = sample.get("task")
        if task == "i2t":
            out = self.i2t_sequence(sample["messages"])
        elif task == "t2i":
            dropped = self.train and prompt_dropped(
                sample, self.config.seed, self.config.cond_dropout_prob
            )
            out = self.t2i_sequence("" if dropped else sample["prompt"])
        else:
            raise ValueError(f"sample task must be 'i2t' or 't2i', got {task!r}")
        if LATENTS in sample:
            out[LATENTS] = sample[LATENTS]
        else:
            out["pixel_values"] = self.vae_input(sample)
        return out

    def vae_input(self, sample: Mapping[str, Any]) -> torch.Tensor:
        """Both tasks' images go through the Wan VAE: I2T padded, T2I centre-cropped."""
        image, size = sample["image"].convert("RGB"), self.config.image_size
        if sample["task"] == "i2t":
            return to_tensor(resize_and_pad(image, size))
        return to_tensor(resize_and_center_crop(image, size))

    def vae_preprocessing(self) -> dict[str, Any]:
        return {
            "image_size": self.config.image_size,
            "i2t": "resize_and_pad bicubic, black",
            "t2i": "resize_and_center_crop bicubic",
        }

    def i2t_sequence(self, messages: Sequence[Mapping[str, str]]) -> dict[str, Any]:
        """Token ids and labels of a conversation; ending on a user turn adds the answer prompt."""
        ids, labels = [self.ids.bos], [IGNORE]
        for turn, message in enumerate(messages):
            if message["role"] == "user":
                content = message["content"]
                if content.endswith("\n" + IMAGE_PLACEHOLDER):
                    content = IMAGE_PLACEHOLDER + "\n" + content[: -len("\n" + IMAGE_PLACEHOLDER)]
                piece = (self._system if turn == 0 else []) + self._user + self._encode(content)
                piece += [self.ids.eos] + self._assistant
                ids += piece
                labels += [IGNORE] * len(piece)
            elif message["role"] == "assistant":
                piece = self._encode(message["content"] + self.tokenizer.eos_token)
                ids += piece
                labels += piece
            else:
                raise ValueError(
                    f"message role must be 'user' or 'assistant', got {message['role']!r}"
                )
        if ids.count(self.ids.image) != 1:
            raise ValueError(
                f"an I2T conversation needs exactly one {IMAGE_PLACEHOLDER} in its user turns"
            )
        at = ids.index(self.ids.image)
        block = [self.ids.boi] + [self.ids.image_pad] * self.slot_len + [self.ids.eoi]
        ids = ids[:at] + block + ids[at + 1 :]
        labels = labels[:at] + [IGNORE] * len(block) + labels[at + 1 :]
        ids, labels = ids[: self.config.max_seq_len], labels[: self.config.max_seq_len]
        offset = at + 1
        if offset + self.slot_len >= len(ids):
            raise ValueError(
                f"I2T sample exceeds max_seq_len={self.config.max_seq_len} before its image ends"
            )
        if messages[-1]["role"] == "assistant" and all(label == IGNORE for label in labels):
            raise ValueError(
                f"I2T sample: the answer does not fit in max_seq_len={self.config.max_seq_len}"
            )
        in_image = torch.zeros(len(ids), dtype=torch.bool)
        in_image[offset - 1 : offset + self.slot_len + 1] = True
        labels_t = torch.tensor(labels)
        return {
            "task": "i2t",
            "input_ids": torch.tensor(ids),
            "labels": labels_t,
            "text_mask": (labels_t == IGNORE) & ~in_image,
            "image_offset": offset,
        }

    def t2i_sequence(self, prompt: str) -> dict[str, Any]:
        max_text = self.config.max_seq_len - self.slot_len - 4
        prompt_ids = self._encode(prompt.replace("\n", ""))[:max_text]
        ids = [self.ids.bos] + prompt_ids + [self.ids.boi] + [self.ids.image_pad] * self.slot_len
        ids += [self.ids.eoi, self.ids.eos]
        text_mask = torch.zeros(len(ids), dtype=torch.bool)
        text_mask[: len(prompt_ids) + 1] = True
        return {
            "task": "t2i",
            "input_ids": torch.tensor(ids),
            "labels": torch.full((len(ids),), IGNORE),
            "text_mask": text_mask,
            "image_offset": len(prompt_ids) + 2,
        }

    def pad_sequences(self, samples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad the token fields to the longest sequence; keeps the sample order.

        ``und_index`` / ``gen_index`` list the rows of the I2T / T2I samples: the model reads
        each task's count from their shapes, so a training step needs no host sync.
        """
        if not samples:
            raise ValueError("cannot collate an empty list of samples")

        def padded(key: str, value: int | bool) -> torch.Tensor:
            return pad_rows([s[key] for s in samples], value)

        def rows_of(task: str) -> torch.Tensor:
            rows = [i for i, s in enumerate(samples) if s["task"] == task]
            return torch.tensor(rows, dtype=torch.long)

        return {
            "input_ids": padded("input_ids", self.ids.pad),
            "labels": padded("labels", IGNORE),
            "text_mask": padded("text_mask", False),
            "image_offset": torch.tensor([s["image_offset"] for s in samples]),
            "lengths": torch.tensor([len(s["input_ids"]) for s in samples]),
            "und_index": rows_of("i2t"),
            "gen_index": rows_of("t2i"),
        }

    def collate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """A training batch: padded token fields plus the stacked images, and ``max_answer`` (an
        int: the most answer tokens of an I2T row, at least 1), which bounds the answer loss's
        rows without a host sync in the model."""
        batch: dict[str, Any] = self.pad_sequences(samples)
        batch.update(image_fields(samples))
        answers = [
            int(torch.as_tensor(s["labels"]).ne(IGNORE).sum())
            for s in samples
            if s["task"] == "i2t"
        ]
        batch["max_answer"] = max(answers, default=1) or 1
        return batch
