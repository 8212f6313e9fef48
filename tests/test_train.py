"""The DeepSpeed ZeRO-2 trainer on 2 real gloo ranks: exact resume, crash safety, modes, export."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT_DIR, LATEST, latest_tag
from pipeline.config import ConfigError
from pipeline.metrics import read_metrics
from pipeline.data import TwoStreamLoader
from pipeline.models import adapter_class, build_model
from pipeline.recipe import deepspeed_config, load_train_config
from pipeline.train import EXIT_STOPPED
from train_helpers import LOSS_KEYS, ROOT, Run, loss_table, make_workspace, steps_logged, wait_for

RECIPE = "configs/tiny_showo2.yaml"
FAMILY_RECIPES = {
    family: f"configs/tiny_{family}.yaml" for family in ("showo2", "harmon", "openuni")
}
STEPS = 8


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("train"))


def overrides(workspace, run_dir: Path, **extra) -> list[str]:
    values = {
        "run_dir": str(run_dir),
        "steps": STEPS,
        "checkpoint.every": 2,
        "checkpoint.keep_last": 2,
        "data.i2t": f"[{workspace['shards']}]",
        "data.t2i": f"[{workspace['shards']}]",
        "model.tokenizer_path": str(workspace["tokenizer"]),
        "data.num_workers": 1,
        **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def run_to_end(workspace, run_dir: Path, recipe: str = RECIPE, **extra) -> Run:
    run = Run(
        recipe, overrides(workspace, run_dir, **extra), run_dir.parent / f"{run_dir.name}-logs"
    )
    codes = run.wait()
    assert codes == [0, 0], run.output()
    return run


def uninterrupted(workspace, root: Path, recipe: str) -> list[tuple]:
    """The sequence every resumed run must reproduce bit for bit."""
    run_dir = root / "run"
    run_to_end(workspace, run_dir, recipe)
    table = loss_table(run_dir)
    assert [row[0] for row in table] == list(range(1, STEPS + 1))
    return table


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    return uninterrupted(workspace, tmp_path_factory.mktemp("reference"), RECIPE)


@pytest.mark.parametrize("family", FAMILY_RECIPES)
def test_signal_then_resume_is_bit_identical(workspace, reference, tmp_path, family):
    recipe = FAMILY_RECIPES[family]
    expected = (
        reference if recipe == RECIPE else uninterrupted(workspace, tmp_path / "reference", recipe)
    )
    run_dir = tmp_path / "run"
    run = Run(recipe, overrides(workspace, run_dir), tmp_path / "logs")
    wait_for(lambda: steps_logged(run_dir) >= 3, run, what="step 3")
    run.signal(signal.SIGUSR1)
    assert run.wait() == [EXIT_STOPPED, EXIT_STOPPED], run.output()
    stopped_at = int(latest_tag(run_dir / CHECKPOINT_DIR).removeprefix("step_"))
    assert 3 <= stopped_at < STEPS and steps_logged(run_dir) == stopped_at
    run_to_end(workspace, run_dir, recipe)
    assert loss_table(run_dir) == expected


def test_checkpoints_by_time_agree_across_ranks_and_old_ones_are_pruned(
    workspace, reference, tmp_path
):
    """every_minutes far below a step's time: every step is saved (``every`` alone would save only
    the last); retention, running in the background, leaves the newest two; nothing changes the
    numbers, and resuming from a time-taken checkpoint reproduces the run."""
    run_dir = tmp_path / "run"
    run_to_end(workspace, run_dir, **{"checkpoint.every": 1000, "checkpoint.every_minutes": 1e-5})
    root = run_dir / CHECKPOINT_DIR
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000007", "step_00000008"]
    assert sorted(p.name for p in (root / "step_00000007").glob("*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (root / "step_00000007" / "trainer_state.json").is_file()
    assert loss_table(run_dir) == reference
    run_to_end(
        workspace, run_dir, **{"resume": str(root / "step_00000007"), "checkpoint.every": 1000}
    )
    assert loss_table(run_dir) == reference


def test_records_every_n_steps_hold_means_and_throughput_and_resume_exactly(
    workspace, reference, tmp_path
):
    """``log.every=4``: one record per four steps holding their means; the ranks agree on the
    stop signal at those steps only, so a signal stops the run there, and the resumed run writes
    the same records as an uninterrupted one. Training itself is the reference run's."""
    every = {"log.every": 4, "steps": 12}
    whole = tmp_path / "whole"
    run_to_end(workspace, whole, **every)
    records = read_metrics(whole)
    assert [r["step"] for r in records] == [4, 8, 12]
    by_step = {row[0]: row for row in reference}
    first = records[0]  # steps 1-4: the 8-step reference's warm-up and first decayed step
    for column, key in enumerate(LOSS_KEYS, start=1):
        if key != "lr":  # the schedule runs over 12 steps here, not 8
            mean = sum(by_step[s][column] for s in range(1, 5)) / 4
            assert first[key] == pytest.approx(mean, rel=1e-5, abs=1e-7), key
    for record in records:
        assert record["tflops_per_gpu"] > 0 and "mfu" not in record  # no MFU without a GPU peak
        assert record["seconds"] > 0 and record["samples_per_s"] > 0

    stopped = tmp_path / "stopped"
    run = Run(RECIPE, overrides(workspace, stopped, **every), tmp_path / "logs")
    wait_for(lambda: any(stopped.glob("checkpoints/step_00000002")), run, what="step 2")
    run.signal(signal.SIGUSR1)
    assert run.wait() == [EXIT_STOPPED, EXIT_STOPPED], run.output()
    stopped_at = int(latest_tag(stopped / CHECKPOINT_DIR).removeprefix("step_"))
    assert stopped_at in (4, 8) and [r["step"] for r in read_metrics(stopped)][-1] == stopped_at
    run_to_end(workspace, stopped, **every)
    assert loss_table(stopped) == loss_table(whole)


