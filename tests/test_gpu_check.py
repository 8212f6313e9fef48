"""``bench/gpu_check.sh`` runs end to end in its CPU smoke mode, the planner's prediction
included, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("showo2", "harmon", "openuni")
MODES = ("off", "csa")


def test_smoke_run_writes_one_entry_per_model_and_mode(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_ARGS": "--smoke"}
    env.pop("OUT", None)
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(out)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    entries = json.loads((out / "results.json").read_text())
    assert sorted((e["model"], e["mode"]) for e in entries) == sorted(
        (model, mode) for model in MODELS for mode in MODES
    )
    for entry in entries:
        assert "error" not in entry, entry
        assert entry["step_s"] > 0 and entry["flops"] > 0, entry
        assert entry["samples_per_s"] > 0 and entry["tokens_per_step"] > 0, entry
        assert entry["predicted_gib"] > 0 and entry["planned_flops"] > 0, entry
        assert entry["mfu"] is None and entry["peak_gib"] is None, entry
        assert entry["peak_vs_predicted"] is None, entry
        assert entry["syncs_per_step"] is None, entry
        assert entry["sdpa"]["calls"] and entry["sdpa"]["calls"][0]["works"], entry

    table = (out / "results.md").read_text()
    assert "| model | mode | batch i2t+t2i |" in table
    for model in MODELS:
        for mode in MODES:
            assert f"| {model} tiny | {mode} | 2+2 |" in table
    assert table.strip() in done.stdout
    assert (out / "log.txt").is_file()
