"""Streaming loader for data_prep shards: two task streams, deterministic, exactly resumable,
on any number of ranks.

Every micro-step yields, on each rank, one batch of ``micro_batch_i2t`` I2T and ``micro_batch_t2i``
T2I samples, decoded and preprocessed in worker processes by the adapter's processor and collated
by its collate function (the loader knows no model family).

The order is defined on global sample slots and computed from the manifests' sample counts alone:

* An optimizer step consumes the next ``global_batch`` slots of each stream: its ``world x
  grad_accum`` micro-batches of ``micro_batch`` slots each. Micro-step k of rank r takes
  micro-batch q = k * world + r, i.e. the slots [q * micro_batch, (q + 1) * micro_batch). The
  micro-batches themselves, and so every sample's place in the step, do not depend on how the
  global batch is split between ranks and accumulation.
* Stream mixing: the dataset of each slot of step t is drawn by weight from an RNG seeded with
  (seed, stream, t), identical on every rank; per-dataset read positions are global.
* Dataset d is one endless sequence of positions. Position p lies in epoch e = p // total_d.
  Epoch e shuffles the shard order, concatenates the shards' samples of the task and permutes them
  within blocks of ``shuffle_block`` samples (the shuffle buffer). Each epoch therefore gives
  every sample exactly once, whatever the number of ranks, however uneven the shards.
* The loader's state is rank-free (the step and the samples consumed per dataset), so a run
  resumes on another number of ranks with exactly the samples an uninterrupted run would take.
* Micro-batches are dealt round-robin to the workers, which is the order the DataLoader returns
  them in; so the result does not depend on the number of workers either.

Each sample is read with one seek through the shard's index (``data_prep.shard_index``); resuming
at step t reads nothing that came before. A sample that cannot be used (bad image bytes, bad
json, truncated tar, a processor error, too many text tokens) is skipped, counted by reason and
replaced by the next readable position of the same dataset, so batch shapes never change.
"""

from __future__ import annotations

import bisect
import io
import json
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from data_prep.latents import SidecarReader, SkippedSample, sidecar_name
from data_prep.schema import IMAGE_EXTENSIONS, JSON_EXTENSION, MANIFEST_FILE, TASKS
from data_prep.shard_index import IndexedSample, read_index
from pipeline.config import param
from pipeline.models.common.latents import LATENTS

if TYPE_CHECKING:
    from pipeline.latent_cache import LatentSource

STREAMS = TASKS  # ("i2t", "t2i"); a stream is named after the task it carries
MAX_CONSECUTIVE_BAD = 256  # unreadable positions in a row before a dataset is declared broken


@dataclass
class DataConfig:
    i2t: list[str] = param(
        default_factory=list, help="I2T datasets: data_prep output dirs, each 'DIR[:weight]'"
    )
    t2i: list[str] = param(
        default_factory=list, help="T2I datasets: data_prep output dirs, each 'DIR[:weight]'"
    )
    micro_batch_i2t: int = param(
        4, ge=0, help="I2T samples per rank per micro-step (0 disables the stream)"
    )
    micro_batch_t2i: int = param(
        4, ge=0, help="T2I samples per rank per micro-step (0 disables the stream)"
    )
    global_batch: int | None = param(
        None,
        ge=1,
        help="samples per optimizer step over all ranks and both streams; the gradient "
        "accumulation becomes global_batch / ((micro_batch_i2t + micro_batch_t2i) x ranks), so "
        "the run keeps its batch on any number of GPUs (unset: the micro-batch x grad_accum x "
        "ranks of the first start, kept on resume)",
    )
    num_workers: int = param(
        2, ge=0, help="decode/preprocess worker processes per rank (0: in the main process)"
    )
    prefetch_factor: int = param(2, ge=1, help="batches each worker prepares ahead")
    shuffle_block: int = param(
        4096, ge=1, help="samples permuted together inside a rank's epoch slice"
    )
    seed: int = param(0, help="seeds shard order, block permutations and stream mixing")
    max_text_tokens: int | None = param(
        None, ge=1, help="skip samples whose processed input_ids are longer"
    )
    latent_cache: Literal["auto", "required", "off"] = param(
        "auto",
        help="VAE latents from the datasets' caches (python -m data_prep encode): auto = when "
        "every dataset has one matching the model, required = refuse to start without, off = "
        "always encode on the fly; a cache of another VAE is an error unless off",
    )

    def __post_init__(self) -> None:
        if not any(self.micro_batch(s) > 0 for s in STREAMS):
            raise ValueError(
                "both micro_batch_i2t and micro_batch_t2i are 0: there is nothing to load"
            )

    def check_datasets(self) -> None:
        """Each enabled stream has datasets (checked when loading, so recipes may leave paths
        out)."""
        for stream in STREAMS:
            if self.micro_batch(stream) > 0 and not getattr(self, stream):
                raise ValueError(
                    f"data.micro_batch_{stream} is {self.micro_batch(stream)} but no data.{stream} "
                    f"dataset is given (e.g. data.{stream}=[/path/to/shards])"
                )

    def micro_batch(self, stream: str) -> int:
        return getattr(self, f"micro_batch_{stream}")

    def datasets(self) -> dict[str, list[Path]]:
        """The dataset directories of each enabled stream."""
        return {
            s: [parse_dataset_spec(spec)[0] for spec in getattr(self, s)]
            for s in STREAMS
            if self.micro_batch(s) > 0
        }


