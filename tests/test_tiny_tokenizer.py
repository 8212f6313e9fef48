"""The tiny tokenizer reads the synthetic corpus word by word, and is trained deterministically."""

from __future__ import annotations

import re

from transformers import AutoTokenizer

from pipeline.models.common.tiny_tokenizer import QWEN_SPECIAL_TOKENS, corpus_text, make_tokenizer


def test_every_word_and_mark_of_unseen_corpus_text_is_one_token(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = corpus_text(400, seed=1)  # other records than the ones it was trained on
    assert {"yes", "no", "hexagon", "diamond"} <= {w for t in texts for w in re.findall(r"\w+", t)}
    for text in texts:
        pieces = re.findall(r"\w+|[^\w\s]", text)
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
        assert len(tokens) == len(pieces), (text, tokens)


def test_special_tokens_and_determinism(tokenizer_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    assert tokenizer.eos_token == "<|im_end|>"
    for token in QWEN_SPECIAL_TOKENS:
        assert tokenizer.convert_ids_to_tokens(tokenizer(token)["input_ids"]) == [token]
    again = make_tokenizer(tmp_path / "again")
    assert (again / "tokenizer.json").read_bytes() == (
        tokenizer_dir / "tokenizer.json"
    ).read_bytes()
