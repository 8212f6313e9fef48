"""Latent caches: a frozen VAE's posterior of every image of a dataset, computed once by
``python -m data_prep encode`` and read by the loader instead of encoding at every step.

Format 1, beside the shards of a dataset directory::

    DATASET/latents/<family>/
        shard-000000.safetensors   one sidecar per shard: a tensor "<key>/<field>" per sample
        shard-000000.json          its receipt (the manifest entry), written after the sidecar
        manifest.json              written last: the identity, every sidecar, the totals

* **Fields** are what the family needs to draw its latent exactly as training does: ``mean`` and
  ``std`` of a Gaussian posterior that training samples from, ``mean`` alone when it takes the
  mode, ``latent`` for a deterministic autoencoder. One sample's tensors have no batch dimension
  and keep the dtype the VAE computed them in.
* A sidecar's safetensors metadata has one entry, ``infotok_latents``: a JSON object (sorted keys;
  safetensors writes several metadata entries in no fixed order) with ``format``, ``identity``
  (the digest below), ``shard`` and ``shard_sha256`` (the tar it covers), ``fields`` and
  ``skipped``: the key of every sample of a covered task that could not be encoded, with its
  reason (the loader skips those samples with the same reason, as it would on the fly).
* The **identity** names everything the latents depend on: the family, the VAE class, the sha256
  of its weights, the dtype it ran in, the images' preprocessing (resolution, crop and pad rules,
  the seed of keyed crops) and the tasks whose images are encoded. Its digest is the sha256 of
  its canonical JSON. Training uses a cache only when the identity is the model's own.

Sidecars and receipts are written under a temporary name and renamed, so an interrupted encode
leaves whole files or none, and a rerun continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from data_prep.errors import CommandError
from data_prep.manifest import write_atomic
from data_prep.shard_index import read_index

if TYPE_CHECKING:
    from torch import Tensor

LATENTS_DIR: Final = "latents"
CACHE_FORMAT: Final = 1
SIDECAR_SUFFIX: Final = ".safetensors"
RECEIPT_SUFFIX: Final = ".json"
PARTIAL_SUFFIX: Final = ".partial"
CACHE_MANIFEST: Final = "manifest.json"
META_KEY: Final = "infotok_latents"


class SkippedSample(Exception):
    """The sample was not encoded; ``reason`` is the skip reason the encoder recorded."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def cache_dir(dataset: Path, family: str) -> Path:
    """Where the latent cache of ``family`` lives in the dataset directory ``dataset``."""
    return dataset / LATENTS_DIR / family


def sidecar_name(shard: str) -> str:
    """``shard-000000.tar`` → ``shard-000000.safetensors``."""
    return Path(shard).stem + SIDECAR_SUFFIX


def receipt_path(sidecar: Path) -> Path:
    return sidecar.with_suffix(RECEIPT_SUFFIX)