def parse_dataset_spec(spec: str) -> tuple[Path, float]:
    """``DIR`` or ``DIR:weight`` -> (path, weight)."""
    path, sep, weight = spec.rpartition(":")
    if sep:
        try:
            value = float(weight)
        except ValueError:
            return Path(spec), 1.0
        if not value > 0:
            raise ValueError(f"dataset {spec!r}: weight must be > 0")
        return Path(path), value
    return Path(spec), 1.0


@dataclass(frozen=True)
class ShardSpan:
    path: str
    count: int  # samples of the stream's task in this shard (manifest)


class DatasetOrder:
    """One dataset's endless, epoch-by-epoch shuffled sequence of its task samples (the same on
    every rank: positions are global)."""

    def __init__(self, path: Path, shards: list[ShardSpan], *, seed: Sequence[int], block: int):
        self.path, self.shards, self.seed, self.block = path, shards, tuple(seed), block
        self.total = sum(s.count for s in shards)
        self._epoch_cache: tuple[int, list[int], list[int]] | None = None
        self._block_cache: tuple[tuple[int, int], np.ndarray] | None = None

    def locate(self, position: int) -> tuple[str, int]:
        """(shard path, index among the shard's samples of this task) at ``position``."""
        epoch, i = divmod(position, self.total)
        order, starts = self._epoch(epoch)
        b, offset = divmod(i, self.block)
        g = b * self.block + int(self._permutation(epoch, b)[offset])
        k = bisect.bisect_right(starts, g) - 1
        return self.shards[order[k]].path, g - starts[k]

    def _epoch(self, epoch: int) -> tuple[list[int], list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = _rng(*self.seed, epoch).permutation(len(self.shards)).tolist()
            starts = np.concatenate(
                [[0], np.cumsum([self.shards[k].count for k in order])[:-1]]
            ).tolist()
            self._epoch_cache = (epoch, order, starts)
        return self._epoch_cache[1], self._epoch_cache[2]

    def _permutation(self, epoch: int, b: int) -> np.ndarray:
        if self._block_cache is None or self._block_cache[0] != (epoch, b):
            size = min(self.block, self.total - b * self.block)
            self._block_cache = ((epoch, b), _rng(*self.seed, epoch, b).permutation(size))
        return self._block_cache[1]


def _rng(*keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in keys])))


