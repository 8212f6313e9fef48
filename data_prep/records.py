"""Input records: the normalised form every source produces, skip reasons, keys and text rules."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, NamedTuple

from data_prep.schema import (
    IMAGE_TOKEN,
    ROLE_ASSISTANT,
    ROLE_SYSTEM,
    ROLE_USER,
    TASK_I2T,
    TASK_T2I,
    LedgerEntry,
    Message,
)

REASONS: dict[str, str] = {
    "bad_json": "the line or element is not a JSON object",
    "bad_encoding": "text is not valid UTF-8",
    "missing_field": "a required field is absent",
    "invalid_field": "a field has the wrong type or shape",
    "empty_text": "a text field is empty or whitespace",
    "bad_conversation": "turns are not user/assistant alternating, ending with the assistant",
    "multiple_images": "the record refers to more than one image",
    "missing_text": "an image in a folder source has no .txt or .json sidecar",
    "duplicate": "same task, image and text as an earlier record",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image file cannot be read",
    "empty_image": "the image file has zero bytes",
    "not_an_image": "the file is not an image Pillow recognises",
    "truncated_image": "the image data ends early",
    "corrupt_image": "the image data does not decode",
    "decompression_bomb": "the image has more pixels than the limit",
    "too_small": "the image's shorter side is below --min-side",
    "no_image_member": "a WebDataset key has no jpg/jpeg/png/webp member",
    "no_text_member": "a WebDataset key has no .txt or .json member",
    "unreadable_member": "a tar member is not a regular file",
    "truncated_tar": "the tar ends before the member (or the tar cannot be read past a point)",
}
"""Every reason a record can be skipped for, with what it means (shown by ``stats``)."""

CAPTION_PROMPTS = (
    "Describe this image.",
    "Write a short caption for this image.",
    "What does this image show?",
    "Give a brief description of the picture.",
    "Summarize the visual content of the image.",
)
"""User turns for I2T samples made from plain captions; one is picked per record from its key."""

_ROLES = {
    "user": ROLE_USER,
    "human": ROLE_USER,
    "assistant": ROLE_ASSISTANT,
    "gpt": ROLE_ASSISTANT,
    "system": ROLE_SYSTEM,
}


class Skip(Exception):
    """Raised while reading or checking a record that cannot become a sample."""

    def __init__(self, reason: str, detail: str):
        if reason not in REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # crosses process pools intact
        return Skip, (self.reason, self.detail)


class HfRow(NamedTuple):
    """An image stored inside a ``datasets`` table: source label, split ('' if none) and row."""

    source: str
    split: str
    row: int


class TarMember(NamedTuple):
    """An image inside a tar of a wds source: the tar's path and the member's data location."""

    tar: str
    offset: int
    size: int


ImageRef = str | HfRow | TarMember
"""Where a record's image is: an absolute file path, a row of an hf source or a tar member."""


@dataclass(frozen=True, slots=True)
class Record:
    """One input record that passed the text checks; its image is checked by a shard worker."""

    key: str  # sample key: "<source label>-<20 hex digits>"
    source: str  # source label
    at: str  # location inside the source, for the ledger
    task: str
    text: str  # compact JSON: {"messages": [...]} (i2t) or {"prompt": "..."} (t2i)
    image: ImageRef
    meta: str | None  # compact JSON of the record's "meta" object, carried into the sample
    identity: str  # what two duplicate records share: task, resolved image and text


def compact_json(obj: Any) -> str:
    """The one JSON serialisation used for every file data_prep writes (stable bytes)."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def label(text: str) -> str:
    """A source label usable inside sample keys: letters, digits, '_' and '-' only."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:32] or "source"


def image_field(fields: Mapping[str, Any]) -> str:
    """The record's single image path; raises Skip when absent, empty or not exactly one."""
    value = fields.get("image")
    if isinstance(value, list):
        if len(value) > 1:
            raise Skip("multiple_images", f"'image' lists {len(value)} images")
        value = value[0] if value else None
    if value is None:
        raise Skip("missing_field", "no 'image' field")
    if not isinstance(value, str):
        raise Skip("invalid_field", f"'image' must be a path string, got {type(value).__name__}")
    if not value.strip():
        raise Skip("missing_field", "'image' is empty")
    return value


def meta_field(fields: Mapping[str, Any]) -> str | None:
    """The record's optional ``meta`` object (e.g. synthetic ground truth), as compact JSON."""
    meta = fields.get("meta")
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise Skip("invalid_field", f"'meta' must be an object, got {type(meta).__name__}")
    try:
        return compact_json(meta)
    except (TypeError, ValueError) as e:
        raise Skip("invalid_field", f"'meta' is not JSON-serialisable ({e})") from None


def parse_text(fields: Mapping[str, Any], default_task: str) -> tuple[str, str | list[Message]]:
    """``(task, text)`` from a record's fields; ``text`` is a conversation or a caption/prompt.

    Fields are tried in this order: ``messages``, ``conversations`` (I2T), ``question`` +
    ``answer`` (I2T), ``prompt`` (T2I), ``caption`` or ``text`` (the task is ``default_task``).
    Conversations come back without the image token; :func:`make_record` puts it first.
    """
    for name in ("messages", "conversations"):
        if name in fields:
            return TASK_I2T, _conversation(fields[name], name)
    if "question" in fields or "answer" in fields:
        question, answer = _string(fields, "question"), _string(fields, "answer")
        return TASK_I2T, [
            {"role": ROLE_USER, "content": question.replace(IMAGE_TOKEN, "").strip()},
            {"role": ROLE_ASSISTANT, "content": answer},
        ]
    if "prompt" in fields:
        return TASK_T2I, _string(fields, "prompt")
    for name in ("caption", "text"):
        if name in fields:
            return default_task, _string(fields, name)
    raise Skip(
        "missing_field",
        "no text field (expected messages, conversations, question+answer, prompt or caption)",
    )


