"""Encode a dataset's images with a recipe's frozen VAE once, before training.

    python -m data_prep encode --config configs/showo2_1.5b.yaml [--dataset DIR ...] [key=value ...]
    srun python -m data_prep encode --config ...              (one process per GPU)
    torchrun --nproc-per-node 8 -m pipeline.encode --config ...

``python -m data_prep encode`` runs this module (the one data_prep command that needs the models).
Every image of the tasks the family's VAE encodes goes through the recipe's preprocessing and the
VAE, in the dtype training runs it in; its posterior (what training draws the latent from) goes
into ``DIR/latents/<family>/`` beside the shards (format: ``data_prep.latents``). Training then
reads it instead of encoding at every step (``data.latent_cache``).

The model is built as training builds it (same seed, same order: a randomly initialised VAE
comes out the same, and its weights are what the cache identity hashes); only the VAE moves to the
device. Rank r of W encodes shards r, r+W, ... of each dataset; a shard's sidecar depends only on
the shard, ``--batch-size`` and the device (on a CPU, its threads), so any number of ranks writes
the same bytes. A sidecar is renamed into place when whole
and its receipt written after it, so a rerun after ``kill -9`` skips the finished shards. Rank 0
writes the manifest when every shard has its sidecar, and accounts for every sample: encoded, or
skipped with the reason the loader would give.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_prep.errors import CommandError
from data_prep.latents import (
    build_manifest,
    cache_dir,
    dataset_manifest_sha256,
    identity_digest,
    read_cache_manifest,
    read_receipt,
    sidecar_header,
    sidecar_name,
    write_manifest,
    write_sidecar,
)
from data_prep.manifest import read_manifest
from pipeline.config import ConfigError
from pipeline.data import SampleError, ShardReader, decode_sample
from pipeline.distributed import device, resolve_env
from pipeline.latent_cache import PRECISION_DTYPES, model_identity
from pipeline.models import adapter_class, build_model
from pipeline.models.base import MLLMAdapter
from pipeline.preflight import failure_line
from pipeline.recipe import TrainConfig, load_train_config

PROG = "python -m data_prep encode"
EXIT_BAD_INPUT = 2


class Encoder:
    """One rank's share of the work: its shards of each dataset, batched through the VAE."""

    def __init__(self, adapter: MLLMAdapter, identity: dict[str, Any], batch_size: int) -> None:
        self.adapter, self.batch_size = adapter, batch_size
        self.digest = identity_digest(identity)
        self.tasks = set(identity["tasks"])
        self.dev = device()
        self.reader = ShardReader()

    def shard(self, dataset: Path, entry: dict[str, Any], out: Path, bar: tqdm) -> bool:
        """Encode one shard into its sidecar unless a finished one is there; True if encoded."""
        sidecar = out / sidecar_name(entry["name"])
        receipt = self._finished(sidecar, entry["sha256"])
        if receipt is not None:
            bar.update(receipt["samples"] + sum(receipt["skipped"].values()))
            return False
        shard = str(dataset / entry["name"])
        tensors: dict[str, torch.Tensor] = {}
        skipped: dict[str, str] = {}
        fields: list[str] = []
        batch: list[tuple[str, torch.Tensor]] = []
        for task in sorted(self.tasks):
            for j, indexed in enumerate(self.reader.index(shard).get(task, [])):
                key = indexed.key
                try:
                    _, members = self.reader.read(shard, task, j)
                    sample = decode_sample(key, members, task)
                    batch.append((key, self.adapter.processor.vae_input(sample)))
                except SampleError as e:
                    skipped[key] = e.reason
                except (ValueError, KeyError, OSError):
                    skipped[key] = "processor_error"
                if len(batch) == self.batch_size:
                    fields = self._encode(batch, tensors)
                    bar.update(len(batch))
                    batch = []
        if batch:
            fields = self._encode(batch, tensors)
            bar.update(len(batch))
        bar.update(len(skipped))
        write_sidecar(
            sidecar,
            tensors,
            identity=self.digest,
            shard=entry["name"],
            shard_sha256=entry["sha256"],
            fields=fields,
            skipped=skipped,
        )
        return True

    def _finished(self, sidecar: Path, shard_sha256: str) -> dict[str, Any] | None:
        """The receipt of a sidecar an earlier run finished for this shard and identity (its
        header says so too), else None."""
        receipt = read_receipt(sidecar)
        if receipt is None or (receipt["identity"], receipt["shard_sha256"]) != (
            self.digest,
            shard_sha256,
        ):
            return None
        try:
            _, meta = sidecar_header(sidecar)
        except CommandError:
            return None
        if (meta["identity"], meta["shard_sha256"]) != (self.digest, shard_sha256):
            return None
        return receipt

    @torch.no_grad()
    def _encode(
        self, batch: list[tuple[str, torch.Tensor]], into: dict[str, torch.Tensor]
    ) -> list[str]:
        pixels = torch.stack([p for _, p in batch]).to(self.dev)
        posterior = self.adapter.vae_posterior(pixels)
        for field, values in posterior.items():
            values = values.cpu()
            for i, (key, _) in enumerate(batch):
                into[f"{key}/{field}"] = values[i].clone(memory_format=torch.contiguous_format)
        return sorted(posterior)