def identity_digest(identity: Mapping[str, Any]) -> str:
    """sha256 of the identity's canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def identity_difference(cached: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """The first fields where two identities differ, as ``field: cache X, model Y``."""

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if isinstance(v, Mapping):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(cached), flat(model)
    diffs = [
        f"{k}: cache {str(a.get(k))[:16]}, model {str(b.get(k))[:16]}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else "")


def write_sidecar(
    path: Path,
    tensors: Mapping[str, Tensor],
    *,
    identity: str,
    shard: str,
    shard_sha256: str,
    fields: list[str],
    skipped: Mapping[str, str],
) -> dict[str, Any]:
    """Write one shard's sidecar and then its receipt, each atomically; returns the receipt.

    ``tensors`` maps ``<key>/<field>`` to a sample's tensors; the bytes depend only on them and
    on the metadata (safetensors orders tensors itself), so any encoder writes the same file.
    """
    from safetensors.torch import save

    metadata = {
        "format": CACHE_FORMAT,
        "identity": identity,
        "shard": shard,
        "shard_sha256": shard_sha256,
        "fields": fields,
        "skipped": dict(skipped),
    }
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"))
    data = save(dict(tensors), metadata={META_KEY: text})
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    receipt = {
        "name": path.name,
        "shard": shard,
        "shard_sha256": shard_sha256,
        "identity": identity,
        "samples": len(tensors) // max(len(fields), 1),
        "skipped": dict(Counter(skipped.values())),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_atomic(receipt_path(path), json.dumps(receipt, indent=1).encode())
    return receipt


def read_receipt(sidecar: Path) -> dict[str, Any] | None:
    """The receipt of a finished sidecar, or None when there is none (or it is unreadable)."""
    try:
        receipt = json.loads(receipt_path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(receipt, dict) or not sidecar.is_file():
        return None
    if sidecar.stat().st_size != receipt.get("bytes"):
        return None
    return receipt


def build_manifest(
    identity: Mapping[str, Any], receipts: list[dict[str, Any]], dataset_manifest: str
) -> dict[str, Any]:
    """The cache manifest: identity, its digest, one entry per sidecar, the totals."""
    skipped: Counter[str] = Counter()
    for r in receipts:
        skipped.update(r["skipped"])
    samples = sum(r["samples"] for r in receipts)
    return {
        "format": CACHE_FORMAT,
        "identity": dict(identity),
        "identity_sha256": identity_digest(identity),
        "dataset_manifest_sha256": dataset_manifest,
        "sidecars": [
            {
                k: r[k]
                for k in ("name", "shard", "shard_sha256", "samples", "skipped", "bytes", "sha256")
            }
            for r in receipts
        ],
        "totals": {
            "samples": samples,
            "skipped": sum(skipped.values()),
            "bytes": sum(r["bytes"] for r in receipts),
        },
        "skipped": dict(sorted(skipped.items())),
    }


def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    write_atomic(directory / CACHE_MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_cache_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of the cache in ``directory``; None when there is no cache there.

    A directory without a manifest holds an unfinished encode and raises ``CommandError``.
    """
    path = directory / CACHE_MANIFEST
    if not directory.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CommandError(
            f"{directory}: a latent cache without {CACHE_MANIFEST} (an unfinished encode: rerun "
            "python -m data_prep encode, or remove the directory)"
        ) from None
    except (OSError, ValueError) as e:
        raise CommandError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise CommandError(f"{path}: latent cache format {found!r}, expected {CACHE_FORMAT}")
    return manifest


def dataset_manifest_sha256(dataset: Path) -> str:
    """sha256 of the dataset's manifest.json: a cache belongs to exactly these shards."""
    return hashlib.sha256((dataset / "manifest.json").read_bytes()).hexdigest()


class SidecarReader:
    """A sample's cached fields by key; keeps a few sidecars open (memory-mapped)."""

    def __init__(self, max_open: int = 16):
        self.max_open = max_open
        self._open: OrderedDict[Path, tuple[Any, list[str], dict[str, str]]] = OrderedDict()

    def read(self, sidecar: Path, key: str) -> dict[str, Tensor]:
        handle, fields, skipped = self._handle(sidecar)
        if key in skipped:
            raise SkippedSample(skipped[key], f"{key}: not encoded ({skipped[key]})")
        from safetensors import SafetensorError

        try:
            return {f: handle.get_tensor(f"{key}/{f}") for f in fields}
        except SafetensorError:  # no such tensor
            raise SkippedSample(
                "not_in_latent_cache", f"{sidecar}: no latents for sample {key}"
            ) from None

    def _handle(self, sidecar: Path) -> tuple[Any, list[str], dict[str, str]]:
        if sidecar in self._open:
            self._open.move_to_end(sidecar)
            return self._open[sidecar]
        from safetensors import safe_open

        if len(self._open) >= self.max_open:
            self._open.popitem(last=False)
        handle = safe_open(str(sidecar), framework="pt")
        meta = _metadata(sidecar, handle.metadata())
        entry = (handle, meta["fields"], meta["skipped"])
        self._open[sidecar] = entry
        return entry