def read_manifest(path: Path, stream: str) -> list[ShardSpan]:
    """The shards of a data_prep directory holding samples of ``stream``; clear errors at start."""
    manifest_file = path / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_file.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{manifest_file}: no manifest (is {path} a data_prep output directory?)"
        ) from None
    except ValueError as e:
        raise ValueError(f"{manifest_file}: not valid JSON ({e})") from None
    spans = []
    for shard in manifest.get("shards", []):
        shard_path = path / shard["name"]
        if not shard_path.is_file():
            raise FileNotFoundError(f"{shard_path}: listed in {manifest_file} but missing")
        count = int(shard.get("tasks", {}).get(stream, 0))
        if count:
            spans.append(ShardSpan(str(shard_path), count))
    if not spans:
        raise ValueError(f"{manifest_file}: no {stream} samples in this dataset")
    return spans


class StepPlanner:
    """Which (dataset, position) fills each global slot of each optimizer step; the same on every
    rank and for every split of the global batch."""

    def __init__(
        self, weights: Mapping[str, list[float]], global_batch: Mapping[str, int], seed: int
    ):
        self.global_batch = dict(global_batch)
        self.probs = {s: np.asarray(w) / np.sum(w) for s, w in weights.items()}
        self.seed = seed

    def slots(self, step: int, positions: dict[str, list[int]]) -> dict[str, list[tuple[int, int]]]:
        """The global slots of ``step``; advances ``positions`` (per stream, per dataset) past
        them."""
        out = {}
        for sid, stream in enumerate(STREAMS):
            n = self.global_batch.get(stream, 0)
            if n == 0:
                continue
            probs = self.probs[stream]
            choices = (
                [0] * n
                if len(probs) == 1
                else _rng(self.seed, sid, step).choice(len(probs), n, p=probs)
            )
            slots = []
            for d in choices:
                slots.append((int(d), positions[stream][d]))
                positions[stream][d] += 1
            out[stream] = slots
        return out


