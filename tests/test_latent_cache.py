"""Latent caches (``python -m data_prep encode``): every sample accounted for, the same bytes from
any number of ranks and after a ``kill -9``, damage found by ``verify``, a cache of another VAE
refused, and training from the cache equal to training on the fly (to float tolerance) and
resumable bit for bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_data import corrupt
from train_helpers import (
    ROOT,
    Run,
    assert_losses_close,
    loss_table,
    make_workspace,
    steps_logged,
    wait_for,
)

from data_prep.latents import LATENTS_DIR, cache_dir, sidecar_header
from data_prep.shard_index import read_index
from pipeline.checkpoint import CHECKPOINT_DIR, latest_tag
from pipeline.config import ConfigError
from pipeline.data import TwoStreamLoader
from pipeline.latent_cache import latent_source
from pipeline.models import build_model
from pipeline.recipe import load_train_config
from pipeline.train import EXIT_STOPPED

FAMILIES = ("showo2", "harmon", "openuni")
STEPS = 6
# Cached and on-the-fly latents are the same VAE computation in other batch compositions
# (the encoder batches a shard's images, a training step its own), so they agree to float32
# rounding (~1e-7); a few optimizer steps amplify that, measured at < 1e-5 relative.
LOSS_REL_TOL = 1e-4


def recipe(family: str) -> str:
    return f"configs/tiny_{family}.yaml"


def data_overrides(workspace: dict[str, Path], dataset: Path) -> list[str]:
    return [
        f"data.i2t=[{dataset}]",
        f"data.t2i=[{dataset}]",
        f"model.tokenizer_path={workspace['tokenizer']}",
    ]


def encode(
    workspace: dict[str, Path], dataset: Path, family: str, *extra: str, check: bool = True
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "encode", "--config", recipe(family)]
        + data_overrides(workspace, dataset)
        + list(extra),
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def bare_copy(dataset: Path, into: Path) -> Path:
    """The dataset's shards and manifest without its latent caches."""
    shutil.copytree(dataset, into, ignore=shutil.ignore_patterns(LATENTS_DIR))
    return into


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Shards with the cache of every family, each encoded by one rank."""
    space = make_workspace(tmp_path_factory.mktemp("latents"))
    for family in FAMILIES:
        encode(space, space["shards"], family)
    return space


def test_every_sample_is_encoded_once_and_verify_checks_the_sidecars(workspace):
    shards = workspace["shards"]
    dataset = json.loads((shards / "manifest.json").read_text())
    for family, tasks in (
        ("showo2", {"i2t", "t2i"}),
        ("harmon", {"i2t", "t2i"}),
        ("openuni", {"t2i"}),
    ):
        manifest = json.loads((cache_dir(shards, family) / "manifest.json").read_text())
        assert manifest["identity"]["tasks"] == sorted(tasks)
        listed = sum(dataset["totals"]["tasks"][t] for t in tasks)
        assert (manifest["totals"]["samples"], manifest["totals"]["skipped"]) == (listed, 0)
        for entry in dataset["shards"]:
            sidecar = cache_dir(shards, family) / entry["name"].replace(".tar", ".safetensors")
            names, meta = sidecar_header(sidecar)
            fields = meta["fields"]
            keys = {s.key for s in read_index(shards / entry["name"])[0] if s.task in tasks}
            assert names == {f"{k}/{f}" for k in keys for f in fields}
            assert meta["shard_sha256"] == entry["sha256"]
    assert (
        json.loads((cache_dir(shards, "showo2") / "manifest.json").read_text())["sidecars"][0][
            "name"
        ]
        == "shard-000000.safetensors"
    )
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "verify", str(shards)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for family in FAMILIES:
        assert f"verify: OK: latents/{family}: 3 sidecars" in result.stdout


def test_verify_finds_a_damaged_a_missing_and_a_leftover_sidecar(workspace, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(workspace["shards"], damaged)
    cache = cache_dir(damaged, "harmon")
    sidecar = cache / "shard-000001.safetensors"
    data = bytearray(sidecar.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: the size stays right
    sidecar.write_bytes(bytes(data))
    (cache / "shard-000002.safetensors").unlink()
    (cache / "shard-000000.safetensors.partial").write_bytes(b"half")
    result = subprocess.run(
        [sys.executable, "-m", "data_prep", "verify", str(damaged)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "latents/harmon/shard-000001.safetensors: sha256 differs from its manifest" in (
        result.stdout
    )
    assert "latents/harmon/shard-000002.safetensors: listed in its manifest but missing" in (
        result.stdout
    )
    assert "latents/harmon/shard-000000.safetensors.partial: leftover of an interrupted encode" in (
        result.stdout
    )
    assert "verify: OK: latents/showo2" in result.stdout  # the other caches are intact


def test_two_ranks_write_the_same_bytes_as_one(workspace, tmp_path):
    dataset = bare_copy(workspace["shards"], tmp_path / "shards")
    run = Run(
        recipe("showo2"),
        data_overrides(workspace, dataset),
        tmp_path / "logs",
        world=2,
        module="pipeline.encode",
    )
    assert run.wait(timeout=300) == [0, 0], run.output()
    reference = files_of(cache_dir(workspace["shards"], "showo2"))
    assert files_of(cache_dir(dataset, "showo2")) == reference
    assert "48 samples encoded, 0 skipped" in run.output()


# A real SIGKILL of the encoder at its n-th os.replace: per shard the sidecar is renamed into
# place (odd calls), then its receipt (even calls).
KILL_AT = {
    "a partial sidecar": 3,  # shard 0 finished; shard 1's sidecar written but not renamed
    "a sidecar without receipt": 4,  # shard 1's sidecar in place, its receipt not
}
KILLER = """
import os, signal, sys
real, calls = os.replace, [0]
def replace(src, dst):
    calls[0] += 1
    if calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
