"""The shard command end to end: determinism, read-back, resume after kill -9, verify, stats, CLI errors."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from data_prep import CommandError, stats, synth, verify
from data_prep.cli import main
from data_prep_helpers import (
    REPO,
    caption_corpus,
    files,
    manifest,
    run_cli,
    samples,
    shard,
    shard_cli,
)

N_A, N_B, SHARD_SIZE = 14, 10, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two jsonl sources and a reference output written with one worker."""
    root = tmp_path_factory.mktemp("corpus")
    sources = [
        f"jsonl:{caption_corpus(root, N_A, 'alpha', seed=1)}",
        f"jsonl:{caption_corpus(root, N_B, 'beta', seed=2)}",
    ]
    out = root / "reference"
    shard(sources, out, shard_size=SHARD_SIZE, workers=1)
    return root, sources, out


def cli_args(sources: list[str]) -> list[str]:
    """The corpus' sources and shard size as ``shard`` command-line flags."""
    return [arg for s in sources for arg in ("--source", s)] + ["--shard-size", str(SHARD_SIZE)]


def test_byte_identical_whatever_the_worker_count(corpus, tmp_path):
    _, sources, reference = corpus
    for workers in (2, 3):
        out = tmp_path / f"w{workers}"
        shard(sources, out, shard_size=SHARD_SIZE, workers=workers)
        assert files(out) == files(reference)
    assert not (reference / ".data_prep").exists()


def test_seed_changes_order_and_shards_mix_sources(corpus, tmp_path):
    _, sources, reference = corpus
    shard(sources, tmp_path / "s1", shard_size=SHARD_SIZE, seed=1)
    assert set(samples(tmp_path / "s1")) == set(samples(reference))
    assert files(tmp_path / "s1")["shard-000000.tar"] != files(reference)["shard-000000.tar"]
    for name in ("shard-000000.tar", "shard-000001.tar"):
        sources = {s["json"]["source"] for s in samples(reference).values() if s["shard"] == name}
        assert sources == {"alpha", "beta"}


