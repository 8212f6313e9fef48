"""``python -m pipeline.preflight``: what a job checks before it takes GPUs, one line per
failure."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.preflight import EXIT_FAILED, PreflightError, main, preflight
from train_helpers import ROOT, make_workspace

RECIPE = "configs/tiny_showo2.yaml"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("preflight"))


def base(workspace, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.i2t=[{workspace['shards']}]",
        f"data.t2i=[{workspace['shards']}]",
        f"model.tokenizer_path={workspace['tokenizer']}",
    ]


def failure(
    workspace, tmp_path, *extra: str, recipe: str = RECIPE, family: str | None = None
) -> str:
    with pytest.raises(PreflightError) as caught:
        preflight(recipe, [*base(workspace, tmp_path / "run"), *extra], family)
    return str(caught.value)


def test_a_good_setup_passes_with_one_line_and_reports_the_run_dir(
    workspace, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(ROOT)
    env_out = tmp_path / "env"
    code = main(
        [
            "--config",
            RECIPE,
            "--family",
            "showo2",
            "--env-out",
            str(env_out),
            *base(workspace, tmp_path / "run"),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.startswith("preflight: ok: ") and out.out.count("\n") == 1, out.out
    assert "showo2/tiny random init" in out.out and "starts fresh" in out.out
    assert env_out.read_text() == f"run_dir={(tmp_path / 'run').resolve()}\n"
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())  # probe removed


def test_the_cli_prints_one_line_and_exits_78(workspace, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.preflight",
            "--config",
            RECIPE,
            *base(workspace, tmp_path / "run"),
            "optim.lrr=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_FAILED
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("preflight: FAILED: "), (
        result.stderr
    )
    assert "optim.lrr: unknown key" in result.stderr and "did you mean 'optim.lr'" in result.stderr


def test_bad_recipe_keys_and_values(workspace, tmp_path):
    assert "optim.lrr: unknown key" in failure(workspace, tmp_path, "optim.lrr=1")
    assert "steps" in failure(workspace, tmp_path, "steps=0")
    assert "preset" in failure(workspace, tmp_path, "model.preset=huge")
    assert "cannot read config file" in failure(workspace, tmp_path, recipe="configs/nope.yaml")
    assert "cannot read DeepSpeed config" in failure(
        workspace, tmp_path, "deepspeed=ds_configs/nope.json"
    )


def test_the_recipe_must_match_the_job_family(workspace, tmp_path):
    message = failure(workspace, tmp_path, family="harmon")
    assert "model.family is 'showo2', but this job runs 'harmon'" in message


def test_missing_datasets_manifests_and_shards(workspace, tmp_path):
    assert "does not exist" in failure(workspace, tmp_path, f"data.i2t=[{tmp_path / 'nowhere'}]")
    (tmp_path / "empty").mkdir()
    assert "no manifest" in failure(workspace, tmp_path, f"data.t2i=[{tmp_path / 'empty'}]")
    broken = tmp_path / "broken"
    shutil.copytree(workspace["shards"], broken)
    (broken / "shard-000002.tar").unlink()
    assert "shard-000002.tar: listed in" in failure(workspace, tmp_path, f"data.i2t=[{broken}]")


def test_a_global_batch_the_ranks_cannot_split(workspace, tmp_path, monkeypatch):
    """The tiny recipe's micro-batch is 2 + 2: 24 samples per step split over 3 ranks (x 2
    micro-steps) but not over 4."""
    monkeypatch.setenv("SLURM_NTASKS", "4")
    line = failure(workspace, tmp_path, "data.global_batch=24")
    assert "data.global_batch: 24 is not a multiple of the micro-batch (4) x 4 ranks" in line
    monkeypatch.setenv("SLURM_NTASKS", "3")
    summary, _ = preflight(
        RECIPE, [*base(workspace, tmp_path / "run"), "data.global_batch=24"], None
    )
    assert "3 rank(s)" in summary, summary


def test_an_unwritable_run_dir(workspace, tmp_path):
    (tmp_path / "a_file").write_text("")  # tests may run as root, which can write anywhere else
    assert "is not writable" in failure(
        workspace, tmp_path, f"run_dir={tmp_path / 'a_file' / 'run'}"
    )


def test_model_paths(workspace, tmp_path):
    assert "model.path" in failure(workspace, tmp_path, f"model.path={tmp_path / 'nope'}")
    assert "model.vae_path" in failure(
        workspace, tmp_path, f"model.vae_path={tmp_path / 'nope.pth'}"
    )
    assert "no tokenizer.json" in failure(workspace, tmp_path, f"model.tokenizer_path={tmp_path}")
    assert "no tokenizer" in failure(workspace, tmp_path, "model.tokenizer_path=null")
    # A Show-o2 checkpoint directory needs config.json, weights and a VAE.
    ckpt = tmp_path / "show-o2"
    ckpt.mkdir()
    assert "config.json does not exist" in failure(workspace, tmp_path, f"model.path={ckpt}")
    (ckpt / "config.json").write_text("{}")
    assert "no weights in" in failure(workspace, tmp_path, f"model.path={ckpt}")
    (ckpt / "model.safetensors").write_bytes(b"")
    assert "vae" in failure(workspace, tmp_path, f"model.path={ckpt}")
    (tmp_path / "Wan2.1_VAE.pth").write_bytes(b"")
    summary, _ = preflight(
        RECIPE,
        [
            *base(workspace, tmp_path / "run"),
            f"model.path={ckpt}",
            f"model.vae_path={tmp_path / 'Wan2.1_VAE.pth'}",
        ],
    )
    assert f"showo2 from {ckpt}" in summary


def test_openuni_assembly_paths(workspace, tmp_path):
    """A released OpenUni .pth needs the InternVL3 and SANA directories next to it."""
    pth, internvl, vae = (
        tmp_path / "openuni_l_512.pth",
        tmp_path / "InternVL3-2B",
        tmp_path / "dc-ae",
    )
    pth.write_bytes(b"")
    internvl.mkdir()
    vae.mkdir()
    message = failure(
        workspace,
        tmp_path,
        f"model.path={pth}",
        f"model.vae_path={vae}",
        f"model.options={{internvl_path: {internvl}, sana_path: null}}",
        recipe="configs/openuni_l_512.yaml",
    )
    assert message.startswith("model: ") and "sana_path" in message
    message = failure(
        workspace,
        tmp_path,
        f"model.path={pth}",
        f"model.vae_path={vae}",
        f"model.options={{internvl_path: {internvl}, sana_path: {tmp_path / 'nope'}}}",
        recipe="configs/openuni_l_512.yaml",
    )
    assert "model.options.sana_path" in message and "does not exist" in message


def test_resume_paths(workspace, tmp_path):
    assert "resume=" in failure(workspace, tmp_path, f"resume={tmp_path / 'nothing'}")
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004")
    assert "trainer_state.json is missing" in failure(workspace, tmp_path)
    state = {
        "step": 4,
        "world_size": 2,
        "grad_accum": 1,
        "loader": {"global_batch": {"i2t": 4, "t2i": 4}},
    }
    (run / "checkpoints" / "step_00000004" / "trainer_state.json").write_text(json.dumps(state))
    summary, _ = preflight(RECIPE, base(workspace, run))
    assert (
        f"resumes from {run / 'checkpoints' / 'step_00000004'}; ranks 2 -> 1, "
        "gradient accumulation 1 -> 2" in summary
    )
    state["loader"]["global_batch"] = {"i2t": 5, "t2i": 5}  # micro-batches of 2 cannot make 5
    (run / "checkpoints" / "step_00000004" / "trainer_state.json").write_text(json.dumps(state))
    line = failure(workspace, tmp_path)
    assert "global batch of 5 i2t + 5 t2i per step" in line
    assert "allow_global_batch_change=true" in line
    summary, _ = preflight(RECIPE, [*base(workspace, run), "allow_global_batch_change=true"])
    assert "global batch CHANGED from 5 i2t + 5 t2i to 2 i2t + 2 t2i per step" in summary
    (run / "checkpoints" / "latest").write_text("step_00000008")
    assert "names 'step_00000008'" in failure(workspace, tmp_path)


@pytest.mark.parametrize("family", ["harmon", "openuni"])
def test_every_tiny_recipe_passes(workspace, tmp_path, family):
    summary, _ = preflight(f"configs/tiny_{family}.yaml", base(workspace, tmp_path / "run"), family)
    assert f"{family}/tiny random init" in summary


def test_unexpected_errors_are_one_line_too(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    # Every check passes, then --env-out cannot be written: still one line and exit 78.
    code = main(
        [
            "--config",
            RECIPE,
            "--env-out",
            str(tmp_path / "missing" / "env"),
            *base(workspace, tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_FAILED and err.startswith(
        "preflight: FAILED: unexpected FileNotFoundError"
    ), err
    assert err.count("\n") == 1, err