def make_record(
    *,
    source: str,
    at: str,
    task: str,
    text: str | list[Message],
    image: ImageRef,
    image_name: str,
    meta: str | None,
) -> Record:
    """Build a record; its key hashes (task, image as named in the source, text).

    ``image_name`` is how the source names the image (a relative path, or a row), so keys do not
    change when a dataset moves; duplicates are found by (task, ``image``, text), where ``image``
    is an absolute path or a row.
    """
    digest = hashlib.sha1(compact_json([task, image_name, text]).encode()).hexdigest()[:20]
    if task == TASK_T2I:
        body: dict[str, Any] = {"prompt": text}
    elif isinstance(text, str):
        prompt = CAPTION_PROMPTS[int(digest, 16) % len(CAPTION_PROMPTS)]
        body = {
            "messages": [
                {"role": ROLE_USER, "content": f"{IMAGE_TOKEN}\n{prompt}"},
                {"role": ROLE_ASSISTANT, "content": text},
            ]
        }
    else:
        body = {"messages": _with_image_token(text)}
    identity = hashlib.sha1(compact_json([task, image, text]).encode())
    return Record(
        key=f"{source}-{digest}",
        source=source,
        at=at,
        task=task,
        text=compact_json(body),
        image=image,
        meta=meta,
        identity=identity.hexdigest(),
    )


def json_object(raw: bytes, where: str) -> dict[str, Any]:
    """A UTF-8 JSON object; Skip (bad_encoding / bad_json) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Skip("bad_encoding", f"{where} is not UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise Skip("bad_json", f"{where}: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise Skip("bad_json", f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def written(record: Record, shard: str) -> LedgerEntry:
    return {
        "source": record.source,
        "at": record.at,
        "status": "written",
        "key": record.key,
        "shard": shard,
    }


def skipped(source: str, at: str, skip: Skip, key: str | None = None) -> LedgerEntry:
    entry: LedgerEntry = {
        "source": source,
        "at": at,
        "status": "skipped",
        "reason": skip.reason,
        "detail": skip.detail,
    }
    if key is not None:
        entry["key"] = key
    return entry


def _string(fields: Mapping[str, Any], name: str) -> str:
    if name not in fields or fields[name] is None:
        raise Skip("missing_field", f"no '{name}' field")
    value = fields[name]
    if not isinstance(value, str):
        raise Skip("invalid_field", f"'{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise Skip("empty_text", f"'{name}' is empty")
    return value.strip()


def _conversation(value: Any, name: str) -> list[Message]:
    """Normalise OpenAI-style ``messages`` or LLaVA-style ``conversations`` to Message turns."""
    if not isinstance(value, list) or not value:
        raise Skip("invalid_field", f"'{name}' must be a non-empty list of turns")
    turns: list[Message] = []
    image_tokens = 0
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise Skip("invalid_field", f"{name}[{i}] is not an object")
        raw_role = turn.get("role", turn.get("from"))
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise Skip(
                "bad_conversation",
                f"{name}[{i}] has role {raw_role!r} (expected user/human, assistant/gpt or system)",
            )
        content = turn.get("content", turn.get("value"))
        if isinstance(
            content, list
        ):  # chat-template parts: [{"type": "image"}, {"type": "text", "text": ...}]
            image_tokens += sum(
                1 for part in content if isinstance(part, dict) and part.get("type") == "image"
            )
            texts = [
                part.get("text")
                for part in content
                if isinstance(part, dict) and part.get("type") == "text"
            ]
            content = "\n".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise Skip(
                "invalid_field",
                f"{name}[{i}] content must be a string, got {type(content).__name__}",
            )
        image_tokens += content.count(IMAGE_TOKEN)
        turns.append({"role": role, "content": content.replace(IMAGE_TOKEN, "").strip()})
    if image_tokens > 1:
        raise Skip("multiple_images", f"'{name}' has {image_tokens} image placeholders")
    _check_turn_order(turns, name)
    first_user = 1 if turns[0]["role"] == ROLE_SYSTEM else 0
    for i, turn in enumerate(turns):
        if not turn["content"] and i != first_user:  # the first user turn may be the image alone
            raise Skip("empty_text", f"{name}[{i}] ({turn['role']}) is empty")
    return turns


def _check_turn_order(turns: list[Message], name: str) -> None:
    roles = [t["role"] for t in turns]
    body = roles[1:] if roles[0] == ROLE_SYSTEM else roles
    expected = [ROLE_USER, ROLE_ASSISTANT] * (len(body) // 2)
    if len(body) < 2 or len(body) % 2 or body != expected:
        raise Skip(
            "bad_conversation",
            f"'{name}' roles are {'/'.join(roles)}; expected user/assistant pairs",
        )


def _with_image_token(turns: list[Message]) -> list[Message]:
    out = [dict(t) for t in turns]
    first_user = next(t for t in out if t["role"] == ROLE_USER)
    rest = first_user["content"]
    first_user["content"] = f"{IMAGE_TOKEN}\n{rest}" if rest else IMAGE_TOKEN
    return out  # type: ignore[return-value]
