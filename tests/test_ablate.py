"""``python -m experiments.ablate`` on a minimal budget: the table, the plots, and the cached original."""

from __future__ import annotations

import json
import re

import pytest

from pathlib import Path

import torch
from safetensors.torch import load_file

from experiments import ablate
from experiments.ablate import (
    _modes,
    cache_key,
    foreground,
    main,
    pretrain_vae,
    random_crops,
    synth_corpus,
    table,
)
from pipeline.models import build_model
from pipeline.recipe import load_train_config

ARGS = [
    "--config",
    "configs/tiny_showo2.yaml",
    "--steps",
    "2",
    "--pretrain-steps",
    "2",
    "--pretrain-batch-i2t",
    "2",
    "--pretrain-batch-t2i",
    "3",
    "--vae-steps",
    "2",
    "--samples",
    "48",
    "--heldout-samples",
    "24",
    "--eval-samples",
    "4",
    "--eval-batches",
    "2",
    "--bootstrap",
    "10",
    "--recon-steps",
    "3",
    "--recon-train",
    "8",
    "--recon-test",
    "4",
]


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    work = tmp_path_factory.mktemp("ablate")
    main([*ARGS, "--workdir", str(work)])
    return work


def test_ablation_writes_the_table_with_deltas_and_the_plots(ablation):
    text = (ablation / "ablation.md").read_text()
    rows = [
        line
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| model")
    ]
    assert [r.split("|")[1].strip() for r in rows] == [
        "original",
        "Finetune (off)",
        "C&S (cs)",
        "C&S&A (csa)",
    ]
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    for column in (
        "loss_i2t",
        "loss_t2i",
        "rate z_u",
        "CKA",
        "understanding",
        "generation",
        "recon. PSNR",
    ):
        assert column in header
    # every fine-tuned row carries deltas; the rate exists only where InfoTok heads were trained
    assert all(re.search(r"\([+-]\d", r) for r in rows[1:]) and "(" not in rows[0].split("|", 2)[2]
    assert rows[1].split("|")[4].strip() == "n/a" and rows[2].split("|")[4].strip() != "n/a"
    for name in ("ablation_metrics.png", "ablation_curves.png"):
        assert (ablation / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name})" in text
    data = json.loads((ablation / "ablation.json").read_text())
    assert set(data["rows"]) == {"original", "off", "cs", "csa"} and data["modes"] == [
        "off",
        "cs",
        "csa",
    ]
    assert data["rows"]["csa"]["model"]["infotok_mode"] == "csa"
    assert data["pretrained"]["vae"]["steps"] == 2
    assert (
        data["pretrained"]["batch"] == {"i2t": 2, "t2i": 3}
        and "2 I2T + 3 T2I samples per rank" in text
    )
    # every fine-tuning started from the same exported original and saw the same first batch
    first = [
        json.loads((ablation / "finetune" / m / "metrics.jsonl").read_text().splitlines()[0])[
            "loss_i2t"
        ]
        for m in ("off", "cs", "csa")
    ]
    assert first[0] == first[1] == first[2]


def test_a_second_ablation_reuses_the_cached_original_and_repeats_the_figures(ablation, capsys):
    (done,) = (ablation / "pretrain").glob("*/DONE.json")
    before = done.stat().st_mtime_ns
    first = json.loads((ablation / "ablation.json").read_text())["rows"]
    main([*ARGS, "--workdir", str(ablation), "--modes", "off"])
    assert "original model: cached" in capsys.readouterr().out
    assert done.stat().st_mtime_ns == before
    again = json.loads((ablation / "ablation.json").read_text())["rows"]
    assert set(again) == {"original", "off"}
    for name in again:  # fine-tuning and evaluation are deterministic: every figure repeats exactly
        for key in ("heldout", "cka", "benchmark", "reconstruction"):
            assert again[name][key] == first[name][key], (name, key)


def test_a_fresh_ablation_repeats_every_figure_bit_for_bit(ablation, tmp_path):
    """From scratch in another directory (new data, VAE, pretraining and fine-tuning): the same numbers."""
    first = json.loads((ablation / "ablation.json").read_text())
    main([*ARGS, "--workdir", str(tmp_path / "again"), "--modes", "off"])
    again = json.loads((tmp_path / "again" / "ablation.json").read_text())
    assert again["pretrained"]["vae"] == first["pretrained"]["vae"]  # PSNR, SSIM, detector accuracy
    for name in ("original", "off"):
        for key in ("heldout", "cka", "benchmark", "reconstruction"):
            assert again["rows"][name][key] == first["rows"][name][key], (name, key)


def test_foreground_marks_the_pixels_off_the_scene_background():
    white = torch.ones(1, 3, 2, 2)
    x = white.clone()
    x[0, :, 0, 1] = torch.tensor([0.73, -0.70, -0.70])  # the corpus's red
    x[0, :, 1, 0] = 0.97  # within the tolerance of white
    assert foreground(x)[0, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]
    assert foreground(white[:, :, None]).shape == (1, 1, 1, 2, 2)


