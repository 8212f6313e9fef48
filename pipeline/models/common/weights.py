"""Reading and writing model weights from local directories, with strict key checking.

Released checkpoints come as ``*.safetensors`` or ``pytorch_model*.bin`` files, sharded (with an
``*.index.json``) or not. :func:`read_state_dict` finds and reads them; :func:`load_strict` loads a
state dict into a module and fails with every missing, unexpected and mis-shaped key by name.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

# Searched in this order; the first name present wins.
_INDEX_FILES = (
    "model.safetensors.index.json",
    "pytorch_model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_SINGLE_FILES = ("model.safetensors", "pytorch_model.safetensors", "pytorch_model.bin")


class CheckpointMismatchError(ValueError):
    """A checkpoint does not match the model it is loaded into. The message lists every key."""


def find_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (all shards when sharded)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    for name in _INDEX_FILES:
        index = directory / name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [directory / f for f in sorted(set(weight_map.values()))]
            absent = [str(f) for f in files if not f.is_file()]
            if absent:
                raise FileNotFoundError(
                    f"{index} names shards that do not exist: {', '.join(absent)}"
                )
            return files
    for name in _SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(
        f"no weights in {directory}: expected one of {', '.join(_INDEX_FILES + _SINGLE_FILES)}"
    )


def read_weight_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) checkpoint directory, on CPU."""
    state: dict[str, torch.Tensor] = {}
    for path in find_weight_files(directory):
        state.update(read_weight_file(path))
    return state


def save_state_dict(
    state: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Write ``state`` as safetensors, sharded with a standard index when larger than one shard."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor.detach().contiguous().cpu()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(index, indent=2, sort_keys=True)
    )


def load_strict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    *,
    source: str,
    optional: Iterable[str] = (),
    ignore_prefixes: tuple[str, ...] = (),
) -> None:
    """Load ``state`` into ``module``; raise :class:`CheckpointMismatchError` naming every bad key.

    ``optional`` keys may be absent from the checkpoint (e.g. a tied ``lm_head.weight``);
    keys starting with ``ignore_prefixes`` belong to sub-modules loaded separately.
    """
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(ignore_prefixes)}
    optional = set(optional)
    missing = sorted(k for k in expected if k not in state and k not in optional)
    unexpected = sorted(k for k in state if k not in expected)
    mis_shaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    )
    if missing or unexpected or mis_shaped:
        parts = [f"checkpoint {source} does not match the model:"]
        sections = (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mis_shaped),
        )
        for title, keys in sections:
            if keys:
                parts.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise CheckpointMismatchError("\n".join(parts))
    loadable = {k: v for k, v in state.items() if k in expected}
    module.load_state_dict(loadable, strict=False)