def test_read_back_by_webdataset_and_tar_matches_manifest(corpus):
    import webdataset as wds

    _, _, out = corpus
    m = manifest(out)
    assert m["totals"]["samples"] == N_A + N_B and len(m["shards"]) == 5
    for entry in m["shards"]:
        path = out / entry["name"]
        read = list(wds.WebDataset(str(path), shardshuffle=False))
        assert len(read) == entry["samples"] == entry["tasks"]["i2t"]
        assert all(set(s) >= {"__key__", "jpg", "json"} and "." not in s["__key__"] for s in read)
        listing = subprocess.run(
            ["tar", "tf", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()
        assert len(listing) == 2 * entry["samples"]
        assert path.stat().st_size == entry["bytes"]
        with tarfile.open(path) as tar:
            assert {(m.mtime, m.uid, m.gid, m.uname) for m in tar} == {(0, 0, 0, "data_prep")}
    assert m["data_prep_version"] and m["arguments"]["shard_size"] == SHARD_SIZE
    assert "workers" not in m["arguments"] and m["sources"]["alpha"]["samples"] == N_A


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from data_prep import shardfile
    from data_prep.cli import main

    add = shardfile.ShardFile.add
    def slow_add(self, key, members):
        time.sleep(0.05)
        add(self, key, members)
    shardfile.ShardFile.add = slow_add
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_kill_9_mid_shard(corpus, tmp_path, workers):
    _, sources, reference = corpus
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-c",
        SLOW_WRITER,
        "shard",
        "--min-side",
        "16",
        *cli_args(sources),
        "--output",
        str(out),
        "--workers",
        str(workers),
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (
            (out / "shard-000000.tar").exists()
            and any(p.stat().st_size for p in out.glob("*.tar.tmp"))
        ):
            assert proc.poll() is None and time.monotonic() < deadline, (
                "the run ended before it could be killed"
            )
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the job and its workers, as SLURM would
        proc.wait()
    assert not (out / "manifest.json").exists()
    shard(sources, out, shard_size=SHARD_SIZE, workers=2, resume=True)
    assert files(out) == files(reference)
    assert verify(out, workers=1) == []


def test_resume_of_finished_run_is_a_no_op_and_checks_arguments(corpus, capsys):
    _, sources, reference = corpus
    before = files(reference)
    shard(sources, reference, shard_size=SHARD_SIZE, resume=True)
    assert files(reference) == before
    assert shard_cli(*cli_args(sources), "--output", reference, "--resume", "--seed", "7") == 2
    err = capsys.readouterr().err
    assert "different arguments" in err and "seed" in err


def test_verify_passes_then_detects_tampering(corpus, tmp_path, capsys):
    _, sources, _ = corpus
    out = tmp_path / "out"
    shard(sources, out, shard_size=SHARD_SIZE)
    assert verify(out, workers=2) == []

    shard0 = out / "shard-000000.tar"
    data = bytearray(shard0.read_bytes())
    data[600] ^= 0xFF  # inside the first image
    shard0.write_bytes(bytes(data))
    with tarfile.open(out / "shard-000001.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar][:-2]  # drop the last sample
    with tarfile.open(out / "shard-000001.tar", "w") as tar:
        for member, content in members:
            tar.addfile(member, io.BytesIO(content))
    (out / "shard-000099.tar").write_bytes(b"")
    capsys.readouterr()
    assert main(["verify", str(out), "--workers", "1"]) == 1
    report = capsys.readouterr().out
    assert "shard-000000.tar: sha256" in report
    assert "shard-000001.tar: 4 samples, manifest.json says 5" in report
    assert "in the ledger, not in the shard" in report
    assert "shard-000099.tar: in the directory but not in manifest.json" in report


def test_stats(corpus):
    _, _, out = corpus
    text = stats(out)
    for expected in (
        "samples per task",
        "alpha",
        "beta",
        "image size (longer side, px)",
        "text length",
    ):
        assert expected in text


def test_command_errors_are_one_line(tmp_path, corpus, capsys):
    _, sources, reference = corpus
    args = cli_args(sources)
    (tmp_path / "file").write_text("")
    cases = [
        (["--source", "csv:x.csv"], "unknown source kind 'csv'"),
        (["--source", f"jsonl:{tmp_path / 'absent.jsonl'}"], "does not exist"),
        ([*args, "--output", tmp_path / "file" / "out"], "cannot create directory"),
        ([*args, "--output", reference], "pass --resume"),
    ]
    for extra, message in cases:
        argv = ["shard", *map(str, extra)]
        if "--output" not in argv:
            argv += ["--output", str(tmp_path / "o")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as info:
        main(["shard", *args, "--output", str(tmp_path / "o"), "--quality", "101"])
    assert info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_functions_return_their_result_and_check_their_arguments(corpus, tmp_path):
    _, sources, reference = corpus
    assert shard(sources, reference, shard_size=SHARD_SIZE, resume=True) == manifest(reference)
    cases = [
        (lambda: shard([], tmp_path / "o"), "sources: at least one [NAME=]KIND:PATH"),
        (
            lambda: shard(sources, tmp_path / "o", quality=101),
            "quality: 101 is above the maximum 100",
        ),
        (lambda: shard(sources, tmp_path / "o", task="vqa"), "task: 'vqa' is not one of i2t, t2i"),
        (lambda: synth(tmp_path / "s", 1, size=10), "size: 10 is below the minimum 64"),
        (lambda: verify(reference, workers=0), "workers: 0 is below the minimum 1"),
    ]
    for call, message in cases:
        with pytest.raises(CommandError, match=re.escape(message)):
            call()
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    result = run_cli("shard", "--source", "folder:/no/such/dir", "--output", tmp_path / "o")
    assert result.returncode == 2
    assert (
        result.stderr.count("\n") == 1
        and "Traceback" not in result.stderr
        and "/no/such/dir" in result.stderr
    )
    bad_flag = run_cli("shard", "--frobnicate")
    assert bad_flag.returncode == 2 and bad_flag.stderr.count("\n") == 1


def test_one_run_per_output_directory(corpus, tmp_path, monkeypatch, capsys):
    import fcntl

    from data_prep import sharding as shard_module

    _, sources, _ = corpus
    args = cli_args(sources)
    out = tmp_path / "busy"
    (out / ".data_prep").mkdir(parents=True)
    monkeypatch.setattr(shard_module, "LOCK_WAIT_S", 0)
    with open(out / ".data_prep" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert shard_cli(*args, "--output", out, "--resume") == 2
    assert "another data_prep shard run is writing there" in capsys.readouterr().err
    assert shard_cli(*args, "--output", out, "--resume") == 0