def test_random_crops_are_half_side_windows_on_the_quarter_side_lattice():
    side = 64
    images = torch.arange(5 * 3 * side * side, dtype=torch.float32).reshape(5, 3, side, side)
    crops = random_crops(images, torch.Generator().manual_seed(0))
    assert crops.shape == (5, 3, 32, 32)
    seen = set()
    for image, crop in zip(images, crops):
        # the value at the crop's corner tells where it was cut: image[c, y, x] = c·S² + y·S + x (+ offset)
        first = int(crop[0, 0, 0] - image[0, 0, 0])
        y, x = divmod(first, side)
        assert y % 16 == 0 and x % 16 == 0 and y <= 32 and x <= 32
        assert torch.equal(crop, image[:, y : y + 32, x : x + 32])
        seen.add((y, x))
    assert len(seen) > 1, "every image was cut at the same place"
    again = random_crops(images, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)


def test_the_cache_key_changes_with_any_part_and_with_the_package_source(tmp_path, monkeypatch):
    """A preset edited in the package must not reuse an original trained with the old one."""
    package = tmp_path / "package"
    (package / "models").mkdir(parents=True)
    preset = package / "models" / "presets.py"
    preset.write_text("WIDTH = 64\n")
    monkeypatch.setattr(ablate, "SOURCE_DIRS", (package,))
    key = cache_key(steps=10, seed=0)
    assert cache_key(steps=10, seed=0) == key
    assert cache_key(steps=11, seed=0) != key
    preset.write_text("WIDTH = 128\n")
    assert cache_key(steps=10, seed=0) != key


def test_the_synthetic_corpus_is_reused_only_for_the_same_arguments(tmp_path):
    shards = synth_corpus(tmp_path / "data", 8, 0, "grid")
    manifest = shards / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert (
        synth_corpus(tmp_path / "data", 8, 0, "grid") == shards
        and manifest.stat().st_mtime_ns == before
    )
    grid = manifest.read_text()
    synth_corpus(tmp_path / "data", 8, 0, "free")
    assert manifest.stat().st_mtime_ns != before and manifest.read_text() != grid
    assert json.loads((tmp_path / "data" / "corpus.json").read_text())["layout"] == "free"


def test_table_deltas_and_modes_parsing():
    rows = {
        "original": {"heldout": {"losses": {"loss_i2t": 2.0}}},
        "cs": {"heldout": {"losses": {"loss_i2t": 1.5}}, "rate": {"u": {"nats_per_token": 0.5}}},
    }
    text = table(rows)
    assert (
        "| C&S (cs) | 1.5000 (-0.5000) | 0.5000 |" in text and "| original | 2.0000 | n/a |" in text
    )
    accuracy = {"benchmark": {"generation": {"overall": {"accuracy": 0.25, "n": 8, "se": 0.0625}}}}
    text = table(
        {"original": accuracy, "off": {"benchmark": {"generation": {"overall": {"accuracy": 0.5}}}}}
    )
    assert (
        "| original | 0.2500 ± 0.062 |" in text and "| Finetune (off) | 0.5000 (+0.2500) |" in text
    )
    assert _modes("off, csa") == ["off", "csa"]
    for bad in ("off,xx", "off,off", ""):
        with pytest.raises(Exception, match="subset of off, cs, csa"):
            _modes(bad)


@pytest.mark.parametrize("family", ["harmon", "openuni"])
def test_the_autoencoder_of_every_family_pretrains_and_loads_back(family, tmp_path, tokenizer_dir):
    data = str(synth_corpus(tmp_path / "data", 24, 0, "grid"))
    overrides = [
        f"data.i2t=[{data}]",
        f"data.t2i=[{data}]",
        f"model.tokenizer_path={tokenizer_dir}",
    ]
    recipe = Path(f"configs/tiny_{family}.yaml")
    options, quality = pretrain_vae(
        recipe, overrides, [data], [data], 2, 0, tmp_path / "vae", batch_size=4
    )
    assert (
        quality["steps"] == 2
        and quality["train_images"] == 24
        and 0 <= quality["detector_accuracy"] <= 1
    )
    assert options["vae"]["scaling_factor"] > 0
    model = build_model(
        load_train_config(
            recipe,
            [
                *overrides,
                f"model.vae_path={tmp_path / 'vae'}",
                f"model.options={json.dumps(options)}",
            ],
        ).model
    )
    assert model.config.vae.scaling_factor == options["vae"]["scaling_factor"]
    trained = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(model.vae.state_dict()[k], v) for k, v in trained.items())


def test_a_pretraining_override_reaches_the_pretraining_alone(ablation, capsys):
    override = "model.options={trainable: [flow_head]}"
    main([*ARGS, "--workdir", str(ablation), "--modes", "off", "--pretrain-override", override])
    assert (
        "original model: cached VAE" in capsys.readouterr().out
    )  # the autoencoder does not depend on it
    data = json.loads((ablation / "ablation.json").read_text())
    assert (
        data["pretrained"]["overrides"] == [override]
        and f"`{override}`" in (ablation / "ablation.md").read_text()
    )
    pretrained = load_train_config(
        ablation / "pretrain" / data["pretrained"]["key"] / "run" / "config.yaml"
    )
    options = pretrained.model.options
    assert (
        options["trainable"] == ["flow_head"] and options["vae"]["latents_mean"]
    )  # merged with the VAE's options
    finetuned = load_train_config(ablation / "finetune" / "off" / "config.yaml")
    assert "trainable" not in finetuned.model.options
    # the pretraining batch flags set each stream; the fine-tunings keep the recipe's batch
    assert (pretrained.data.micro_batch_i2t, pretrained.data.micro_batch_t2i) == (2, 3)
    assert (finetuned.data.micro_batch_i2t, finetuned.data.micro_batch_t2i) == (2, 2)
