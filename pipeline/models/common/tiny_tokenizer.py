"""A tiny Qwen2.5-style tokenizer for the ``tiny`` presets (CPU demo, tests, ablation): nothing is downloaded.

A byte-level BPE trained on the text of the synthetic scenes corpus (``data_prep synth``: its
questions, answers, captions and prompts) and the chat templates, with the Qwen2.5 special tokens
the families' templates use and eos ``<|im_end|>`` as in Qwen2.5-Instruct. Its vocabulary is large
enough that every word of that corpus is one token, as the released models read such text with
their real tokenizers (a BPE trained on other words would spell "hexagons" in seven pieces).

    python -m pipeline.models.common.tiny_tokenizer OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from data_prep.synthetic import TEXT_FIELDS, make_record

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TEMPLATE_TEXT = (
    "system\nYou are a helpful assistant.\nuser\nassistant\nGenerate an image: Generate an image."
)


def corpus_text(records: int = 3000, seed: int = 0) -> list[str]:
    """The text fields of ``records`` synthetic-corpus records (deterministic)."""
    texts = []
    for index in range(records):
        fields, _ = make_record(random.Random(f"tokenizer/{seed}/{index}"), 64)
        texts += [fields[key] for key in TEXT_FIELDS if key in fields]
    return texts


def make_tokenizer(directory: str | Path, vocab_size: int = 512) -> Path:
    """Train and save the tiny tokenizer into ``directory`` (deterministic)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(corpus_text() + [TEMPLATE_TEXT], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>")
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output", help="directory to write the tokenizer files to")
    print(f"wrote {make_tokenizer(parser.parse_args().output)}")


if __name__ == "__main__":
    main()