def sidecar_header(path: Path) -> tuple[set[str], dict[str, str]]:
    """The tensor names and the ``infotok_latents`` metadata of a sidecar (reads its header)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys()), _metadata(path, f.metadata())
    except SafetensorError as e:
        raise CommandError(f"{path}: not a safetensors file ({e})") from None


def _metadata(path: Path, metadata: Mapping[str, str] | None) -> dict[str, Any]:
    try:
        meta = json.loads((metadata or {})[META_KEY])
        if meta["format"] != CACHE_FORMAT:
            raise ValueError(f"format {meta['format']!r}, expected {CACHE_FORMAT}")
        return meta
    except (KeyError, TypeError, ValueError) as e:
        raise CommandError(f"{path}: not a latent cache sidecar ({e})") from None


def verify_caches(dataset: Path, shards: list[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Check every latent cache of a dataset against its files and the dataset's shards.

    Returns (problems, one summary line per cache). Per sidecar: size and sha256 as its manifest
    says, the identity and the shard (by sha256) it was encoded for, and every sample of a covered
    task of that shard either encoded (all fields) or skipped with a reason, nothing else.
    """
    problems: list[str] = []
    summaries: list[str] = []
    root = dataset / LATENTS_DIR
    if not root.is_dir():
        return problems, summaries
    shard_sha = {s["name"]: s["sha256"] for s in shards}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        where = directory.relative_to(dataset)
        try:
            manifest = read_cache_manifest(directory)
        except CommandError as e:
            problems.append(str(e))
            continue
        assert manifest is not None
        before = len(problems)
        if manifest.get("dataset_manifest_sha256") != dataset_manifest_sha256(dataset):
            problems.append(f"{where}: encoded for other shards (the dataset manifest changed)")
        tasks = set(manifest["identity"].get("tasks", ()))
        listed = {e["name"] for e in manifest["sidecars"]}
        for path in sorted(directory.iterdir()):
            if path.name.endswith(PARTIAL_SUFFIX) or path.name.endswith(".tmp"):
                problems.append(f"{where}/{path.name}: leftover of an interrupted encode")
            elif path.suffix == SIDECAR_SUFFIX and path.name not in listed:
                problems.append(f"{where}/{path.name}: in the directory but not in its manifest")
        for entry in manifest["sidecars"]:
            path = directory / entry["name"]
            name = f"{where}/{entry['name']}"
            if not path.is_file():
                problems.append(f"{name}: listed in its manifest but missing")
                continue
            data = path.read_bytes()
            if len(data) != entry["bytes"]:
                problems.append(f"{name}: {len(data)} bytes, its manifest says {entry['bytes']}")
                continue
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(f"{name}: sha256 differs from its manifest (damaged)")
                continue
            del data
            if shard_sha.get(entry["shard"]) != entry["shard_sha256"]:
                problems.append(f"{name}: encoded from another {entry['shard']} than the dataset's")
                continue
            problems += _check_sidecar(path, name, dataset / entry["shard"], tasks, manifest)
        if len(problems) == before:
            totals = manifest["totals"]
            summaries.append(
                f"verify: OK: {where}: {len(manifest['sidecars'])} sidecars, {totals['samples']} "
                f"samples encoded, {totals['skipped']} skipped, sha256 and keys match the shards"
            )
    return problems, summaries


def _check_sidecar(
    path: Path, name: str, shard: Path, tasks: set[str], manifest: Mapping[str, Any]
) -> list[str]:
    names, meta = sidecar_header(path)
    if meta.get("identity") != manifest["identity_sha256"]:
        return [f"{name}: encoded with another VAE identity than its manifest's"]
    fields, skipped = meta["fields"], meta["skipped"]
    encoded = {n.rpartition("/")[0] for n in names}
    expected_names = {f"{k}/{f}" for k in encoded for f in fields}
    samples, _ = read_index(shard)
    covered = {s.key for s in samples if s.task in tasks}
    problems = []
    if names != expected_names:
        problems.append(f"{name}: some samples lack one of the fields {', '.join(fields)}")
    missing = covered - encoded - set(skipped)
    extra = (encoded | set(skipped)) - covered
    if missing:
        problems.append(
            f"{name}: {len(missing)} sample(s) of {shard.name} neither encoded nor "
            f"skipped, e.g. {min(missing)}"
        )
    if extra:
        problems.append(f"{name}: {len(extra)} key(s) not in {shard.name}, e.g. {min(extra)}")
    return problems
