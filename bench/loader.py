"""Does exactness cost throughput? Our loader against a plain webdataset pipeline, same work.

Both read the same data_prep shards of synthetic scenes and run the same per-sample work
(decode, resize to 224 px, tokenize the text) in 1 or 2 DataLoader workers, 16 samples per batch.
The plain pipeline is ``WebDataset(shards) -> shuffle -> decode("pil") -> map -> batched``.

    python bench/loader.py [--samples 1200] [--size 256] [--batches 60]
    python bench/loader.py --smoke    # seconds: 32 scenes of 64 px, 2 batches (a run check)

``--smoke``: the test suite runs it so the bench cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data_prep  # noqa: E402
from bench.measure import parse_args  # noqa: E402
from pipeline.data import DataConfig, TwoStreamLoader  # noqa: E402
from pipeline.models.common.tiny_tokenizer import make_tokenizer  # noqa: E402

BATCH = 16


class Preprocess:
    """The per-sample work both pipelines do: resize the image, tokenize the text."""

    def __init__(self, tokenizer_dir: str):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)

    def __call__(self, sample: dict) -> dict:
        image = sample["image"].convert("RGB").resize((224, 224))
        text = sample["prompt"] if sample["task"] == "t2i" else sample["messages"][-1]["content"]
        return {
            "pixels": torch.from_numpy(np.array(image)).permute(2, 0, 1),
            "input_ids": self.tokenizer(text)["input_ids"],
        }


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "lengths": [len(s["input_ids"]) for s in samples],
    }


def ours(shards: Path, preprocess: Preprocess, workers: int, batches: int) -> float:
    cfg = DataConfig(
        i2t=[str(shards)],
        t2i=[str(shards)],
        micro_batch_i2t=BATCH // 2,
        micro_batch_t2i=BATCH // 2,
        num_workers=workers,
        shuffle_block=1024,
    )
    start = time.perf_counter()
    for _ in itertools.islice(TwoStreamLoader(cfg, preprocess, collate), batches):
        pass
    return batches * BATCH / (time.perf_counter() - start)


def plain_webdataset(shards: Path, preprocess: Preprocess, workers: int, batches: int) -> float:
    urls = [str(p) for p in sorted(shards.glob("shard-*.tar"))]

    def process(sample: dict) -> dict:
        image_key = next(k for k in ("jpg", "png", "webp") if k in sample)
        return preprocess({**sample["json"], "image": sample[image_key]})

    pipeline = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
        .shuffle(1024)
        .decode("pil")
        .map(process)
        .batched(BATCH, collation_fn=collate)
    )
    loader = DataLoader(pipeline, batch_size=None, num_workers=workers)
    start = time.perf_counter()
    for _ in itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), batches):
        pass
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1200, help="synthetic scenes in the corpus")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--batches", type=int, default=60, help="batches timed per measurement")
    args = parse_args(parser, {"samples": 32, "size": 64, "batches": 2})
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = data_prep.synth(root / "synth", args.samples, size=args.size)
        data_prep.shard([f"jsonl:{source}"], root / "shards", shard_size=200)
        preprocess = Preprocess(str(make_tokenizer(root / "tokenizer")))
        rows = []
        for workers in (1, 2):
            plain = plain_webdataset(root / "shards", preprocess, workers, args.batches)
            exact = ours(root / "shards", preprocess, workers, args.batches)
            rows.append((workers, plain, exact))
    print(
        f"\n{args.samples} scenes of {args.size} px, {BATCH} samples/batch, {args.batches} batches timed, "
        f"decode + resize 224 + tokenize"
    )
    print(
        f"{'workers':>8}{'plain webdataset (samples/s)':>30}{'ours (samples/s)':>18}{'ours / plain':>14}"
    )
    for workers, plain, exact in rows:
        print(f"{workers:>8}{plain:>30.1f}{exact:>18.1f}{exact / plain:>14.2f}")
    print("target: ours / plain >= 0.9")


if __name__ == "__main__":
    main()
