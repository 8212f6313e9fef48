"""Every bench script runs in its ``--smoke`` mode and prints its ratio lines (shape, not value)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"\d+\.\d+"
ROW = rf"{NUM}\s+{NUM}\s+{NUM}\s+{NUM}"  # four figures in a row of a table

# Per script: the lines that carry its ratios against the baseline measured in the same run.
RATIO_LINES = {
    "train_step.py": [
        r"^small Show-o2, \d+ visual tokens/image, vocab [\d,]+, ",
        *(rf"^{mode}\s+{NUM}\s+\d+\s+{ROW}$" for mode in ("off", "cs", "csa")),
    ],
    "infotok_cost.py": [
        rf"^ratio regularizer / one Qwen2 layer: time {NUM}x, peak memory {NUM}x \(goal: both < 1",
    ],
    "loader.py": [rf"^\s+{w}\s+{NUM}\s+{NUM}\s+{NUM}$" for w in (1, 2)],
    "wan_vae.py": [
        rf"^{call}\s+{NUM}\s+{NUM}\s+{NUM}x$" for call in ("encode", "decode", "train step")
    ],
    "data_prep.py": [
        rf"^resize to 512: shard --workers \d+\s+{ROW}  >= 1\.5$",
        rf"^pass-through: shard --check structure, \d+ w\.\s+{ROW}  >= 0\.8$",
        rf"^pass-through: shard --check decode, \d+ w\.\s+{ROW}  $",
    ],
    "wds.py": [  # pass-through vs the two raw copies; selection of 1% vs listing alone
        rf"^shard wds: --check structure, \d+ w\.\s+{ROW}\s+{NUM}  >= 0\.8$",
        rf"^scan --take 0\.01 \(list, choose, read\), \d+ w\.\s+{NUM}\s+\d+\s+{NUM}$",
        rf"^scan --take \d+ \(list twice, read\), \d+ w\.\s+{NUM}\s+\d+\s+{NUM}$",
        rf"^scan, no --take \(read every caption\), \d+ w\.\s+{NUM}\s+\d+\s+{NUM}$",
    ],
    "latent_cache.py": [  # measured: ms and ratios cached / on the fly; planned: share, speed-up
        r"^\| showo2 tiny \| \d+\+\d+ \| i2t\+t2i \| "
        + rf"{NUM} \| " * 7
        + rf"{NUM}-{NUM} \| {NUM} \| {NUM}e[+-]\d+ \|$",
        rf"^\| configs/harmon_0\.5b\.yaml \| [\d,]+ \| [\d,]+ \| {NUM}% \| {NUM} \| {NUM}x \|$",
    ],
    "gpu_check.py": [  # a row per model and mode: tokens, step s, samples/s, ..., FLOPs/planned
        rf"^\| {model} tiny \| {mode} \| 2\+2 \| \d+ \| {NUM} \| {NUM} \| \S+ \| \S+ \| {NUM} \| "
        for model in ("showo2", "harmon", "openuni")
        for mode in ("off", "csa")
    ],
}


def test_every_bench_script_is_covered() -> None:
    scripts = {p.name for p in (ROOT / "bench").glob("*.py")} - {"__init__.py", "measure.py"}
    assert scripts == set(RATIO_LINES)


@pytest.mark.parametrize("script", sorted(RATIO_LINES))
def test_smoke_mode_prints_ratio_lines(script: str) -> None:
    done = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    for pattern in RATIO_LINES[script]:
        assert re.search(pattern, done.stdout, re.MULTILINE), f"{pattern!r} not in:\n{done.stdout}"
