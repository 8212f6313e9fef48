"""``python -m pipeline.evaluate`` on a tiny run trained for real on 2 ranks (DeepSpeed ZeRO-2, gloo)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from pipeline.eval.loading import load
from train_helpers import ROOT, Run, make_workspace

STEPS = 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    workspace = make_workspace(root)
    run_dir = root / "run"
    values = {
        "run_dir": run_dir,
        "steps": STEPS,
        "checkpoint.every": STEPS,
        "data.num_workers": 1,
        "data.i2t": f"[{workspace['shards']}]",
        "data.t2i": f"[{workspace['shards']}]",
        "model.tokenizer_path": workspace["tokenizer"],
    }
    run = Run("configs/tiny_showo2.yaml", [f"{k}={v}" for k, v in values.items()], root / "logs")
    assert run.wait() == [0, 0], run.output()
    return workspace, run_dir


def _finite_numbers(node) -> list[float]:
    if isinstance(node, dict):
        return [x for v in node.values() for x in _finite_numbers(v)]
    if isinstance(node, list):
        return [x for v in node for x in _finite_numbers(v)]
    return [node] if isinstance(node, float) else []


def test_evaluate_a_run_writes_the_report_metrics_and_plots(trained, tmp_path):
    workspace, run_dir = trained
    out = tmp_path / "eval"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.evaluate",
            "--model",
            str(run_dir),
            "--data",
            str(workspace["shards"]),
            "--output",
            str(out),
            "--samples",
            "8",
            "--batch-size",
            "4",
            "--batches",
            "3",
            "--bootstrap",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"]["step"] == STEPS and metrics["model"]["infotok_mode"] == "csa"
    losses = metrics["heldout"]["losses"]
    assert {
        "loss_i2t",
        "loss_t2i",
        "kl_u",
        "kl_g",
        "suff_u",
        "suff_g",
        "align_u",
        "align_g",
    } <= set(losses)
    assert metrics["rate"]["u"]["nats_per_token"] == losses["kl_u"] > 0
    cka = metrics["cka"]["debiased"]
    assert cka["n"] == 12 and cka["ci_low"] <= cka["ci_high"] and -1.5 < cka["value"] <= 1.0
    assert 0 <= metrics["cka"]["normalized"]["value"] <= 1.0
    understanding, generation = (
        metrics["benchmark"]["understanding"],
        metrics["benchmark"]["generation"],
    )
    assert understanding["overall"]["n"] == 8 and generation["overall"]["n"] == 8
    baseline = metrics["benchmark"]["understanding_majority_baseline"]
    assert set(baseline) == set(understanding) and baseline["overall"]["n"] == 8
    chance = metrics["benchmark"]["generation_prompt_agnostic_baseline"]
    assert set(chance) == set(generation) and chance["overall"]["n"] == 8
    assert all(
        0 <= v["accuracy"] <= 1
        for v in [
            *understanding.values(),
            *generation.values(),
            *baseline.values(),
            *chance.values(),
        ]
    )
    assert all(math.isfinite(x) for x in _finite_numbers(metrics))
    for name in ("training_curves.png", "understanding_accuracy.png", "generation_accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in (out / "report.md").read_text()
    report = (out / "report.md").read_text()
    for heading in (
        "## Held-out losses",
        "## CKA",
        "Rate of the shared tokens",
        "GenEval category",
        "majority-answer baseline",
        "prompt-agnostic baseline",
    ):
        assert heading in report
    items = [json.loads(line) for line in (out / "benchmark.jsonl").read_text().splitlines()]
    assert len(items) == 16 and len(list((out / "generated").glob("*.png"))) == 8
    by_scene = metrics["benchmark"]["understanding_by_scene"]
    assert sum(v["n"] for v in by_scene.values()) == 8 and set(by_scene) <= {
        "one object",
        "several objects",
    }
    for group, v in by_scene.items():
        answers = [i["correct"] for i in items if i.get("scene") == group]
        assert v["n"] == len(answers) and v["accuracy"] == sum(answers) / len(answers)
        p = v["accuracy"]
        assert v["se"] == pytest.approx((p * (1 - p) / len(answers)) ** 0.5)
        assert f"| {group} | {p:.3f} ± {v['se']:.3f} | {len(answers)} |" in report
    assert "| scene | accuracy ± SE | n |" in report
    print(report)


def test_a_directory_that_is_neither_a_run_nor_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a training run"):
        load(tmp_path)
