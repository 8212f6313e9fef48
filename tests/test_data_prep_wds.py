"""``wds:`` sources (published WebDataset tars, read in place) and ``--take`` sub-samples: every
valid sample written once, every bad member with its reason, the same bytes whatever the workers
and after ``kill -9`` + ``--resume``, exact and reproducible selections, unchosen images never
read."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from data_prep_helpers import (
    REPO,
    encode,
    files,
    ledger,
    manifest,
    photo,
    samples,
    shard,
    skips_by_at,
    write_jsonl,
)

from data_prep import sources, stats, verify


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def jpeg(seed: int) -> bytes:
    return encode(photo(80, 64, seed=seed))


def blip3o(root: Path, tars: int = 2, per_tar: int = 6) -> dict[str, str]:
    """BLIP3o layout (<key>.jpg + <key>.txt); returns {tar:key: caption} of the valid samples."""
    root.mkdir(parents=True)
    valid = {}
    for t in range(tars):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                caption = f"a long caption of picture {i} in tar {t}"
                add(tar, f"{key}.jpg", jpeg(t * 100 + i))
                add(tar, f"{key}.txt", caption.encode())
                valid[f"{t:05d}.tar:{key}"] = caption
    return valid


def text_to_image_2m(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """jpg + json(prompt), with bad members; returns ({id: prompt} valid, {id: reason} bad)."""
    root.mkdir(parents=True)
    valid, bad = {}, {}
    with tarfile.open(root / "data_000000.tar", "w") as tar:
        for i in range(5):
            add(tar, f"{i:06d}.jpg", jpeg(500 + i))
            prompt = f"a photo of {i} red cubes on a table"
            add(tar, f"{i:06d}.json", json.dumps({"prompt": prompt, "width": 80}).encode())
            valid[f"data_000000.tar:{i:06d}"] = prompt
        add(tar, "000100.jpg", b"\xff\xd8 not really a jpeg")  # undecodable image
        add(tar, "000100.json", json.dumps({"prompt": "broken image"}).encode())
        bad["data_000000.tar:000100"] = "not_an_image"
        add(tar, "000101.jpg", jpeg(601))  # no text at all
        bad["data_000000.tar:000101"] = "no_text_member"
        link = tarfile.TarInfo("000102.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "000000.jpg"
        tar.addfile(link)  # a member that is not a regular file
        add(tar, "000102.json", json.dumps({"prompt": "a link"}).encode())
        bad["data_000000.tar:000102"] = "unreadable_member"
        add(tar, "000103.jpg", jpeg(603))
        add(tar, "000103.json", b"{not json")
        bad["data_000000.tar:000103"] = "bad_json"
    return valid, bad


def img2dataset(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """jpg + txt + json (caption, url, status), failed downloads (json only), a truncated tar."""
    root.mkdir(parents=True)
    valid, bad = {}, {}
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(6):
            key = f"0000{i:04d}"
            if i in (2, 4):  # a failed download: img2dataset keeps only its metadata
                meta = {"url": f"http://x/{i}", "status": "failed_to_download", "caption": "c"}
                add(tar, f"{key}.json", json.dumps(meta).encode())
                bad[f"00000.tar:{key}"] = "no_image_member"
                continue
            caption = f"downloaded picture {i}"
            add(tar, f"{key}.jpg", jpeg(700 + i))
            add(tar, f"{key}.txt", caption.encode())
            meta = {"url": f"http://x/{i}", "status": "success", "caption": caption}
            add(tar, f"{key}.json", json.dumps(meta).encode())
            valid[f"00000.tar:{key}"] = caption
    (root / "00000.parquet").write_bytes(b"PAR1 not read")
    with tarfile.open(root / "00001.tar", "w") as tar:
        for i in range(4):
            key = f"0001{i:04d}"
            add(tar, f"{key}.jpg", jpeg(800 + i))
            add(tar, f"{key}.txt", f"second tar picture {i}".encode())
            if i < 2:
                valid[f"00001.tar:{key}"] = f"second tar picture {i}"
    data = (root / "00001.tar").read_bytes()
    cut = _offset_of(root / "00001.tar", "00010002.jpg") + 100  # inside the third image
    (root / "00001.tar").write_bytes(data[:cut])
    bad["00001.tar:00010002"] = "truncated_tar"
    bad["00001.tar"] = "truncated_tar"  # the tar itself: unreadable past that point
    return valid, bad


def _offset_of(path: Path, name: str) -> int:
    with tarfile.open(path) as tar:
        return tar.getmember(name).offset_data


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    blip = blip3o(root / "blip3o")
    t2i_valid, t2i_bad = text_to_image_2m(root / "t2i2m")
    dl_valid, dl_bad = img2dataset(root / "img2dataset")
    specs = [
        f"blip3o=wds:{root / 'blip3o'}",
        f"t2i2m=wds:{root / 't2i2m' / 'data_000000.tar'}",
        f"dl=wds:{root / 'img2dataset'}/*.tar",
    ]
    reference = root / "reference"
    shard(specs, reference, task="t2i", shard_size=8, workers=1)
    return {
        "root": root,
        "specs": specs,
        "reference": reference,
        "valid": {"blip3o": blip, "t2i2m": t2i_valid, "dl": dl_valid},
        "bad": {"t2i2m": t2i_bad, "dl": dl_bad},
    }


def written_ats(out: Path) -> dict[str, list[str]]:
    by_source: dict[str, list[str]] = {}
    for entry in ledger(out):
        if entry["status"] == "written":
            by_source.setdefault(entry["source"], []).append(entry["at"])
    return by_source


def test_every_valid_sample_is_written_once_with_its_text(published):
    out = published["reference"]
    written = written_ats(out)
    for name, valid in published["valid"].items():
        assert sorted(written[name]) == sorted(valid), name
    by_key = samples(out)
    at_of = {e["key"]: (e["source"], e["at"]) for e in ledger(out) if e["status"] == "written"}
    for key, sample in by_key.items():
        source, at = at_of[key]
        assert sample["json"]["task"] == "t2i" and sample["ext"] == "jpg"
        assert sample["json"]["prompt"] == published["valid"][source][at]
    assert len(by_key) == sum(map(len, published["valid"].values()))


def test_every_bad_member_has_its_reason_naming_tar_and_key(published):
    skips = skips_by_at(published["reference"])
    expected = {at: reason for bad in published["bad"].values() for at, reason in bad.items()}
    assert {at: e["reason"] for at, e in skips.items()} == expected
    for at, entry in skips.items():  # "at" is <tar>:<key>; found in the tar: named in detail
        if entry["reason"] not in ("not_an_image", "bad_json"):
            assert entry["detail"].startswith(at.split(":")[0]), entry
    m = manifest(published["reference"])
    assert m["totals"]["records"] == m["totals"]["samples"] + m["totals"]["skipped"]
    assert m["sources"]["dl"]["kind"] == "wds"


def test_workers_give_the_same_bytes_and_verify_passes(published, tmp_path):
    out = tmp_path / "two"
    shard(published["specs"], out, task="t2i", shard_size=8, workers=2)
    assert files(out) == files(published["reference"])
    assert verify(out, workers=1) == []


SLOW_READER = textwrap.dedent("""
    import sys, time
    from data_prep import sources
    from data_prep.cli import main

    read = sources.read_member
    def slow(ref):
        time.sleep(0.1)
        return read(ref)
    sources.read_member = slow
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_then_resume_equals_an_uninterrupted_run(published, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", SLOW_READER, "shard", "--min-side", "16", "--task", "t2i"]
    cmd += [a for s in published["specs"] for a in ("--source", s)]
    cmd += ["--shard-size", "8", "--workers", "2", "--output", str(out)]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (out / "shard-000000.tar").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ended before the kill"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    shard(published["specs"], out, task="t2i", shard_size=8, workers=1, resume=True)
    assert files(out) == files(published["reference"])


def big_sources(root: Path) -> tuple[str, str]:
    """A wds source of 3 tars x 20 keys and a jsonl source of 40 captions."""
    blip3o(root / "wds", tars=3, per_tar=20)
    (root / "img").mkdir(parents=True)
    records = []
    for i in range(40):
        photo(64, 64, seed=900 + i).save(root / "img" / f"{i}.jpg")
        records.append({"image": f"img/{i}.jpg", "caption": f"a jsonl caption {i}"})
    write_jsonl(root / "cap.jsonl", records)
    return f"web=wds:{root / 'wds'}", f"cap=jsonl:{root / 'cap.jsonl'}"


def taken(out: Path) -> dict[str, set[str]]:
    """The sample keys written per source (keys do not depend on where a record sits)."""
    by_source: dict[str, set[str]] = {}
    for entry in ledger(out):
        if entry["status"] == "written":
            by_source.setdefault(entry["source"], set()).add(entry["key"])
    return by_source


def test_take_gives_exact_counts_reproducibly_and_a_new_seed_a_new_choice(tmp_path):
    web, cap = big_sources(tmp_path / "src")
    takes = ["web=25", "cap=0.5"]
    one = tmp_path / "one"
    m = shard([web, cap], one, take=takes, workers=1, shard_size=16)
    chosen = taken(one)
    assert len(chosen["web"]) == 25
    web_source = m["sources"]["web"]
    assert (web_source["take"], web_source["taken"], web_source["not_taken"]) == ("25", 25, 35)
    assert m["sources"]["cap"]["take"] == "0.5"
    assert len(chosen["cap"]) + m["sources"]["cap"]["not_taken"] == 40
    assert 10 <= len(chosen["cap"]) <= 30
    assert m["arguments"]["take"] == {"web": "25", "cap": "0.5"}
    assert len(ledger(one)) == 25 + len(chosen["cap"])  # the left-out ones are only counted
    rows = {line.split()[0]: line.split() for line in stats(one).splitlines() if line[:3] == "  w"}
    assert rows["web"] == ["web", "25", "0", "0", "35", "25"]  # i2t t2i skipped not-taken --take
    # Other worker count, sources in the other order, jsonl lines shuffled: the same choice.
    lines = (tmp_path / "src" / "cap.jsonl").read_text().splitlines()
    random.Random(1).shuffle(lines)
    (tmp_path / "src" / "cap.jsonl").write_text("\n".join(lines) + "\n")
    two = tmp_path / "two"
    shard([cap, web], two, take=takes[::-1], workers=2, shard_size=16)
    assert taken(two) == chosen
    other_seed = tmp_path / "seed"
    shard([web, cap], other_seed, take=takes, workers=1, shard_size=16, seed=1)
    again = taken(other_seed)
    assert len(again["web"]) == 25 and again["web"] != chosen["web"]
    assert again["cap"] != chosen["cap"]


def test_unchosen_images_are_never_read_or_decoded(tmp_path, monkeypatch, capsys):
    web, cap = big_sources(tmp_path / "src")
    from data_prep import sharding

    reads, decodes = [], []
    read_member, read_file, prepare = sources.read_member, sources.read_file, sharding.prepare
    monkeypatch.setattr(sources, "read_member", lambda ref: reads.append(ref) or read_member(ref))
    monkeypatch.setattr(sources, "read_file", lambda path: reads.append(path) or read_file(path))
    monkeypatch.setattr(
        sharding, "prepare", lambda data, opts: decodes.append(1) or prepare(data, opts)
    )
    out = tmp_path / "out"
    m = shard([web, cap], out, take=["web=7", "cap=3"], workers=1, shard_size=16)
    assert len(reads) == len(decodes) == 10 == m["totals"]["samples"]
    printed = capsys.readouterr().out
    assert "--take web=7: took 7 of 60 records (53 left out" in printed
    assert "--take cap=3: took 3 of 40 records (37 left out" in printed


def test_take_errors_are_one_line(tmp_path):
    web, _ = big_sources(tmp_path / "src")
    from data_prep import CommandError

    for take, message in (
        ("nope=3", "no source named 'nope'"),
        ("web=0", "neither a count"),
        ("web=1.5", "strictly between 0 and 1"),
        ("web", "expected NAME=COUNT"),
    ):
        with pytest.raises(CommandError, match=message):
            shard([web], tmp_path / "x", take=[take])
