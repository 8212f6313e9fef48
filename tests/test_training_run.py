"""What a long run needs while it runs: per-module learning rates, console progress, validation,
the gradient guard and replay (DeepSpeed ZeRO-2 on real gloo ranks, tiny recipes)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.checkpoint import CHECKPOINT_DIR, latest_tag
from pipeline.config import ConfigError
from pipeline.distributed import free_port
from pipeline.grad_guard import FAULT_ENV, SKIPPED_STEPS_FILE
from pipeline.metrics import read_metrics
from pipeline.objective import build_objective
from pipeline.param_groups import ParamGroupConfig, resolve_groups
from pipeline.recipe import load_train_config
from pipeline.train import EXIT_STOPPED
from train_helpers import ROOT, Run, loss_table, make_data, make_workspace, steps_logged, wait_for

RECIPE = "configs/tiny_showo2.yaml"
ENCODER = [
    "adapter.und_trans.*",
    "adapter.image_embedder_und.*",
    "adapter.image_embedder_gen.*",
    "adapter.position_embedding.*",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_run")
    space = make_workspace(root)
    space["heldout"] = make_data(root / "heldout", count=24, seed=7)
    return space


def overrides(workspace, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "steps": 6,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 5,
        "data.i2t": f"[{workspace['shards']}]",
        "data.t2i": f"[{workspace['shards']}]",
        "model.tokenizer_path": str(workspace["tokenizer"]),
        "data.num_workers": 0,
        "log.tensorboard": "false",
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def in_process(workspace, tmp_path: Path, body: str, env: dict[str, str] | None = None, **extra):
    """Runs ``body`` in a one-rank process with ``trainer`` (a Trainer of the tiny recipe) built;
    returns what ``body`` puts in ``out`` (JSON)."""
    out = tmp_path / "out.json"
    args = overrides(workspace, tmp_path / "run", **extra)
    script = (
        "import json, math, torch\n"
        "from pipeline.recipe import load_train_config\n"
        "from pipeline.train import Trainer\n"
        f"cfg = load_train_config({RECIPE!r}, {args!r})\n"
        "trainer = Trainer(cfg)\n"
        "out = {}\n"
        f"{body}\n"
        f"open({str(out)!r}, 'w').write(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        },
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


# -- per-module learning rates ----------------------------------------------------------------


def test_the_optimizer_holds_each_groups_lr_through_warm_up_and_decay(workspace, tmp_path):
    lr, steps, warmup = 1e-3, 6, 2
    groups = "[{name: visual_encoder, params: [" + ", ".join(ENCODER) + "], lr_scale: 0.2}]"
    body = (
        "out['names'] = [g.name for g in trainer.groups]\n"
        "out['lrs'] = []\n"
        "for _ in range(cfg.steps):\n"
        "    trainer.train_step()\n"
        "    out['lrs'].append([g['lr'] for g in trainer.engine.optimizer.param_groups])\n"
    )
    out = in_process(
        workspace,
        tmp_path,
        body,
        **{
            "optim.lr": lr,
            "optim.warmup_steps": warmup,
            "optim.min_lr_ratio": 0.1,
            "optim.groups": groups,
            "optim.heads_lr_scale": 3.0,
            "steps": steps,
        },
    )
    assert out["names"] == ["visual_encoder", "infotok_heads", "default"]
    for step, lrs in enumerate(out["lrs"], start=1):
        # the schedule after `step` updates, written out here: linear warm-up, then cosine
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            progress = (step - warmup) / (steps - warmup)
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        expected = sorted({lr * factor * s for s in (0.2, 3.0, 1.0)})
        assert sorted(set(lrs)) == pytest.approx(expected, rel=1e-12), (step, lrs)


def test_the_show_o2_recipes_train_the_encoder_at_one_fifth_of_the_llm(tmp_path):
    from pipeline.models.common.tiny_tokenizer import make_tokenizer

    tiny = load_train_config(RECIPE)
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    model_cfg = replace(tiny.model, tokenizer_path=str(tokenizer))
    model = build_objective(model_cfg, tiny.infotok)
    for recipe in ("configs/showo2_1.5b.yaml", "configs/showo2_7b.yaml"):
        cfg = load_train_config(recipe)
        resolved = {g.name: g for g, _ in resolve_groups(model, cfg.optim.groups, cfg.optim.lr)}
        assert resolved["visual_encoder"].lr * 5 == pytest.approx(resolved["default"].lr)
        assert resolved["default"].lr == cfg.optim.lr
        prefixes = tuple(pattern.removesuffix("*") for pattern in ENCODER)
        encoder = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
        assert resolved["visual_encoder"].numel == sum(p.numel() for p in encoder) > 0


@pytest.mark.parametrize(
    "groups, message",
    [
        ([ParamGroupConfig("enc", ["adapter.no_such_module.*"])], "matches no trained parameter"),
        (
            [ParamGroupConfig("a", ["adapter.showo.*"]), ParamGroupConfig("b", ["adapter.*"])],
            "both match",
        ),
    ],
)
def test_a_bad_group_is_one_line_naming_optim_groups(tmp_path, groups, message):
    from pipeline.models.common.tiny_tokenizer import make_tokenizer

    tiny = load_train_config(RECIPE)
    model_cfg = replace(tiny.model, tokenizer_path=str(make_tokenizer(tmp_path / "t")))
    model = build_objective(model_cfg, tiny.infotok)
    with pytest.raises(ConfigError, match=message) as error:
        resolve_groups(model, groups, 1e-5)
    assert str(error.value).startswith("optim.groups") and "\n" not in str(error.value)


def test_a_group_pattern_that_matches_nothing_stops_the_run_with_one_line(workspace, tmp_path):
    groups = "[{name: encoder, params: [adapter.visual_tower.*], lr_scale: 0.2}]"
    run = Run(RECIPE, overrides(workspace, tmp_path / "run", **{"optim.groups": groups}), tmp_path)
    assert run.wait() == [2, 2], run.output()
    lines = [line for line in run.logs[0].read_text().splitlines() if "FAILED" in line]
    assert lines == [
        "preflight: FAILED: optim.groups: group 'encoder': pattern 'adapter.visual_tower.*' "
        "matches no trained parameter (names look like 'adapter.showo.model.embed_tokens.weight')"
    ]
    assert "Traceback" not in run.output()


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.every=2", "needs held-out data"),
        ("optim.groups=[{name: default, params: [x]}]", "other than 'default'"),
        ("optim.groups=[{name: heads, params: [regularizer.*]}]", "optim.heads_lr_scale"),
    ],
)
def test_bad_training_options_are_one_line(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_train_config(RECIPE, [override])


# -- console progress, validation -------------------------------------------------------------


def test_stdout_has_the_banner_a_line_per_record_and_the_final_line(workspace, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"log.every": 2, "steps": 4, "eval.every": 2, "eval.t2i": f"[{workspace['heldout']}]"}
    run = Run(RECIPE, overrides(workspace, run_dir, **extra), tmp_path / "logs")
    assert run.wait() == [0, 0], run.output()
    text = run.logs[0].read_text()
    cfg = load_train_config(RECIPE)
    samples = 2 * (cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i) * cfg.grad_accum
    banner = rf"\[train\] .*showo2, 2 rank\(s\), 4 steps of {samples} samples; starting at step 0"
    assert re.search(banner, text)
    assert re.search(r"\[train\] parameters: [\d.]+[kMB]? trained, [\d.]+[kMB]? frozen", text)
    assert re.search(r"\[train\]   group infotok_heads .*<- regularizer\.\*", text)
    lines = re.findall(r"\[train\] step (\d)/4 \| loss [\d.]+ .*\| lr .* \| ETA \S+", text)
    assert lines == ["2", "4"]
    assert re.findall(r"\[val\] step (\d): .*\bloss [\d.]+", text) == ["2", "4"]
    assert re.search(r"\[train\] finished at step 4/4 after ", text)
    assert "[train]" not in run.logs[1].read_text()  # rank 1 prints nothing
    config = (run_dir / "config.yaml").read_text()
    assert "# optimizer groups as resolved at start:" in config
    assert load_train_config(run_dir / "config.yaml").steps == 4  # still a loadable recipe


def test_validation_is_logged_and_leaves_training_and_resume_bit_identical(workspace, tmp_path):
    held_out = {"eval.every": 2, "eval.i2t": f"[{workspace['heldout']}]", "eval.batches": 2}
    plain = tmp_path / "plain"
    assert Run(RECIPE, overrides(workspace, plain), tmp_path / "l0").wait() == [0, 0]
    run_dir = tmp_path / "run"
    run = Run(RECIPE, overrides(workspace, run_dir, **held_out), tmp_path / "l1")
    wait_for(lambda: steps_logged(run_dir) >= 3, run, what="step 3")
    run.signal(signal.SIGUSR1)
    assert run.wait() == [EXIT_STOPPED, EXIT_STOPPED], run.output()
    stopped = int(latest_tag(run_dir / CHECKPOINT_DIR).removeprefix("step_"))
    assert stopped < 6
    resumed = Run(RECIPE, overrides(workspace, run_dir, **held_out), tmp_path / "l2")
    assert resumed.wait() == [0, 0], resumed.output()
    assert loss_table(run_dir) == loss_table(plain)  # training numbers untouched
    whole = tmp_path / "whole"
    assert Run(RECIPE, overrides(workspace, whole, **held_out), tmp_path / "l3").wait() == [0, 0]
    held_out_terms = [
        {k: v for k, v in r.items() if k.startswith("val/")} for r in read_metrics(whole)
    ]
    assert held_out_terms == [
        {k: v for k, v in r.items() if k.startswith("val/")} for r in read_metrics(run_dir)
    ]  # and the held-out numbers of the resumed run are those of an uninterrupted one
    records = read_metrics(run_dir)
    validated = [r["step"] for r in records if "val/loss" in r]
    assert validated == [2, 4, 6]
    first = {k: v for k, v in records[1].items() if k.startswith("val/")}
    assert {"val/loss", "val/loss_i2t", "val/kl_u"} <= set(first)
    assert all(math.isfinite(v) for v in first.values())
    # the same held-out samples each time; training moves their losses
    assert records[1]["val/loss"] != records[5]["val/loss"]


# -- the gradient guard -----------------------------------------------------------------------


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize("factor", ["inf", "1e6"])
def test_an_infinite_or_huge_gradient_skips_exactly_that_step(workspace, tmp_path, accum, factor):
    body = (
        "def weights():\n"
        "    return [p.detach().clone() for p in trainer.model.parameters() if p.requires_grad]\n"
        "out['changed'], out['applied'] = [], []\n"
        "for _ in range(4):\n"
        "    before = weights()\n"
        "    result = trainer.train_step()\n"
        "    after = weights()\n"
        "    out['applied'].append(result.applied)\n"
        "    out['changed'].append(any(not torch.equal(a, b) for a, b in zip(before, after)))\n"
        "out['norm'] = float(trainer.guard.norm)\n"
    )
    out = in_process(
        workspace,
        tmp_path,
        body,
        env={FAULT_ENV: f"grad:3:{factor}"},
        grad_accum=accum,
        **{"optim.skip_grad_norm_above": 1e4},
    )
    assert out["applied"] == [True, True, False, True]
    assert out["changed"] == [True, True, False, True]
    assert math.isfinite(out["norm"])


def test_a_skipped_step_is_logged_with_its_samples(workspace, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"optim.skip_grad_norm_above": 1e4, "steps": 3, "grad_accum": 2}
    run = Run(
        RECIPE,
        overrides(workspace, run_dir, **extra),
        tmp_path / "logs",
        extra_env={FAULT_ENV: "grad:2:1e6"},
    )
    assert run.wait() == [0, 0], run.output()
    skipped = [json.loads(line) for line in (run_dir / SKIPPED_STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in skipped] == [2]
    assert "above optim.skip_grad_norm_above=10000" in skipped[0]["reason"]
    assert skipped[0]["grad_norm"] > 1e4
    ranks = skipped[0]["ranks"]
    assert len(ranks) == 2 and all(len(micro) == 2 for micro in ranks)  # 2 ranks x 2 micro-steps
    assert all(micro["keys"]["i2t"] and micro["keys"]["t2i"] for r in ranks for micro in r)
    assert [r["nonfinite"] for r in read_metrics(run_dir)] == [False, True, False]
    assert "step 2 skipped: gradient norm" in run.logs[0].read_text()


# -- replay -----------------------------------------------------------------------------------


def replay(run_dir: Path, step: int, tmp_path: Path, world: int = 2) -> tuple[list, dict, Run]:
    report = tmp_path / f"replay{step}.json"
    args = ["--run", str(run_dir), "--step", str(step), "--json", str(report)]
    run = Run(None, args, tmp_path / f"replay{step}", world=world, module="pipeline.replay")
    codes = run.wait()
    return codes, (json.loads(report.read_text()) if report.exists() else {}), run


def test_replay_recomputes_a_step_bit_for_bit_before_and_after_a_resume(workspace, tmp_path):
    run_dir = tmp_path / "run"
    run = Run(RECIPE, overrides(workspace, run_dir), tmp_path / "l1")
    wait_for(lambda: steps_logged(run_dir) >= 3, run, what="step 3")
    run.signal(signal.SIGUSR1)
    assert run.wait() == [EXIT_STOPPED, EXIT_STOPPED], run.output()
    resumed_at = int(latest_tag(run_dir / CHECKPOINT_DIR).removeprefix("step_"))
    assert Run(RECIPE, overrides(workspace, run_dir), tmp_path / "l2").wait() == [0, 0]
    records = {r["step"]: r for r in read_metrics(run_dir)}
    for step in (2, resumed_at + 1):
        codes, report, replayed = replay(run_dir, step, tmp_path)
        assert codes == [0, 0], replayed.output()
        assert report["differences"] == {}
        for name in ("loss", "loss_i2t", "loss_t2i", "kl_u", "grad_norm", "lr"):
            assert report["terms"][name] == records[step][name], name
        keys = {s["key"] for e in report["samples"] for v in e["samples"].values() for s in v}
        cfg = load_train_config(RECIPE)
        assert len(keys) == 2 * (cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i)
        assert len(report["samples"]) == 2 * cfg.grad_accum
        assert "every term equals metrics.jsonl bit for bit" in replayed.logs[0].read_text()


def test_replay_refuses_a_step_past_the_last_checkpoint_and_a_changed_data_set(workspace, tmp_path):
    run_dir = tmp_path / "run"
    assert Run(RECIPE, overrides(workspace, run_dir, steps=4), tmp_path / "l").wait() == [0, 0]
    codes, _, run = replay(run_dir, 9, tmp_path)
    assert codes == [2, 2]
    assert re.search(
        r"replay: FAILED: --step 9: outside the run's checkpointed steps 1\.\.4", run.output()
    )
    changed = tmp_path / "changed"
    make_data(changed, count=40, seed=0)
    config = run_dir / CHECKPOINT_DIR / "step_00000002" / "config.yaml"
    config.write_text(config.read_text().replace(str(workspace["shards"]), str(changed / "shards")))
    codes, _, run = replay(run_dir, 3, tmp_path)
    assert codes == [2, 2]
    assert "loader state does not match this data setup" in run.output()
