"""Optional W&B logging: an offline run is read back from its ``.wandb`` file, a resumed run keeps
its W&B run id, and a recipe that turns W&B on without the package fails with one line."""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import wandb

from pipeline.config import ConfigError, load_config
from pipeline.metrics import MetricsLog, read_metrics
from pipeline.recipe import load_train_config
from pipeline.wandb_log import RUN_ID_FILE, WandbConfig


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and nothing written outside ``tmp_path``."""
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _records(path: Path):
    """The protobuf records of a ``.wandb`` file. The file is a LevelDB-style log (a 7-byte
    ``:W&B`` header, then 32 KiB blocks of chunks with 7-byte headers); the wandb package no
    longer ships a Python reader for it (its sync runs in the Go ``wandb-core``)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, chunks = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk: the record is complete
            record = Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


def _history(path: Path) -> list[tuple[int, dict]]:
    """(step, logged values) of each history record, W&B's own ``_step`` etc. left out."""
    out = []
    for record in _records(path):
        if record.WhichOneof("record_type") == "history":
            items = {
                item.key or "/".join(item.nested_key): json.loads(item.value_json)
                for item in record.history.item
            }
            out.append((record.history.step.num, {k: v for k, v in items.items() if k[0] != "_"}))
    return out


def _run_record(path: Path):
    return next(r.run for r in _records(path) if r.WhichOneof("record_type") == "run")


def _offline_runs(run_dir: Path) -> list[Path]:
    """The ``.wandb`` files of the run's offline W&B runs, oldest first (the folder names start
    with the start time; a second start within the same second gets a ``-1`` suffix)."""
    return [next(d.glob("run-*.wandb")) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


def _log(run_dir: Path, truncate_after: int, records: list[dict]) -> None:
    metrics = MetricsLog(
        run_dir,
        enabled=True,
        tensorboard=False,
        truncate_after=truncate_after,
        wandb=WandbConfig(project="infotok-test", tags=["ci", "tiny"]),
        config={"optim": {"lr": 1e-4}, "steps": 3},
    )
    for record in records:
        metrics.write(record)
    metrics.close()
    # finish() may return before W&B's service has written the whole file (seen with 0.19);
    # stopping the service, as the end of a training process does, completes it.
    wandb.teardown()


def test_an_offline_run_holds_the_logged_numbers_and_the_recipe(tmp_path):
    run_dir = tmp_path / "run-a"
    _log(
        run_dir,
        0,
        [
            {"step": s, "loss": 1.0 / s, "lr": 1e-4 * s, "tokens": 64 * s, "nonfinite": False}
            | {"note": "x", "eval": {"cka": 0.5}, "mfu": None}
            for s in (1, 2, 3)
        ],
    )
    (path,) = _offline_runs(run_dir)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert path.name == f"run-{run_id}.wandb"
    assert _history(path) == [
        (1, {"loss": 1.0, "lr": 1e-4 * 1, "tokens": 64}),
        (2, {"loss": 0.5, "lr": 1e-4 * 2, "tokens": 128}),
        (3, {"loss": 1.0 / 3, "lr": 1e-4 * 3, "tokens": 192}),
    ]
    run = _run_record(path)
    assert (run.run_id, run.project, run.display_name) == (run_id, "infotok-test", "run-a")
    assert list(run.tags) == ["ci", "tiny"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert (config["optim"], config["steps"]) == ({"lr": 1e-4}, 3)
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run-b"
    _log(run_dir, 0, [{"step": s, "loss": float(s)} for s in (1, 2, 3)])
    run_id = (run_dir / RUN_ID_FILE).read_text()
    # Resumed from the checkpoint of step 2: step 3 is logged again, then step 4.
    _log(run_dir, 2, [{"step": s, "loss": 10.0 * s} for s in (3, 4)])
    assert (run_dir / RUN_ID_FILE).read_text() == run_id
    first, resumed = _offline_runs(run_dir)
    assert first.name == resumed.name == f"run-{run_id.strip()}.wandb"
    assert _run_record(resumed).run_id == run_id.strip()
    assert _history(first) == [(1, {"loss": 1.0}), (2, {"loss": 2.0}), (3, {"loss": 3.0})]
    assert _history(resumed) == [(3, {"loss": 30.0}), (4, {"loss": 40.0})]
    assert [(r["step"], r["loss"]) for r in read_metrics(run_dir)] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
    ]


@dataclass
class _Log:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class _Recipe:
    log: _Log = field(default_factory=_Log)


def test_wandb_on_without_the_package_is_one_line_naming_the_key(monkeypatch):
    assert load_config(_Recipe).log.wandb.project is None  # off by default: nothing is checked
    recipe = "configs/tiny_showo2.yaml"
    assert load_train_config(recipe, ["log.wandb.project=infotok"]).log.wandb.project
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when not installed
    assert load_config(_Recipe, None, ["log.wandb.mode=online"]).log.wandb.mode == "online"
    with pytest.raises(ConfigError) as e:
        load_config(_Recipe, None, ["log.wandb.project=infotok"])
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("command line: log.wandb.project is set but the wandb package is")
    assert "pip install 'infotok-pipeline[wandb]'" in message
    with pytest.raises(ConfigError, match=r"^configs/tiny_showo2.yaml \+ command line: log"):
        load_train_config(recipe, ["log.wandb.project=infotok"])


def test_a_training_run_logs_its_records_to_an_offline_wandb_run(tmp_path):
    """Two gloo ranks train the tiny recipe with ``log.wandb.project`` set; rank 0's offline
    W&B run holds exactly what ``metrics.jsonl`` holds, and the recipe as its config."""
    from train_helpers import Run, make_workspace

    space = make_workspace(tmp_path / "space")
    run_dir = tmp_path / "run"
    args = [
        f"run_dir={run_dir}",
        "steps=3",
        f"data.i2t=[{space['shards']}]",
        f"data.t2i=[{space['shards']}]",
        f"model.tokenizer_path={space['tokenizer']}",
        "data.num_workers=0",
        "log.tensorboard=false",
        "log.wandb.project=infotok-test",
    ]
    run = Run("configs/tiny_showo2.yaml", args, tmp_path / "logs")
    assert run.wait() == [0, 0], run.output()
    (wandb_file,) = _offline_runs(run_dir)
    logged = _history(wandb_file)
    records = read_metrics(run_dir)
    assert [step for step, _ in logged] == [r["step"] for r in records] == [1, 2, 3]
    for (_, values), record in zip(logged, records):
        assert values["loss"] == record["loss"] and values["kl_u"] == record["kl_u"]
    config = {item.key: item.value_json for item in _run_record(wandb_file).config.update}
    assert json.loads(config["steps"]) == 3