os.replace = replace
from pipeline.encode import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("state", KILL_AT)
def test_an_encode_killed_with_sigkill_resumes_to_the_same_bytes(workspace, tmp_path, state):
    dataset = bare_copy(workspace["shards"], tmp_path / "shards")
    args = ["--config", recipe("showo2"), *data_overrides(workspace, dataset)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLER.format(n=KILL_AT[state]), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    cache = cache_dir(dataset, "showo2")
    left = sorted(p.name for p in cache.iterdir())
    assert "manifest.json" not in left and "shard-000000.json" in left
    assert ("shard-000001.safetensors.partial" in left) == (state == "a partial sidecar")
    assert "shard-000001.json" not in left
    cfg = load_train_config(recipe("showo2"), data_overrides(workspace, dataset))
    torch.manual_seed(cfg.seed)
    with pytest.raises(ConfigError, match="unfinished encode"):
        latent_source(cfg.data.datasets(), build_model(cfg.model), cfg.precision, "auto")
    again = encode(workspace, dataset, "showo2")
    assert "(1 kept from an earlier run)" in again.stdout
    assert files_of(cache) == files_of(cache_dir(workspace["shards"], "showo2"))


def test_a_cache_of_another_vae_stops_training_with_one_line(workspace, tmp_path):
    dataset = bare_copy(workspace["shards"], tmp_path / "shards")
    encode(workspace, dataset, "showo2", "seed=1")  # another random VAE
    run_dir = tmp_path / "run"
    run = Run(
        recipe("showo2"),
        [*data_overrides(workspace, dataset), f"run_dir={run_dir}", "steps=2"],
        tmp_path / "logs",
        world=1,
    )
    assert run.wait() == [2], run.output()
    failed = [line for line in run.output().splitlines() if "FAILED" in line]
    assert len(failed) == 1, run.output()
    assert failed[0].startswith(
        f"preflight: FAILED: data: {cache_dir(dataset, 'showo2')} was "
        "encoded for another VAE or preprocessing (vae.sha256: cache "
    )
    assert "data.latent_cache=off" in failed[0] and "Traceback" not in run.output()
    refused = encode(workspace, dataset, "showo2", check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        (
            f"python -m data_prep encode: error: {cache_dir(dataset, 'showo2')}: holds latents "
            "of another VAE or preprocessing; pass --overwrite to replace them"
        )
    ]
    encode(workspace, dataset, "showo2", "--overwrite")
    assert files_of(cache_dir(dataset, "showo2")) == files_of(
        cache_dir(workspace["shards"], "showo2")
    )


def adapter_and_data(workspace: dict[str, Path], dataset: Path, family: str, **data):
    cfg = load_train_config(
        recipe(family),
        data_overrides(workspace, dataset) + [f"data.{k}={v}" for k, v in data.items()],
    )
    torch.manual_seed(cfg.seed)
    return cfg, build_model(cfg.model)


def test_without_a_cache_auto_encodes_on_the_fly_and_required_refuses(workspace, tmp_path):
    bare = bare_copy(workspace["shards"], tmp_path / "bare")
    cfg, adapter = adapter_and_data(workspace, bare, "showo2")
    assert latent_source(cfg.data.datasets(), adapter, cfg.precision, "auto") is None
    with pytest.raises(ConfigError, match=rf"data.latent_cache=required but {bare} has no latent"):
        latent_source(cfg.data.datasets(), adapter, cfg.precision, "required")
    notices: list[str] = []
    mixed = {"i2t": [workspace["shards"]], "t2i": [bare]}
    assert latent_source(mixed, adapter, cfg.precision, "auto", notices.append) is None
    assert notices == [f"not used: {bare} has no cache; every image is encoded on the fly"]
    cached = latent_source(cfg.data.datasets(), adapter, cfg.precision, "off")
    assert cached is None


def loader(cfg, adapter, latents=None) -> TwoStreamLoader:
    return TwoStreamLoader(cfg.data, adapter.processor, adapter.collate, latents=latents)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_batches_carry_the_posterior_and_give_the_same_losses(workspace, family):
    cfg, adapter = adapter_and_data(workspace, workspace["shards"], family, num_workers=0)
    source = latent_source(cfg.data.datasets(), adapter, cfg.precision, "required")
    assert source is not None and source.tasks == set(type(adapter).LATENT_TASKS)
    adapter.train()
    for fresh, cached in zip(loader(cfg, adapter), loader(cfg, adapter, source)):
        assert cached["keys"] == fresh["keys"]
        a, b = fresh["inputs"], cached["inputs"]
        pixels = sorted(k for k in b if k.endswith("pixel_values"))
        # only OpenUni's ViT still reads pixels (of both tasks)
        assert pixels == (["i2t_pixel_values", "t2i_pixel_values"] if family == "openuni" else [])
        fields = sorted(k for k in b if "vae_" in k)
        assert fields, sorted(b)
        losses = []
        for batch in (a, b):
            torch.manual_seed(7)  # MAR's dropout draws from the global RNG
            out = adapter(batch, torch.Generator().manual_seed(7))
            losses.append((out.loss_i2t, out.loss_t2i, out.target_patches))
        for x, y in zip(*losses):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
        if fresh["step"] == 1:
            break


def test_skipped_samples_keep_their_reason_through_the_cache(workspace, tmp_path):
    broken = bare_copy(workspace["shards"], tmp_path / "broken")
    bad = corrupt(broken, "shard-000000.tar", "png", 2)
    encode(workspace, broken, "harmon")
    manifest = json.loads((cache_dir(broken, "harmon") / "manifest.json").read_text())
    assert manifest["skipped"] == {"bad_image": 1}
    _, meta = sidecar_header(cache_dir(broken, "harmon") / "shard-000000.safetensors")
    assert meta["skipped"] == {bad: "bad_image"}
    cfg, adapter = adapter_and_data(workspace, broken, "harmon", num_workers=0)
    source = latent_source(cfg.data.datasets(), adapter, cfg.precision, "required")
    runs = []
    for latents in (None, source):
        data = loader(cfg, adapter, latents)
        batches = [b for b, _ in zip(data, range(14))]  # past an epoch of both streams
        runs.append(([b["keys"] for b in batches], data.stats()["skipped"]))
    assert runs[0] == runs[1]
    assert runs[1][1] == {"bad_image": runs[1][1]["bad_image"]} and runs[1][1]["bad_image"] >= 1


def run_training(workspace, family: str, run_dir: Path, cache: str) -> Run:
    return Run(
        recipe(family),
        [
            *data_overrides(workspace, workspace["shards"]),
            f"run_dir={run_dir}",
            f"steps={STEPS}",
            "checkpoint.every=2",
            f"data.latent_cache={cache}",
        ],
        run_dir.parent / f"{run_dir.name}-logs",
        world=1,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_training_from_the_cache_matches_and_resumes_bit_for_bit(workspace, tmp_path, family):
    """On the fly vs cached: the same loss terms to LOSS_REL_TOL; a cached run stopped by a
    signal and resumed equals the uninterrupted cached run exactly."""
    runs = {}
    for name, cache in (("fly", "off"), ("cached", "auto")):
        runs[name] = run_training(workspace, family, tmp_path / name, cache)
        assert runs[name].wait() == [0], runs[name].output()
    assert (
        "[train] latent cache: reading the VAE latents of 1 dataset(s)" in runs["cached"].output()
    )
    assert "latent cache" not in runs["fly"].output()
    assert_losses_close(tmp_path / "cached", tmp_path / "fly", STEPS, LOSS_REL_TOL)
    copy = tmp_path / "cached" / CHECKPOINT_DIR / latest_tag(tmp_path / "cached" / CHECKPOINT_DIR)
    assert "latent_cache: required" in (copy / "config.yaml").read_text()  # the path taken
    run_dir = tmp_path / "stopped"
    run = run_training(workspace, family, run_dir, "auto")
    wait_for(lambda: steps_logged(run_dir) >= 2, run, what="step 2")
    run.signal(signal.SIGUSR1)
    assert run.wait() == [EXIT_STOPPED], run.output()
    stopped_at = int(latest_tag(run_dir / CHECKPOINT_DIR).removeprefix("step_"))
    assert 2 <= stopped_at < STEPS
    resumed = run_training(workspace, family, run_dir, "auto")
    assert resumed.wait() == [0], resumed.output()
    assert loss_table(run_dir) == loss_table(tmp_path / "cached")
