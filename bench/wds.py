"""``wds:`` sources: ``shard`` pass-through against a raw copy of the same tars, and the cost of
``--take`` selection against listing the tars alone.

    python bench/wds.py [--images 3000] [--keys 100000] [--workers N] [--repeat 3] [--smoke]

Pass-through: writes IMAGES 512x512 JPEGs (gradients + noise, ~30 KB each) with a caption each
into WebDataset tars of 500 samples (``<key>.jpg`` + ``<key>.txt``, the BLIP3o layout, written
by ``webdataset.TarWriter``), warms the page cache, then times (best of --repeat runs each)
``shard --source NAME=wds:DIR --check structure --max-side 0 --workers W`` (every image kept
byte for byte, structure-checked only) against two raw copies of the same tars, each copy
fsynced (shard fsyncs its shards too): ``shutil.copyfile`` (in the kernel: the I/O limit), and
member by member with ``tarfile`` in one process (the raw copy of ``bench/data_prep.py``: every
member read and written once, nothing parsed or checked). Target: >= 0.8x a raw copy's images/s
(the same images, so the same ratio in MB/s of source tars).

Selection: a source of KEYS keys in tars of 5000 (members of a few bytes: only their headers,
and the captions of the keys chosen, are ever read) against ``list_tar`` over its tars in W
processes, the listing every wds scan starts with, times (best of --repeat) the scan stage with
``--take NAME=0.01`` (``data_prep.wds.scan_wds``: list, choose 1% by seeded hash, read their
captions, make their records), with the same 1% as a count (``--take NAME=KEYS/100``: every tar
is listed twice, first to find the smallest draws of all), and for reference without ``--take``
(read every caption). The ratio is the scan's time over the listing's. On tars that are not in
the page cache listing costs more (a seek per member), so a fraction's ratio is then closer to 1.

``--smoke`` (seconds: 16 images, 2000 keys, 1 run each, so the figures mean nothing) is what the
test suite runs so that the bench cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.data_prep import measure  # noqa: E402
from bench.measure import parse_args  # noqa: E402
from data_prep import shard  # noqa: E402
from data_prep.records import Record  # noqa: E402
from data_prep.sampling import Take  # noqa: E402
from data_prep.wds import list_tar, scan_wds, tar_files  # noqa: E402

SIDE, QUALITY = 512, 85
IMAGES_PER_TAR, KEYS_PER_TAR = 500, 5000
FRACTION = 0.01

Sample = tuple[str, bytes, str]  # key, jpg bytes, caption


def write_tars(root: Path, samples: Iterable[Sample], per_tar: int) -> list[Path]:
    """``samples`` into ``root/NNNNN.tar``, ``per_tar`` each, as ``<key>.jpg`` + ``<key>.txt``."""
    root.mkdir()
    tars: list[Path] = []
    writer: wds.TarWriter | None = None
    for i, (key, jpg, caption) in enumerate(samples):
        if i % per_tar == 0:
            if writer is not None:
                writer.close()
            tars.append(root / f"{len(tars):05d}.tar")
            writer = wds.TarWriter(str(tars[-1]), encoder=False)
        assert writer is not None
        writer.write({"__key__": key, "jpg": jpg, "txt": caption.encode()})
    if writer is not None:
        writer.close()
    return tars


def photos(count: int) -> Iterator[Sample]:
    """Distinct 512x512 JPEGs of ~30 KB: colour gradients plus uniform noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    for i in range(count):
        a, b, c = rng.uniform(0, 255, 3)
        base = np.stack([x / SIDE * a, y / SIDE * b, (x + y) / (2 * SIDE) * c + 40], axis=-1)
        noise = rng.integers(-8, 9, base.shape, dtype=np.int16)
        pixels = np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=QUALITY)
        yield f"sa_{i:08d}", buf.getvalue(), f"a photo of a colour gradient, number {i}"


def placeholders(count: int) -> Iterator[Sample]:
    """Keys with a one-byte image: enough to list and choose from, never sharded."""
    for i in range(count):
        yield f"sa_{i:08d}", b"\xff", f"caption {i}"


def copy_files(tars: list[Path], out: Path) -> None:
    """The same tars copied in the kernel and made durable: the I/O limit."""
    out.mkdir()
    for tar in tars:
        shutil.copyfile(tar, out / tar.name)
        with open(out / tar.name, "rb+") as f:
            os.fsync(f.fileno())


def copy_members(tars: list[Path], out: Path) -> None:
    """The same tars rewritten member by member and made durable, nothing parsed or checked."""
    out.mkdir()
    for tar in tars:
        with open(out / tar.name, "wb") as f:
            with tarfile.open(tar) as src, tarfile.open(fileobj=f, mode="w|") as dst:
                for info in src:
                    dst.addfile(info, src.extractfile(info))
            f.flush()
            os.fsync(f.fileno())