def stale(out: Path, digest: str, overwrite: bool) -> bool:
    """Whether ``out`` holds a finished cache of another identity, to be replaced; refuses it
    without ``overwrite``. Every rank asks, so every rank stops on a refusal."""
    try:
        manifest = read_cache_manifest(out)
    except CommandError:
        return False  # unfinished: continue it
    if manifest is None or manifest.get("identity_sha256") == digest:
        return False
    if not overwrite:
        raise CommandError(
            f"{out}: holds latents of another VAE or preprocessing; pass --overwrite to "
            "replace them"
        )
    return True


def prepare(out: Path, replace: bool) -> None:
    """Rank 0: empty ``out`` when ``replace``; drop its manifest, so an unfinished encode never
    looks finished."""
    if replace:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)


def datasets_to_encode(cfg: TrainConfig, explicit: list[Path] | None) -> list[Path]:
    """``--dataset`` directories, else the recipe's datasets of the tasks the family's VAE
    encodes; each must be a data_prep output directory."""
    tasks = adapter_class(cfg.model.family).LATENT_TASKS
    recipe_data = cfg.data.datasets()
    datasets = explicit or list(dict.fromkeys(p for t in tasks for p in recipe_data.get(t, [])))
    if not datasets:
        raise CommandError("no dataset: pass --dataset DIR or a recipe with data.i2t / data.t2i")
    for path in datasets:
        read_manifest(path)  # one line naming the directory when it is not a data_prep output
    return datasets


def init_process_group(rank: int, world: int, addr: str, port: int) -> None:
    """A plain torch.distributed group (two collectives, no DeepSpeed)."""
    dist.init_process_group(
        "nccl" if torch.cuda.is_available() else "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=rank,
        world_size=world,
    )


def finish(dataset: Path, out: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Rank 0, after every rank: the manifest from every shard's receipt."""
    shards = read_manifest(dataset)["shards"]
    receipts = []
    for entry in shards:
        receipt = read_receipt(out / sidecar_name(entry["name"]))
        if receipt is None:
            raise CommandError(f"{out}: no finished sidecar for {entry['name']}")
        receipts.append(receipt)
    manifest = build_manifest(identity, receipts, dataset_manifest_sha256(dataset))
    write_manifest(out, manifest)
    return manifest


def run(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, args.overrides)
    datasets = datasets_to_encode(cfg, args.dataset)
    if args.check:
        print("\n".join(map(str, datasets)))
        return 0
    layout = resolve_env()
    rank, world = layout.rank, layout.world_size
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(layout.local_rank)
        init_process_group(rank, world, layout.master_addr, layout.master_port)
    torch.manual_seed(cfg.seed)  # as training builds the model: a random VAE comes out the same
    adapter = build_model(cfg.model).eval()
    identity = model_identity(adapter, cfg.precision)  # the weights as built, before the cast
    vae, dtype = adapter.get_submodule(adapter.FROZEN_MODULE), PRECISION_DTYPES[cfg.precision]
    vae.to(device())
    if next(vae.parameters()).dtype != dtype:
        vae.to(dtype)
    if torch.cuda.is_available():  # the same bytes from every run on the same GPU model
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    encoder = Encoder(adapter, identity, args.batch_size)
    began = time.monotonic()
    for dataset in datasets:
        shards = read_manifest(dataset)["shards"]
        out = cache_dir(dataset, adapter.family)
        replace = stale(out, encoder.digest, args.overwrite)
        if rank == 0:
            prepare(out, replace)
        if world > 1:
            dist.barrier()
        mine = shards[rank::world]
        total = sum(s["tasks"].get(t, 0) for s in mine for t in encoder.tasks)
        with tqdm(
            total=total,
            desc=f"encode {dataset.name}" + (f" (rank 0 of {world})" if world > 1 else ""),
            unit="image",
            disable=None if rank == 0 else True,
        ) as bar:
            here = sum(encoder.shard(dataset, entry, out, bar) for entry in mine)
        written = [here]
        if world > 1:  # also waits for every rank's sidecars
            written = [0] * world
            dist.all_gather_object(written, here)
        if rank == 0:
            manifest = finish(dataset, out, identity)
            totals = manifest["totals"]
            reasons = ", ".join(f"{k}: {v}" for k, v in manifest["skipped"].items())
            listed = sum(s["tasks"].get(t, 0) for s in shards for t in encoder.tasks)
            unread = listed - totals["samples"] - totals["skipped"]
            print(
                f"encode: {out}: {totals['samples']} samples encoded, {totals['skipped']} skipped"
                + (f" ({reasons})" if reasons else "")
                + (
                    f", {unread} unreadable (damaged shards: run data_prep verify)"
                    if unread
                    else ""
                )
                + f"; {len(shards)} sidecars ({len(shards) - sum(written)} kept from an "
                f"earlier run), {totals['bytes'] / 2**20:.1f} MiB, "
                f"{time.monotonic() - began:.0f} s",
                flush=True,
            )
    if world > 1:
        dist.barrier()
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="the training recipe (configs/*.yaml)")
    parser.add_argument(
        "--dataset",
        action="append",
        type=Path,
        metavar="DIR",
        help="a data_prep output directory (repeatable; default: the recipe's data.i2t/data.t2i "
        "of the tasks the family's VAE encodes)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, metavar="N", help="images per VAE pass (16)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a finished cache of another VAE or preprocessing",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="check the recipe and the datasets and print the datasets, one a line; build no "
        "model, encode nothing (the SLURM script's preflight)",
    )
    parser.add_argument("overrides", nargs="*", help="dotted key=value recipe overrides")
    args = parser.parse_intermixed_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, CommandError) as e:
        if args.check:
            print(failure_line(str(e)), file=sys.stderr, flush=True)
        elif resolve_env().rank == 0:
            print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
