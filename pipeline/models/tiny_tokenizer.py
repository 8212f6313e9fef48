"""A tiny Qwen2.5-style tokenizer for the ``tiny`` presets (CPU demo, tests): nothing is downloaded.

A byte-level BPE trained on synthetic scene text with the Qwen2.5 special tokens the families'
chat templates use and eos ``<|im_end|>`` as in Qwen2.5-Instruct.

    python -m pipeline.models.tiny_tokenizer OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
WORDS = ("a red circle on a blue square the green triangle near yellow sky what is in this image describe "
         "picture there are two three shapes small large left right top bottom photo of cat dog how many "
         "purple orange hexagon star color colour below above is yes no generate an").split()


def synthetic_text(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def make_tokenizer(directory: str | Path, vocab_size: int = 320) -> Path:
    """Train and save the tiny tokenizer into ``directory`` (deterministic)."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="directory to write the tokenizer files to")
    print(f"wrote {make_tokenizer(parser.parse_args().output)}")


if __name__ == "__main__":
    main()
