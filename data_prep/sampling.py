"""``--take NAME=N`` / ``--take NAME=FRACTION``: an exact, reproducible sub-sample of a source.

A record is chosen by a seeded hash of ``(seed, source name, record key)`` alone, so the choice
depends neither on the order records come in nor on the number of workers, and a different seed
gives a different sub-sample. A fraction keeps each record whose hash, read as a number in
[0, 1), is below it; a count keeps the N records with the smallest hashes (all of them when the
source has fewer). The key is the one the source knows before reading a record's text or image
(a WebDataset sample's ``<tar>/<key>``; for the other kinds the sample key data_prep derives), so
records not chosen are never read further.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from data_prep.errors import CommandError


@dataclass(frozen=True)
class Take:
    """How much of one source to keep: ``count`` records, or each with ``fraction`` chance."""

    count: int | None = None
    fraction: float | None = None

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else repr(self.fraction)


class TakeCount(NamedTuple):
    """What a ``--take`` did to one source: records chosen, and records left out."""

    taken: int
    not_taken: int


def parse_takes(specs: Iterable[str], labels: Iterable[str]) -> dict[str, Take]:
    """``NAME=N`` or ``NAME=FRACTION`` strings → {source label: Take}; CommandError if unusable."""
    known = list(labels)
    takes: dict[str, Take] = {}
    for text in specs:
        name, sep, value = text.partition("=")
        if not sep or not value:
            raise CommandError(f"--take {text!r}: expected NAME=COUNT or NAME=FRACTION")
        if name not in known:
            raise CommandError(
                f"--take {text!r}: no source named {name!r} (sources: {', '.join(known)})"
            )
        if name in takes:
            raise CommandError(f"--take {text!r}: source {name!r} already has a --take")
        takes[name] = _parse_take(text, value)
    return takes


def _parse_take(text: str, value: str) -> Take:
    try:
        if value.isdigit():
            count = int(value)
            if count < 1:
                raise ValueError
            return Take(count=count)
        fraction = float(value)
    except ValueError:
        raise CommandError(
            f"--take {text!r}: {value!r} is neither a count (an integer >= 1) nor a fraction"
        ) from None
    if not 0 < fraction < 1:
        raise CommandError(f"--take {text!r}: a fraction must lie strictly between 0 and 1")
    return Take(fraction=fraction)


def draw(seed: int, source: str, key: str) -> int:
    """The record's seeded hash, a 64-bit integer."""
    digest = hashlib.blake2b(f"{seed}:{source}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def chosen(keys: Iterable[str], take: Take, seed: int, source: str) -> set[str]:
    """The keys ``take`` keeps out of ``keys`` (each key once)."""
    if take.fraction is not None:
        bound = take.fraction * 2**64
        return {k for k in keys if draw(seed, source, k) < bound}
    assert take.count is not None
    return set(heapq.nsmallest(take.count, set(keys), key=lambda k: (draw(seed, source, k), k)))
