"""``hf`` sources: a ``datasets`` directory made by ``save_to_disk``, or parquet files.

``datasets`` is imported only when an hf source is used (it is slow to import). Tables are
memory-mapped Arrow files, so a :class:`Table` pickles by file reference into shard workers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.errors import CommandError
from data_prep.records import Skip

_BATCH = 1024


@dataclass
class Table:
    splits: dict[str, Any]  # split name ('' for a plain Dataset) -> datasets.Dataset
    column: str  # the image column
    kind: str  # "image" (datasets Image feature), "bytes" or "path"
    base: Path  # relative image paths are resolved against it

    def rows(self, text_column: str | None) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """``(split, row, fields)`` for every row in table order; ``image`` is a field for path columns."""
        for split, ds in self.splits.items():
            if text_column is not None and text_column not in ds.column_names:
                raise CommandError(
                    f"--text-column {text_column!r}: no such column in {split or 'the dataset'} "
                    f"(columns: {', '.join(ds.column_names)})"
                )
            drop = [] if self.kind == "path" else [self.column]
            row = 0
            for batch in ds.remove_columns(drop).iter(batch_size=_BATCH):
                names = list(batch)
                for values in zip(*(batch[n] for n in names), strict=True):
                    fields = dict(zip(names, values, strict=True))
                    image = fields.pop(self.column, None)
                    fields = _text_fields(fields, text_column)
                    if self.kind == "path":
                        fields["image"] = image
                    yield split, row, fields
                    row += 1

    def image(self, split: str, row: int) -> bytes | str:
        """The encoded image of one row, or the absolute path of its file."""
        value = self.splits[split][row][self.column]
        if isinstance(value, dict):  # datasets Image feature with decoding off
            value = value["bytes"] if value.get("bytes") is not None else value.get("path")
        if isinstance(value, str):
            return os.path.normpath(os.path.join(self.base, value))
        if value is None:
            raise Skip("missing_image", f"the {self.column!r} column is empty in this row")
        return value


def _text_fields(fields: dict[str, Any], text_column: str | None) -> dict[str, Any]:
    if text_column is None:
        return fields
    value = fields[text_column]
    out = {"messages" if isinstance(value, list) else "caption": value}
    if isinstance(fields.get("meta"), dict):
        out["meta"] = fields["meta"]
    return out


def open_table(path: Path, image_column: str, cache_dir: Path, base: Path) -> Table:
    """Open a save_to_disk directory (Dataset or DatasetDict) or parquet file(s) under ``path``."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        if path.is_dir() and any((path / f).exists() for f in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            splits = (
                dict(sorted(loaded.items()))
                if isinstance(loaded, datasets.DatasetDict)
                else {"": loaded}
            )
        else:
            files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
            if not files:
                raise CommandError(
                    f"hf:{path}: neither a save_to_disk directory nor parquet file(s)"
                )
            splits = {
                "": datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=str(cache_dir))
            }
    except CommandError:
        raise
    except Exception as e:  # datasets and pyarrow raise many types for unreadable data
        raise CommandError(
            f"hf:{path}: cannot open with datasets ({type(e).__name__}: {e})"
        ) from None
    kinds = {_column_kind(path, split, ds, image_column) for split, ds in splits.items()}
    if len(kinds) > 1:
        raise CommandError(
            f"hf:{path}: --image-column {image_column!r} has different types in different splits"
        )
    kind = kinds.pop()
    if kind == "image":
        splits = {
            s: ds.cast_column(image_column, datasets.Image(decode=False))
            for s, ds in splits.items()
        }
    return Table(splits, image_column, kind, base)


def _column_kind(path: Path, split: str, ds: Any, column: str) -> str:
    import datasets

    if column not in ds.column_names:
        raise CommandError(
            f"hf:{path}: --image-column {column!r} is not a column of {split or 'the dataset'} "
            f"(columns: {', '.join(ds.column_names)})"
        )
    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return "image"
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return "bytes"
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        return "path"
    raise CommandError(
        f"hf:{path}: --image-column {column!r} has type {feature}; "
        "expected an Image, binary or path-string column"
    )