def run_shard(source: Path, out: Path, workers: int, count: int) -> None:
    with contextlib.redirect_stdout(io.StringIO()):  # its summary, once per run
        manifest = shard(
            [f"blip3o=wds:{source}"],
            out,
            task="t2i",
            max_side=0,
            check="structure",
            workers=workers,
            shard_size=max(1, count // (2 * workers)),  # two shards per worker
        )
    assert manifest["totals"]["samples"] == count, manifest["totals"]


def best_seconds(repeat: int, fn: Callable[[], object]) -> float:
    """Wall seconds of the fastest of ``repeat`` calls (other load only slows a run down)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def count_keys(path: str, name: str) -> int:
    """One tar listed; only its number of keys comes back (a scan keeps listings in its workers)."""
    return len(list_tar(path, name).samples)


def list_all(source: Path, workers: int) -> int:
    """What every wds scan starts with: each tar's headers, one tar per process (in this one
    when there is a single tar or worker, as the scan does); the number of keys."""
    jobs = [(str(t), t.name) for t in tar_files(source)]
    if min(workers, len(jobs)) < 2:
        return sum(itertools.starmap(count_keys, jobs))
    with multiprocessing.get_context().Pool(min(workers, len(jobs))) as pool:
        return sum(pool.starmap(count_keys, jobs))


def scan(source: Path, workers: int, take: Take | None, keys: int) -> None:
    """The scan stage of ``shard`` for one wds source, its records consumed."""
    items = list(
        scan_wds(
            source,
            "blip3o",
            default_task="t2i",
            text_column=None,
            take=take,
            seed=0,
            workers=workers,
        )
    )
    records = sum(isinstance(item, Record) for item in items)
    assert records + items[-1].not_taken == keys, (records, items[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--images",
        type=int,
        default=3000,
        help="JPEGs for the pass-through runs (default: %(default)s)",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=100_000,
        help="keys of the source the 1%% is selected from (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="data_prep --workers (default: CPUs available, %(default)s)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs per method, the best counts (default: %(default)s)",
    )
    args = parse_args(parser, {"images": 16, "keys": 2000, "repeat": 1})
    n, k, w, r = args.images, args.keys, args.workers, args.repeat
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench_wds_") as tmp:
        root = Path(tmp)
        print(f"writing {n} photos {SIDE}x{SIDE} and {k} placeholder keys ...", flush=True)
        tars = write_tars(root / "photos", photos(n), IMAGES_PER_TAR)
        write_tars(root / "keys", placeholders(k), KEYS_PER_TAR)
        mb = sum(t.stat().st_size for t in tars) / 1e6
        for path in [*tars, *tar_files(root / "keys")]:  # every method reads the page cache
            path.read_bytes()
        rate = {
            "files": measure(n, r, root, lambda out: copy_files(tars, out)),
            "members": measure(n, r, root, lambda out: copy_members(tars, out)),
            "shard": measure(n, r, root, lambda out: run_shard(root / "photos", out, w, n)),
        }
        seconds = {
            "list": best_seconds(r, lambda: list_all(root / "keys", w)),
            "fraction": best_seconds(r, lambda: scan(root / "keys", w, Take(fraction=FRACTION), k)),
            "count": best_seconds(
                r, lambda: scan(root / "keys", w, Take(count=round(k * FRACTION)), k)
            ),
            "all": best_seconds(r, lambda: scan(root / "keys", w, None, k)),
        }

    print(
        f"\n{n} photos in {len(tars)} tars, {mb:.1f} MB, {mb / n * 1000:.0f} KB a sample; {w} "
        f"workers; {os.cpu_count()} CPUs; best of {r} runs; load average {load_before:.1f} "
        f"before, {os.getloadavg()[0]:.1f} after"
    )
    print(
        f"{'pass-through':46}{'images/s':>9}{'MB/s':>8}{'CPU ms/img':>11}{'vs copy':>8}"
        f"{'vs members':>11}  target"
    )
    for name, key in [
        ("raw copy of the tars: copyfile + fsync", "files"),
        ("raw copy member by member: tarfile + fsync", "members"),
    ]:
        ips, cpu_ms = rate[key]
        print(f"{name:46}{ips:9.1f}{ips / n * mb:8.1f}{cpu_ms:11.2f}")
    ips, cpu_ms = rate["shard"]
    print(
        f"{f'shard wds: --check structure, {w} w.':46}{ips:9.1f}{ips / n * mb:8.1f}"
        f"{cpu_ms:11.2f}{ips / rate['files'][0]:8.2f}{ips / rate['members'][0]:11.2f}  >= 0.8"
    )
    print(f"\nselection from {k} keys in tars of {KEYS_PER_TAR}")
    print(f"{'':46}{'seconds':>9}{'keys/s':>10}{'ratio':>7}")
    for name, key in [
        (f"list the tar headers alone, {w} w.", "list"),
        (f"scan --take {FRACTION} (list, choose, read), {w} w.", "fraction"),
        (f"scan --take {round(k * FRACTION)} (list twice, read), {w} w.", "count"),
        (f"scan, no --take (read every caption), {w} w.", "all"),
    ]:
        ratio = f"{seconds[key] / seconds['list']:7.2f}" if key != "list" else ""
        print(f"{name:46}{seconds[key]:9.2f}{k / seconds[key]:10.0f}{ratio}")
    print(
        "ratios: pass-through, images/s over each raw copy's; selection, seconds over the listing's"
    )


if __name__ == "__main__":
    main()