class ShardReader:
    """Reads one sample's members by seeking through the shard's index; keeps a few files open.
    Its ``sidecars`` read the samples' cached latents."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._files: OrderedDict[str, Any] = OrderedDict()
        self._indexes: dict[str, dict[str, list[IndexedSample]]] = {}
        self.sidecars = SidecarReader(max_open)

    def index(self, shard: str) -> dict[str, list[IndexedSample]]:
        if shard not in self._indexes:
            samples, _ = read_index(shard)
            by_task: dict[str, list[IndexedSample]] = {}
            for s in samples:
                by_task.setdefault(s.task or "", []).append(s)
            self._indexes[shard] = by_task
        return self._indexes[shard]

    def read(self, shard: str, task: str, j: int) -> tuple[str, dict[str, bytes]]:
        samples = self.index(shard).get(task, [])
        if j >= len(samples):
            raise SampleError(
                "truncated_shard",
                f"{shard}: {task} sample #{j} is missing (tar shorter than its manifest)",
            )
        sample = samples[j]
        f = self._file(shard)
        members = {}
        for ext, (offset, size) in sample.members.items():
            f.seek(offset)
            data = f.read(size)
            if len(data) != size:
                raise SampleError("truncated_shard", f"{shard}: {sample.key}.{ext} is cut short")
            members[ext] = data
        return sample.key, members

    def _file(self, shard: str):
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard]
        if len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        self._files[shard] = open(shard, "rb")
        return self._files[shard]


class SampleError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def decode_sample(
    key: str, members: Mapping[str, bytes], task: str, decode_image: bool = True
) -> dict[str, Any]:
    """data_prep sample -> ``{"__key__", "image": PIL RGB, **json}`` (what processors take);
    without ``decode_image`` the image member is not decoded (its latents come from a cache)."""
    try:
        meta = json.loads(members[JSON_EXTENSION])
        if not isinstance(meta, dict) or meta.get("task") != task:
            found = meta.get("task") if isinstance(meta, dict) else None
            raise ValueError(f"task is {found!r}, expected {task!r}")
    except (KeyError, ValueError, UnicodeDecodeError) as e:
        raise SampleError("bad_json", f"{key}: {e}") from None
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise SampleError("no_image", f"{key}: no image member")
    if not decode_image:
        return {**meta, "__key__": key}
    try:
        with Image.open(io.BytesIO(members[ext])) as image:
            image.load()
            rgb = image.convert("RGB")
    except Exception as e:  # PIL raises many types for bad bytes
        raise SampleError("bad_image", f"{key}.{ext}: {e}") from None
    return {**meta, "__key__": key, "image": rgb}


class _StepDataset(IterableDataset):
    """Yields this rank's micro-batches of steps start, start+1, ...; a worker keeps only its own
    (micro-batch number u of the stream goes to worker u mod workers)."""

    def __init__(self, loader: TwoStreamLoader, start: int, positions: dict[str, list[int]]):
        self.loader = loader
        self.start = start
        self.positions = positions

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        loader = self.loader
        positions = {s: list(p) for s, p in self.positions.items()}
        reader = ShardReader()
        step, u = self.start, 0
        while True:
            slots = loader.planner.slots(step, positions)
            for micro in range(loader.grad_accum):
                if u % workers == worker:
                    yield loader.make_batch(step, micro, slots, reader)
                u += 1
            step += 1


class TwoStreamLoader:
    """Iterate for this rank's micro-batches, ``grad_accum`` per optimizer step; ``state_dict()``
    after a step's last micro-batch resumes right after that step, on any number of ranks.

    Each item is ``{"inputs": collated batch, "step": int, "micro_step": int, "micro_batch": int
    (its number q in the step), "keys": {stream: [key, ...]}, "sources": {stream: [dataset index,
    ...]}, "skipped": {reason: count}}``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        processor: Callable[[Mapping[str, Any]], dict[str, Any]],
        collate: Callable[[list[dict[str, Any]]], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
        pin_memory: bool = False,
        latents: LatentSource | None = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
        cfg.check_datasets()
        self.cfg, self.processor, self.collate = cfg, processor, collate
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.pin_memory = pin_memory
        self.latents = latents
        self.orders: dict[str, list[DatasetOrder]] = {}
        weights = {}
        for sid, stream in enumerate(STREAMS):
            if cfg.micro_batch(stream) == 0:
                continue
            specs = [parse_dataset_spec(s) for s in getattr(cfg, stream)]
            self.orders[stream] = [
                DatasetOrder(
                    path,
                    read_manifest(path, stream),
                    seed=(cfg.seed, sid, d),
                    block=cfg.shuffle_block,
                )
                for d, (path, _) in enumerate(specs)
            ]
            weights[stream] = [w for _, w in specs]
        self.global_batch = {s: cfg.micro_batch(s) * world_size * grad_accum for s in self.orders}
        self.planner = StepPlanner(weights, self.global_batch, cfg.seed)
        self.step = 0
        self.positions = {s: [0] * len(o) for s, o in self.orders.items()}
        self.skipped: Counter[str] = Counter()
        self._micro = 0  # micro-batches of the current step already yielded

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Rank-free: the step, the samples consumed per dataset, the global batch per stream."""
        if self._micro:
            raise RuntimeError(
                f"loader state asked for in the middle of step {self.step} "
                f"({self._micro} of {self.grad_accum} micro-batches taken)"
            )
        return {
            "step": self.step,
            "positions": {s: list(p) for s, p in self.positions.items()},
            "global_batch": dict(self.global_batch),
            "skipped": dict(self.skipped),
            "fingerprint": self.fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        now = self.fingerprint()
        mismatched = [k for k, v in now.items() if state["fingerprint"].get(k) != v]
        if mismatched:
            details = "; ".join(
                f"{k}: saved {state['fingerprint'].get(k)!r}, now {now[k]!r}" for k in mismatched
            )
            raise ValueError(
                "loader state does not match this data setup, exact resume is impossible "
                f"({details})"
            )
        self.step = int(state["step"])
        self.positions = {s: list(p) for s, p in state["positions"].items()}
        self.skipped = Counter(state.get("skipped", {}))
        self._micro = 0

    def fingerprint(self) -> dict[str, Any]:
        """What the data order depends on besides the batch (the number of ranks is not in it)."""
        return {
            "seed": self.cfg.seed,
            "shuffle_block": self.cfg.shuffle_block,
            "datasets": {
                s: [[str(o.path), o.total] for o in orders] for s, orders in self.orders.items()
            },
            "weights": {s: self.planner.probs[s].round(12).tolist() for s in self.orders},
        }

    def epochs(self) -> dict[str, list[int]]:
        """Current epoch of each dataset of each stream."""
        return {
            s: [p // o.total for p, o in zip(self.positions[s], self.orders[s])]
            for s in self.orders
        }

    def stats(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": dict(self.skipped), "epochs": self.epochs()}

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        dataset = _StepDataset(self, self.step, self.positions)
        workers = self.cfg.num_workers
        # Its own generator: creating workers must not draw from the global RNG.
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        self._micro = 0
        for batch in loader:
            if (batch["step"], batch["micro_step"]) != (self.step, self._micro):
                raise RuntimeError(
                    f"loader returned step {batch['step']} micro-step {batch['micro_step']}, "
                    f"expected {self.step}/{self._micro}"
                )
            self.skipped.update(batch["skipped"])
            self._micro += 1
            if self._micro == self.grad_accum:
                self.planner.slots(self.step, self.positions)
                self.step += 1
                self._micro = 0
            yield batch

    def micro_batch_number(self, micro: int) -> int:
        """q of this rank's micro-step ``micro``: its place among the step's micro-batches."""
        return micro * self.world_size + self.rank

    def make_batch(
        self, step: int, micro: int, slots: dict[str, list[tuple[int, int]]], reader: ShardReader
    ) -> dict[str, Any]:
        q = self.micro_batch_number(micro)
        samples, keys, sources, skipped = [], {}, {}, Counter()
        for stream, stream_slots in slots.items():
            n = self.cfg.micro_batch(stream)
            keys[stream], sources[stream] = [], []
            for d, position in stream_slots[q * n : (q + 1) * n]:
                key, sample = self._first_usable(stream, d, position, reader, skipped)
                keys[stream].append(key)
                sources[stream].append(d)
                samples.append(sample)
        return {
            "inputs": self.collate(samples),
            "step": step,
            "micro_step": micro,
            "micro_batch": q,
            "keys": keys,
            "sources": sources,
            "skipped": dict(skipped),
        }

    def _first_usable(
        self, stream: str, d: int, position: int, reader: ShardReader, skipped: Counter[str]
    ) -> tuple[str, dict[str, Any]]:
        order = self.orders[stream][d]
        cache = self._cache_of(order.path, stream)
        decode_image = cache is None or stream in self.latents.decode_images
        for p in range(position, position + MAX_CONSECUTIVE_BAD):
            shard, j = order.locate(p)
            try:
                key, members = reader.read(shard, stream, j)
                sample = decode_sample(key, members, stream, decode_image)
                if cache is not None:
                    sample[LATENTS] = self._cached(reader, cache / sidecar_name(shard), key)
                processed = self._process(key, sample)
            except SampleError as e:
                skipped[e.reason] += 1
                continue
            return key, processed
        raise RuntimeError(
            f"{order.path}: {MAX_CONSECUTIVE_BAD} unusable {stream} samples in a row from position "
            f"{position}; skips so far: {dict(skipped)}"
        )

    def _cache_of(self, dataset: Path, stream: str) -> Path | None:
        """The latent cache directory of ``dataset`` when this run reads ``stream``'s latents."""
        if self.latents is None or stream not in self.latents.tasks:
            return None
        return self.latents.directories[str(dataset)]

    @staticmethod
    def _cached(reader: ShardReader, sidecar: Path, key: str) -> dict[str, torch.Tensor]:
        try:
            return reader.sidecars.read(sidecar, key)
        except SkippedSample as e:  # the encoder could not use it: the reason it found
            raise SampleError(e.reason, str(e)) from None

    def _process(self, key: str, sample: dict[str, Any]) -> dict[str, Any]:
        try:
            out = self.processor(sample)
        except (ValueError, KeyError, OSError) as e:
            raise SampleError("processor_error", f"{key}: {e}") from None
        limit = self.cfg.max_text_tokens
        if limit is not None and len(out.get("input_ids", ())) > limit:
            raise SampleError(
                "too_many_tokens", f"{key}: {len(out['input_ids'])} text tokens > {limit}"
            )
        return out