def test_kill_9_after_a_checkpoint_resumes_exactly(workspace, reference, tmp_path):
    run_dir = tmp_path / "run"
    run = Run(RECIPE, overrides(workspace, run_dir), tmp_path / "logs")
    marker = run_dir / CHECKPOINT_DIR / LATEST
    wait_for(
        lambda: marker.exists() and marker.read_text() == "step_00000004", run, what="checkpoint 4"
    )
    run.kill()
    run_to_end(workspace, run_dir)
    assert (
        loss_table(run_dir) == reference
    )  # steps logged after the checkpoint were replaced, not repeated


def test_a_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(
    workspace, reference, tmp_path
):
    run_dir = tmp_path / "run"
    run = Run(
        RECIPE,
        overrides(workspace, run_dir),
        tmp_path / "logs",
        extra_env={"INFOTOK_FAULT": "crash_in_save:6"},
    )
    try:
        run.procs[0].wait(
            timeout=600
        )  # rank 0 dies inside save(6), after DeepSpeed wrote its files
    finally:
        run.kill()  # the other rank waits at the barrier
    root = run_dir / CHECKPOINT_DIR
    assert (root / "step_00000006").is_dir()  # the partial save is there...
    assert (
        latest_tag(root) == "step_00000004"
    )  # ...but latest still names the previous complete one
    run_to_end(workspace, run_dir)
    assert loss_table(run_dir) == reference


@pytest.mark.parametrize("mode", ["off", "cs"])
def test_every_mode_trains(workspace, tmp_path, mode):
    run_dir = tmp_path / "run"
    run_to_end(workspace, run_dir, **{"infotok.mode": mode, "steps": 3, "checkpoint.every": 3})
    records = read_metrics(run_dir)
    assert len(records) == 3 and all(r["grad_norm"] > 0 for r in records)
    has_align = any(k.startswith("align") for k in records[0])
    has_kl = "kl_u" in records[0]
    assert (has_kl, has_align) == {"off": (False, False), "cs": (True, False)}[mode]


def test_csa_logs_every_term(reference, workspace, tmp_path):
    assert all(v is not None for row in reference for v in row), (
        "a term is missing from metrics.jsonl"
    )


