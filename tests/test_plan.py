"""``python -m pipeline.plan``: memory and FLOPs of a recipe's micro-step on fake tensors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from train_helpers import ROOT

from pipeline import plan
from pipeline.objective import build_objective
from pipeline.recipe import load_train_config

FAMILIES = ("showo2", "harmon", "openuni")
OVERSIZED = ["data.micro_batch_t2i=512"]


def tiny_recipe(family: str, tokenizer_dir) -> object:
    cfg = load_train_config(ROOT / f"configs/tiny_{family}.yaml")
    return replace(cfg, model=replace(cfg.model, tokenizer_path=str(tokenizer_dir)))


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.plan", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def test_model_states_are_zero2s_2_plus_2_plus_12_over_n_bytes_per_parameter():
    """ZeRO (Rajbhandari et al. 2020, Sec. 5): mixed-precision Adam holds 2 bytes of bf16 weights
    and 2 of gradients per parameter plus K = 12 of optimizer state (fp32 master, two moments);
    stage 2 partitions the last two over the N data-parallel ranks."""
    trained, frozen, ranks = 1_000_003, 250_000, 16
    ds = {"zero_optimization": {"reduce_bucket_size": 1000, "allgather_bucket_size": 3000}}
    states = plan.zero2_states(trained, frozen, ranks, "bf16", ds)
    per_rank = math.ceil(trained / ranks)
    assert states.weights == 2 * (trained + frozen)
    assert states.gradients == 2 * per_rank
    assert states.master + states.moments == 12 * per_rank
    assert states.buckets == 2 * 1000
    overlapped = {"zero_optimization": {**ds["zero_optimization"], "overlap_comm": True}}
    assert plan.zero2_states(trained, frozen, ranks, "bf16", overlapped).buckets == 2 * 2 * 1000
    offloaded = {"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}
    on_cpu = plan.zero2_states(trained, frozen, ranks, "bf16", offloaded)
    assert on_cpu.master == on_cpu.moments == on_cpu.gradients == 0
    assert plan.zero2_states(trained, frozen, ranks, "fp32", ds).weights == 4 * (trained + frozen)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fake_step_measures_what_real_tensors_measure(family, tokenizer_dir):
    """The planner's activation peak (meta-built model, fake tensors) is within 10% of the peak
    torch's tracker measures for the same step with real tensors; FLOPs and counts agree."""
    cfg = tiny_recipe(family, tokenizer_dir)
    torch.manual_seed(0)
    real = build_objective(cfg.model, cfg.infotok).train()
    batch = plan.longest_batch(real, cfg.data.micro_batch_i2t, cfg.data.micro_batch_t2i)
    measured = plan.profile_step(real, batch, fake=False)
    planned = plan.profile_step(plan.build_on_meta(cfg), batch)
    assert measured.activation_bytes > 0
    assert planned.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.10)
    assert planned.flops == pytest.approx(measured.flops, rel=0.01)
    assert sum(planned.flops_by_part.values()) == planned.flops
    assert planned.flops_by_part["llm"] > 0 and planned.flops_by_part["shared visual encoder"] > 0
    n_trained = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert (planned.trainable, planned.frozen) == (
        n_trained,
        sum(p.numel() for p in real.parameters()) - n_trained,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_the_latent_cache_saving_is_the_frozen_autoencoders_share_of_the_flops(
    family, tokenizer_dir
):
    """The planned saving is the vae part's FLOPs over the total, and that part is what the cache
    holds: one encode of every image of the family's latent tasks (FLOPs of ``vae_posterior``)."""
    cfg = tiny_recipe(family, tokenizer_dir)
    planned = plan.plan_recipe(cfg, 1, plan.DEVICES["h100"], "tiny", tokenizer_dir)
    vae = planned.flops_by_part["vae"]
    assert planned.latent_cache_saving == vae / planned.flops_per_sample
    assert 0 < planned.latent_cache_saving < 1
    assert planned.latent_cache_speedup == pytest.approx(
        planned.flops_per_sample / (planned.flops_per_sample - vae)
    )
    torch.manual_seed(0)
    adapter = build_objective(cfg.model, cfg.infotok).adapter
    task = adapter.LATENT_TASKS[0]
    sample = next(
        s for s in plan.longest_samples(1, 1, adapter.config.image_size) if s["task"] == task
    )
    with FlopCounterMode(display=False) as one_image, torch.no_grad():
        adapter.vae_posterior(adapter.processor.vae_input(sample)[None])
    micro = {"i2t": cfg.data.micro_batch_i2t, "t2i": cfg.data.micro_batch_t2i}
    images = sum(micro[t] for t in adapter.LATENT_TASKS)
    assert vae == one_image.get_total_flops() * images / sum(micro.values())
    line = (
        f"a latent cache (python -m data_prep encode) removes the vae's "
        f"{planned.latent_cache_saving:.0%} of these FLOPs: about "
        f"{planned.latent_cache_speedup:.2f}x the samples/s at the same MFU"
    )
    assert line in plan.format_plan(planned).splitlines()
    assert planned.to_json()["latent_cache_saving"] == planned.latent_cache_saving


def test_the_longest_batch_reaches_the_maximum_sequence_length(tokenizer_dir):
    cfg = tiny_recipe("showo2", tokenizer_dir)
    model = plan.build_on_meta(cfg)
    batch = plan.longest_batch(model, 2, 3)
    assert batch["input_ids"].shape == (5, model.adapter.config.max_seq_len)
    assert batch["pixel_values"].shape[-1] == model.adapter.config.image_size


def test_attention_dropout_is_switched_off_only_inside_the_block():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 16, 8).unbind(0)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with plan.attention_without_dropout():
        by_keyword = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.9)
        by_position = torch.nn.functional.scaled_dot_product_attention(q, k, v, None, 0.9)
    assert torch.equal(by_keyword, plain) and torch.equal(by_position, plain)
    dropped = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.9)
    assert not torch.equal(dropped, plain)


