"""The streaming loader (DESIGN §4) on shards made by data_prep from the synthetic corpus."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_prep import shard, synth
from data_prep.shard_index import read_index
from pipeline.data import DataConfig, TwoStreamLoader, parse_dataset_spec

SIZE = 8  # pixels of the test processor's output


class TinyProcessor:
    """A family-free processor: the image as a small tensor, plus what the tests look at."""

    def __call__(self, sample):
        image = sample["image"].resize((SIZE, SIZE))
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(
            SIZE, SIZE, 3
        )
        text = sample["prompt"] if sample["task"] == "t2i" else sample["messages"][-1]["content"]
        return {
            "pixels": pixels,
            "task": sample["task"],
            "input_ids": list(text.encode()),
            "pid": os.getpid(),
        }


def collate(samples):
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "tasks": [s["task"] for s in samples],
        "pids": [s["pid"] for s in samples],
    }


def make_dataset(root: Path, name: str, count: int, shard_size: int, seed: int) -> Path:
    src, out = root / f"{name}-src", root / name
    source = synth(src, count, seed=seed, size=64)
    shard([f"jsonl:{source}"], out, shard_size=shard_size, seed=seed)
    return out


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {
        "a": make_dataset(root, "a", 90, 17, seed=1),  # uneven shards: 17, 17, ..., 5
        "b": make_dataset(
            root, "b", 40, 40, seed=2
        ),  # one shard: fewer shards than ranks x workers
    }


def manifest_count(path: Path, task: str) -> int:
    return json.loads((path / "manifest.json").read_text())["totals"]["tasks"][task]


def make_loader(datasets, rank=0, world=1, grad_accum=1, **overrides) -> TwoStreamLoader:
    fields = dict(
        i2t=[str(datasets["a"])],
        t2i=[str(datasets["a"])],
        micro_batch_i2t=2,
        micro_batch_t2i=1,
        num_workers=0,
        shuffle_block=8,
        seed=5,
    )
    fields.update(overrides)
    return TwoStreamLoader(
        DataConfig(**fields),
        TinyProcessor(),
        collate,
        rank=rank,
        world_size=world,
        grad_accum=grad_accum,
    )


def take(loader: TwoStreamLoader, steps: int) -> list[dict]:
    return list(itertools.islice(loader, steps))


def keys_of(batches) -> list[tuple]:
    return [
        (b["step"], tuple(b["keys"].get("i2t", ())), tuple(b["keys"].get("t2i", ())))
        for b in batches
    ]


def test_same_config_gives_the_same_batches(datasets):
    first, second = take(make_loader(datasets), 12), take(make_loader(datasets), 12)
    assert keys_of(first) == keys_of(second)
    for a, b in zip(first, second):
        assert torch.equal(a["inputs"]["pixels"], b["inputs"]["pixels"])
    other_seed = take(make_loader(datasets, seed=6), 12)
    assert keys_of(other_seed) != keys_of(first)


def test_batches_hold_both_streams_with_their_tasks(datasets):
    batch = take(make_loader(datasets), 1)[0]
    assert batch["inputs"]["tasks"] == ["i2t", "i2t", "t2i"]
    assert batch["inputs"]["pixels"].shape == (3, SIZE, SIZE, 3)


def global_keys(datasets, name: str, world: int, accum: int, steps: int, **overrides) -> list:
    """The I2T keys of ``steps`` optimizer steps in global slot order, read rank by rank."""
    slots = []
    for rank in range(world):
        loader = make_loader(
            {"a": datasets[name]},
            rank=rank,
            world=world,
            grad_accum=accum,
            t2i=[],
            micro_batch_t2i=0,
            micro_batch_i2t=2,
            **overrides,
        )
        for b in take(loader, steps * accum):
            slots += [(b["step"], b["micro_batch"], i, k) for i, k in enumerate(b["keys"]["i2t"])]
    return [k for *_, k in sorted(slots)]


@pytest.mark.parametrize("name", ["a", "b"])
def test_every_split_of_the_global_batch_reads_the_same_samples_each_once_per_epoch(datasets, name):
    """A global batch of 12 (micro-batch 2) on 1, 2, 3 or 6 ranks with 6, 3, 2 or 1 micro-steps:
    the same samples in the same global slots, every sample once per epoch (uneven shards, and
    fewer shards than ranks x workers)."""
    total = manifest_count(datasets[name], "i2t")
    steps = total // 12 + 2
    reference = global_keys(datasets, name, 1, 6, steps)
    assert len(reference) == 12 * steps
    assert sorted(reference[:total]) == sorted(set(reference[:total]))  # each sample once
    assert len(set(reference[:total])) == total
    assert set(reference[total : 2 * total]) <= set(reference[:total])
    for world, accum in [(2, 3), (3, 2), (6, 1)]:
        workers = {"num_workers": 2} if name == "b" else {}
        assert global_keys(datasets, name, world, accum, steps, **workers) == reference


def test_a_resume_on_another_split_continues_with_the_uninterrupted_samples(datasets):
    """Stopped after 3 steps on 2 ranks, resumed on 1 rank with twice the micro-steps (and the
    reverse): the next steps read exactly what the uninterrupted run reads."""
    mixed = dict(i2t=[str(datasets["a"]), f"{datasets['b']}:0.5"], num_workers=0)

    def run(splits: list[tuple[int, int, int]]) -> list:
        """Steps per (world, accum) segment; returns the global keys of every step."""
        keys, state = [], None
        for world, accum, steps in splits:
            segment = []
            for rank in range(world):
                loader = make_loader(datasets, rank=rank, world=world, grad_accum=accum, **mixed)
                if state is not None:
                    loader.load_state_dict(state)
                for b in take(loader, steps * accum):
                    segment += [
                        (b["step"], b["micro_batch"], s, i, k)
                        for s, ks in b["keys"].items()
                        for i, k in enumerate(ks)
                    ]
                new_state = json.loads(json.dumps(loader.state_dict()))
            state = new_state
            keys += sorted(segment)
        return keys

    uninterrupted = run([(2, 1, 9)])
    assert run([(2, 1, 3), (1, 2, 4), (2, 1, 2)]) == uninterrupted
    with pytest.raises(RuntimeError, match="in the middle of step"):
        loader = make_loader(datasets, grad_accum=2, **mixed)
        take(loader, 1)
        loader.state_dict()


def test_the_next_epoch_reshuffles(datasets):
    total = manifest_count(datasets["a"], "i2t")
    loader = make_loader(datasets, t2i=[], micro_batch_t2i=0, micro_batch_i2t=1)
    keys = [b["keys"]["i2t"][0] for b in take(loader, 2 * total)]
    assert set(keys[:total]) == set(keys[total:])
    assert keys[:total] != keys[total:]


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2])
def test_resume_gives_exactly_the_uninterrupted_batches(datasets, workers, world):
    mixed = dict(i2t=[str(datasets["a"]), f"{datasets['b']}:0.5"], num_workers=0)
    for rank in range(world):
        reference = take(make_loader(datasets, rank=rank, world=world, **mixed), 14)
        for stop in (0, 5, 9):
            interrupted = make_loader(datasets, rank=rank, world=world, **mixed)
            take(interrupted, stop)
            state = json.loads(json.dumps(interrupted.state_dict()))  # it goes into a checkpoint
            resumed = make_loader(
                datasets, rank=rank, world=world, **{**mixed, "num_workers": workers}
            )
            resumed.load_state_dict(state)
            after = take(resumed, 14 - stop)
            assert keys_of(after) == keys_of(reference[stop:])
            for a, b in zip(after, reference[stop:]):
                assert torch.equal(a["inputs"]["pixels"], b["inputs"]["pixels"])


def test_resume_refuses_a_different_setup(datasets):
    loader = make_loader(datasets)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        make_loader(datasets, seed=99).load_state_dict(state)
    with pytest.raises(ValueError, match="shuffle_block: saved 8, now 4"):
        make_loader(datasets, shuffle_block=4).load_state_dict(state)


def test_the_order_does_not_depend_on_the_worker_count(datasets):
    base = keys_of(take(make_loader(datasets, num_workers=0), 9))
    assert keys_of(take(make_loader(datasets, num_workers=2), 9)) == base


def test_weights_mix_datasets_in_proportion(datasets):
    loader = make_loader(
        datasets,
        i2t=[f"{datasets['a']}:3", f"{datasets['b']}:1"],
        t2i=[],
        micro_batch_t2i=0,
        micro_batch_i2t=8,
    )
    sources = Counter(d for b in take(loader, 60) for d in b["sources"]["i2t"])
    share = sources[0] / (sources[0] + sources[1])
    assert abs(share - 0.75) < 0.05, sources


def test_workers_do_the_decoding(datasets):
    batches = take(make_loader(datasets, num_workers=2), 4)
    pids = {p for b in batches for p in b["inputs"]["pids"]}
    assert os.getpid() not in pids and len(pids) == 2


def corrupt(path: Path, shard_name: str, ext: str, which: int, fill: bytes = b"\xff") -> str:
    """Overwrite one member's bytes in place (same length); returns the sample's key."""
    shard = path / shard_name
    sample = [s for s in read_index(shard)[0] if ext in s.members][which]
    offset, size = sample.members[ext]
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write((fill * size)[:size])
    return sample.key


def test_corrupt_samples_are_skipped_counted_and_replaced(datasets, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(datasets["a"], broken)
    bad_image = corrupt(broken, "shard-000000.tar", "png", 0)
    bad_json = corrupt(broken, "shard-000001.tar", "json", 1, b"{")
    shard = broken / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated tar
    total = manifest_count(broken, "i2t") + manifest_count(broken, "t2i")
    loader = make_loader({"a": broken}, micro_batch_i2t=3, micro_batch_t2i=2)
    batches = take(loader, total // 5 + 2)  # a whole epoch of both streams
    for b in batches:
        assert b["inputs"]["pixels"].shape[0] == 5  # shapes never change
    keys = {k for b in batches for stream in b["keys"].values() for k in stream}
    assert bad_image not in keys and bad_json not in keys
    skipped = loader.stats()["skipped"]
    assert (
        skipped["bad_image"] >= 1 and skipped["bad_json"] >= 1 and skipped["truncated_shard"] >= 1
    ), skipped
    assert sum(skipped.values()) == sum(sum(b["skipped"].values()) for b in batches)


def test_missing_files_fail_at_start(datasets, tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest"):
        make_loader({"a": tmp_path})
    broken = tmp_path / "missing-shard"
    shutil.copytree(datasets["a"], broken)
    (broken / "shard-000001.tar").unlink()
    with pytest.raises(
        FileNotFoundError, match=r"shard-000001\.tar: listed in .*manifest\.json but missing"
    ):
        make_loader({"a": broken})


def test_config_errors_are_clear(datasets):
    with pytest.raises(ValueError, match=r"data\.micro_batch_i2t is 2 but no data\.i2t dataset"):
        make_loader(datasets, i2t=[], micro_batch_i2t=2)
    with pytest.raises(ValueError, match="nothing to load"):
        DataConfig(i2t=["x"], micro_batch_i2t=0, micro_batch_t2i=0)
    assert parse_dataset_spec("/d/x:0.25") == (Path("/d/x"), 0.25)
    assert parse_dataset_spec("/d/x") == (Path("/d/x"), 1.0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        parse_dataset_spec("/d/x:0")
    with pytest.raises(ValueError, match="grad_accum must be >= 1"):
        make_loader(datasets, grad_accum=0)
    # more ranks than samples is no error: a step's global slots run on into the next epochs
    assert take(make_loader(datasets, rank=499, world=500), 1)[0]["micro_batch"] == 499


def test_too_long_texts_are_skipped(datasets):
    loader = make_loader(datasets, max_text_tokens=12, t2i=[], micro_batch_t2i=0, micro_batch_i2t=4)
    batches = take(loader, 5)
    assert loader.stats()["skipped"].get("too_many_tokens", 0) > 0
    assert all(b["inputs"]["pixels"].shape[0] == 4 for b in batches)


def test_shards_without_an_index_sidecar_give_the_same_batches(datasets, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(datasets["a"], bare)
    removed = [p.unlink() or p for p in bare.glob("*.idx.json")]
    assert removed, "data_prep writes an index next to every shard"
    assert keys_of(take(make_loader({"a": bare}), 6)) == keys_of(take(make_loader(datasets), 6))
