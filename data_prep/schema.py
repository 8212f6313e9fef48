"""The shard format of DESIGN §3: written (and owned) by ``data_prep``, read by ``pipeline.data``.

Standard library only; ``data_prep.shard_index`` (the random-access index) completes the format.

A dataset directory holds ``shard-000000.tar, ...``, ``manifest.json`` and ``ledger.jsonl``.
Each tar member is ``<key>.<ext>``; a sample is one image member (an ``IMAGE_EXTENSIONS``
entry) plus one ``json`` member holding an :class:`I2TSample` or a :class:`T2ISample`.
"""

from __future__ import annotations

from typing import Any, Final, Literal, NotRequired, TypedDict

FORMAT_NAME: Final = "infotok-webdataset"
FORMAT_VERSION: Final = 1

TASK_I2T: Final = "i2t"
TASK_T2I: Final = "t2i"
TASKS: Final = (TASK_I2T, TASK_T2I)
Task = Literal["i2t", "t2i"]

IMAGE_EXTENSIONS: Final = ("jpg", "png", "webp")
JSON_EXTENSION: Final = "json"
IMAGE_TOKEN: Final = "<image>"
"""Placeholder for the image; the first user turn of every I2T sample starts with it and a newline."""

ROLE_SYSTEM: Final = "system"
ROLE_USER: Final = "user"
ROLE_ASSISTANT: Final = "assistant"

MANIFEST_FILE: Final = "manifest.json"
LEDGER_FILE: Final = "ledger.jsonl"
SHARD_GLOB: Final = "shard-*.tar"


def shard_name(index: int) -> str:
    """File name of shard ``index`` (``shard-000000.tar``)."""
    return f"shard-{index:06d}.tar"


class Message(TypedDict):
    role: str  # ROLE_SYSTEM, ROLE_USER or ROLE_ASSISTANT
    content: str


class I2TSample(TypedDict):
    task: Literal["i2t"]
    messages: list[Message]  # [system], user, assistant, user, assistant, ...
    source: str  # the source label given to (or derived by) data_prep
    width: int  # of the stored image, in pixels
    height: int
    meta: NotRequired[dict[str, Any]]  # extra ground truth carried from the source record


class T2ISample(TypedDict):
    task: Literal["t2i"]
    prompt: str
    source: str
    width: int
    height: int
    meta: NotRequired[dict[str, Any]]


class ManifestShard(TypedDict):
    name: str  # file name inside the dataset directory
    samples: int
    tasks: dict[str, int]  # samples per task, every task in TASKS present
    bytes: int
    sha256: str


class ManifestSource(TypedDict):
    kind: str  # jsonl, llava, folder, hf or wds
    path: str
    records: int  # input records in the ledger (all, or those --take kept, and defective ones)
    samples: int  # of which written
    skipped: int  # of which skipped
    take: NotRequired[str]  # --take NAME=... of this source: a count or a fraction
    taken: NotRequired[int]  # records --take chose (in the ledger: written or skipped)
    not_taken: NotRequired[int]  # records --take left out: counted here, not in the ledger


class ManifestTotals(TypedDict):
    records: int
    samples: int
    skipped: int
    shards: int
    bytes: int
    tasks: dict[str, int]


class Manifest(TypedDict):
    format: str  # FORMAT_NAME
    format_version: int  # FORMAT_VERSION
    data_prep_version: str
    arguments: dict[str, Any]  # the shard command's arguments that determine the output
    shards: list[ManifestShard]
    totals: ManifestTotals
    skipped: dict[str, int]  # skip reason -> count
    sources: dict[str, ManifestSource]  # source label -> counts


class LedgerEntry(TypedDict):
    """One line of ``ledger.jsonl``: the fate of one input record."""

    source: str  # source label
    at: str  # where in the source: "line 12", "index 3 (id 0042)", "a/b.jpg", "train/row 7"
    status: Literal["written", "skipped"]
    key: NotRequired[str]  # sample key, when the record got far enough to have one
    shard: NotRequired[str]  # written: the shard file name
    reason: NotRequired[str]  # skipped: a data_prep skip reason
    detail: NotRequired[str]  # skipped: what exactly was wrong