def test_attention_dropout_is_planned_as_the_fused_gpu_kernels_keep_it(tokenizer_dir):
    """A fused kernel redraws its dropout mask in the backward, so Harmon's MAR blocks with
    dropout plan the activations they plan without it, also when checkpointing recomputes them."""
    cfg = tiny_recipe("harmon", tokenizer_dir)
    profiles = []
    for options in ({}, {"mar": {"attn_dropout": 0.0}}, {"gradient_checkpointing": True}):
        recipe = replace(cfg, model=replace(cfg.model, options={**cfg.model.options, **options}))
        model = plan.build_on_meta(recipe)
        batch = plan.longest_batch(model, cfg.data.micro_batch_i2t, cfg.data.micro_batch_t2i)
        profiles.append(plan.profile_step(model, batch))
    dropout, no_dropout, checkpointed = profiles
    assert build_objective(cfg.model, cfg.infotok).adapter.config.mar.attn_dropout > 0
    assert dropout.activation_bytes == no_dropout.activation_bytes
    assert dropout.flops == no_dropout.flops
    assert 0 < checkpointed.activation_bytes < dropout.activation_bytes


def test_flops_per_sample_leaves_the_model_and_the_rng_untouched(tokenizer_dir):
    cfg = tiny_recipe("showo2", tokenizer_dir)
    torch.manual_seed(0)
    model = build_objective(cfg.model, cfg.infotok).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert plan.flops_per_sample(model, 2, 2) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_a_released_recipe_plans_without_memory_for_its_weights(tmp_path):
    """Show-o2 1.5B: ~3 B parameters (12 GB in fp32) planned in well under 4 GB of RSS."""
    out = tmp_path / "plan.json"
    script = (
        "import json, resource, sys\n"
        "from pipeline import plan\n"
        "code = plan.main(['--config', 'configs/showo2_1.5b.yaml', '--json'])\n"
        "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        f"open({str(out)!r}, 'w').write(json.dumps({{'code': code, 'rss': rss}}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(out.read_text())
    printed = json.loads(result.stdout)
    assert measured["code"] == plan.EXIT_FITS
    assert printed["trainable"] + printed["frozen"] > 2.9e9
    assert measured["rss"] < 4 * 2**30, measured
    assert printed["fits"] and printed["peak"] <= 0.9 * printed["capacity"]
    assert set(printed["parts"]) >= {"weights", "activations"}


def test_a_recipe_that_does_not_fit_exits_3_with_one_line(tmp_path, tokenizer_dir):
    result = run_plan(
        "--config",
        "configs/tiny_showo2.yaml",
        "--gpu-memory-gib",
        "0.5",
        f"model.tokenizer_path={tokenizer_dir}",
        *OVERSIZED,
    )
    assert result.returncode == plan.EXIT_DOES_NOT_FIT, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan: does not fit: "), result.stderr
    assert "largest part: activations" in lines[0] and "gradient_checkpointing" in lines[0]
    assert "DOES NOT FIT" in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--gpu", "v100"], "--gpu: unknown device 'v100' (known: h100, h200, a100)"),
        (["--gpus", "0"], "--gpus: must be at least 1"),
        (["model.preset=huge"], "unknown Show-o2 preset 'huge'"),
        (["deepspeed=ds_configs/missing.json"], "cannot read DeepSpeed config"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, expected):
    result = run_plan("--config", "configs/showo2_1.5b.yaml", *args)
    assert result.returncode == plan.EXIT_BAD_INPUT
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("plan: FAILED: "), result.stderr
    assert expected in lines[0], lines[0]


def test_a_gpu_count_that_does_not_give_the_json_batch_fails(tmp_path):
    ds = json.loads((ROOT / "ds_configs/zero2.json").read_text())
    ds["train_batch_size"] = 128  # 16 GPUs x (4 + 4); 12 GPUs cannot give it
    path = tmp_path / "fixed_batch.json"
    path.write_text(json.dumps(ds))
    # Without the recipe's data.global_batch (which refuses 12 GPUs first, tested below), the
    # accumulation is the recipe's grad_accum and only the JSON's fixed batch is in the way.
    result = run_plan(
        "--config",
        "configs/showo2_1.5b.yaml",
        "--gpus",
        "12",
        "data.global_batch=null",
        f"deepspeed={path}",
    )
    assert result.returncode == plan.EXIT_BAD_INPUT
    assert "train_batch_size is 128 but the recipe gives 96" in result.stderr


def test_a_gpu_count_that_cannot_split_the_recipes_global_batch_fails():
    result = run_plan("--config", "configs/showo2_1.5b.yaml", "--gpus", "12")
    assert result.returncode == plan.EXIT_BAD_INPUT
    assert "data.global_batch: 128 is not a multiple of the micro-batch (8) x 12 ranks" in (
        result.stderr
    )


def test_a_device_name_gives_its_bf16_peak():
    assert plan.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert plan.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert plan.peak_bf16_tflops("Tesla T4") is None


def test_a_run_reading_a_latent_cache_counts_no_vae_flops_for_its_mfu(tokenizer_dir):
    """The trainer's FLOPs per sample (its MFU) leave out exactly one encode of every image of the
    latent tasks when the run reads a cache."""
    cfg = tiny_recipe("harmon", tokenizer_dir)
    torch.manual_seed(0)
    model = build_objective(cfg.model, cfg.infotok)
    n_i2t, n_t2i = cfg.data.micro_batch_i2t, cfg.data.micro_batch_t2i
    fly = plan.flops_per_sample(model, n_i2t, n_t2i)
    cached = plan.flops_per_sample(model, n_i2t, n_t2i, cached_latents=True)
    size = model.adapter.config.image_size
    with FlopCounterMode(display=False) as vae, torch.no_grad():
        model.adapter.vae_posterior(torch.zeros(n_i2t + n_t2i, 3, size, size))
    assert fly - cached == pytest.approx(vae.get_total_flops() / (n_i2t + n_t2i))