def test_non_finite_losses_stop_the_run_without_a_corrupt_checkpoint(workspace, tmp_path):
    run_dir = tmp_path / "run"
    run = Run(
        RECIPE,
        overrides(
            workspace,
            run_dir,
            **{
                "optim.lr": 1e30,
                "optim.warmup_steps": 0,
                "optim.grad_clip": 0.0,
                "max_nonfinite_steps": 3,
            },
        ),
        tmp_path / "logs",
    )
    codes = run.wait()
    assert all(c not in (0, EXIT_STOPPED) for c in codes), codes
    assert "consecutive steps with a non-finite loss" in run.output()
    records = read_metrics(run_dir)
    assert [r["nonfinite"] for r in records][-3:] == [True, True, True]
    root = run_dir / CHECKPOINT_DIR
    tag = latest_tag(root) if root.exists() else None
    assert tag is None or int(tag.removeprefix("step_")) <= records[-3]["step"] - 1


def test_export_drops_the_infotok_heads_and_matches_the_training_module(workspace, tmp_path):
    run_dir = tmp_path / "run"
    run_to_end(workspace, run_dir, **{"steps": 2, "checkpoint.every": 2})
    out = tmp_path / "exported"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.export",
            "--checkpoint",
            str(run_dir),
            "--output",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "InfoTok tensors dropped" in result.stdout

    tag_dir = run_dir / CHECKPOINT_DIR / "step_00000002"
    cfg = load_train_config(tag_dir / "config.yaml")
    module_state = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert any(k.startswith("regularizer.") for k in module_state)
    trained = build_model(cfg.model)
    trained.load_state_dict(
        {k.removeprefix("adapter."): v for k, v in module_state.items() if k.startswith("adapter.")}
    )
    exported = adapter_class(cfg.model.family).from_pretrained(out)
    assert not any("regularizer" in k for k in exported.state_dict())
    loader = TwoStreamLoader(cfg.data, exported.processor, exported.collate)
    batch = next(iter(loader))["inputs"]
    outputs = [
        model.eval()(batch, generator=torch.Generator().manual_seed(0))
        for model in (trained, exported)
    ]
    for name in ("loss_i2t", "loss_t2i", "z_u", "z_g"):
        assert torch.equal(getattr(outputs[0], name), getattr(outputs[1], name)), name


def test_the_deepspeed_json_cannot_disagree_with_the_recipe(tmp_path):
    cfg = load_train_config(RECIPE, ["data.i2t=[x]", "data.t2i=[x]"])
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 5.0, "zero_optimization": {"stage": 2}}))
    cfg.deepspeed = str(ds)
    with pytest.raises(
        ConfigError,
        match=r"ds\.json: gradient_clipping is 5\.0 but the recipe gives 1\.0 "
        r"\(from optim\.grad_clip\)",
    ):
        deepspeed_config(cfg, world_size=2)
    ds.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size is 64 but the recipe gives 8 "):
        deepspeed_config(cfg, world_size=2)
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="the LR schedule comes from the recipe"):
        deepspeed_config(cfg, world_size=2)
    filled = deepspeed_config(
        load_train_config(RECIPE, ["data.i2t=[x]", "data.t2i=[x]"]), world_size=2
    )
    assert filled["train_batch_size"] == 8 and filled["optimizer"]["params"]["lr"] == cfg.optim.lr
    assert filled["bf16"]["enabled"] is False and filled["zero_optimization"]["stage"] == 2


def test_a_deepspeed_checkpoint_writer_is_refused(tmp_path):
    """A decoupled (asynchronous) writer could leave files incomplete when the manifest and
    ``latest`` are written."""
    cfg = load_train_config(RECIPE, ["data.i2t=[x]", "data.t2i=[x]"])
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"checkpoint": {"writer": {"type": "fast", "decoupled": True}}}))
    cfg.deepspeed = str(ds)
    with pytest.raises(ConfigError, match=r"ds\.json: checkpoint\.writer is set; the trainer"):
        deepspeed_config(cfg, world_size=2)


@pytest.mark.parametrize(
    "recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))
)
def test_every_recipe_loads_and_validates(recipe):
    cfg = load_train_config(recipe, [])
    assert cfg.steps > 0 and cfg.model.family in ("showo2", "harmon", "openuni")
    deepspeed_config(cfg, world_size=16)
