"""GPU check at real size: one bf16 training step of Show-o2 1.5B, Harmon 0.5B and OpenUni-B,
measured on one GPU against what the planner (:mod:`pipeline.plan`) predicts for it.

Each model is its recipe (``configs/showo2_1.5b.yaml``, ``configs/harmon_0.5b.yaml``,
``configs/openuni_b_512.yaml``: preset, ``model.options``, ``data.micro_batch_i2t/t2i``,
``infotok``, AdamW settings) with random weights (``plan.planning_config``: no weight paths, the
package's tiny BPE as tokenizer; the presets keep the released vocabulary, so the embedding is
real-size), built on the GPU and trained there in plain PyTorch (no DeepSpeed): a step is
forward + backward + AdamW (bf16 weights, gradients and moments; fused), with
``cudnn.benchmark`` on as in training and no cross-GPU InfoTok negatives. The batch is the
planner's ``plan.longest_batch``: the recipe's micro-batch with every text at its maximum length
and every image at the preset's size, so the GPU and the planner see the same batch. For InfoTok
``off`` and ``csa`` (the same adapter, a fresh regularizer and optimizer per mode) it reports:

- ``predicted_gib``: the planner's peak for this single-GPU step, computed first, on the host CPU
  with fake tensors (``plan.profile_step`` of ``plan.build_on_meta``: ``plan_s`` seconds): its
  activation peak (``predicted_activation_gib``) plus this script's own model states, not
  ZeRO-2's: weights of every parameter, gradients of the trained ones and AdamW's two moments in
  the parameter dtype (bf16: 2 x all + 2 x trained + 4 x trained bytes; fp32 in ``--smoke``).
- ``peak_gib``: ``torch.cuda.max_memory_allocated`` over the timed steps; ``peak_vs_predicted``:
  their ratio; ``peak_reserved_gib``: the caching allocator's reserve.
- ``step_s``: median wall time of the timed steps after the warm-up, ``torch.cuda.synchronize``
  before and after each; ``samples_per_s``: I2T + T2I samples of the micro-batch / ``step_s``.
- ``flops``: FLOPs of one further, untimed step counted by ``torch.utils.flop_counter``
  (forward + backward, the frozen VAE's encode included, not the optimizer's element-wise work);
  grouped-query attention (OpenUni's LLM) runs there with keys and values repeated per query
  head, because the counter's formulas for the GPU's fused kernels reject grouped shapes;
  ``planned_flops``: the planner's count of the same step; ``flops_vs_planned``: their ratio.
- ``tflops_per_s`` = ``flops / step_s``; ``mfu``: that against the GPU's dense bf16 peak
  (``plan.peak_bf16_tflops``; null for a GPU it does not know).
- ``sdpa``: the enabled SDPA backends (``torch.backends.cuda.*_sdp_enabled``) and, for each
  distinct ``scaled_dot_product_attention`` call of the counted step (shapes, mask, causal,
  dropout; the costliest first), the backend torch picks for it and which backends run it
  alone (``torch.nn.attention.sdpa_kernel``, forward + backward) or why not.
- ``syncs_per_step``: host syncs of one more step, the warnings that
  ``torch.cuda.set_sync_debug_mode("warn")`` raises; ``sync_sites``: the source lines they come
  from.
- ``tokens_per_step``, ``loss``, ``trainable_params``, ``frozen_params``.

A failure (e.g. out of memory) is reported in its entry's ``error``; the planner's figures
survive a failed step and the other entries still run. Output: a markdown table on stdout,
``results.json`` and ``results.md`` in ``--out``; exit status 1 when an entry failed.

    python bench/gpu_check.py [--out DIR] [--models showo2,harmon,openuni] [--steps 5]
        [--warmup 2] [--smoke]

Through ``bench/gpu_check.sh`` (which picks the interpreter and installs carried wheels) on a
lent GPU, e.g. the session tool ``run`` with ``bash bench/gpu_check.sh "$OUT"``. Budget for an
8-minute slot on one H100/H200: the planner takes 50-70 s per model (both modes, on a 2-core
CPU), the GPU steps seconds per mode.

``--smoke``: the same code on CPU with the ``tiny`` presets and recipes (``configs/tiny_*.yaml``),
fp32, no warm-up, 1 timed step; the GPU-only figures (MFU, peak memory, host syncs) are null,
the planner's are not. The test suite runs it (``tests/test_gpu_check.py``,
``tests/test_bench.py``) so the check cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import plan
from pipeline.models import MLLMAdapter, build_model
from pipeline.models.common.tiny_tokenizer import make_tokenizer
from pipeline.objective import InfoTokModel, wrap_adapter
from pipeline.recipe import TrainConfig, load_train_config

CHECKED = ("configs/showo2_1.5b.yaml", "configs/harmon_0.5b.yaml", "configs/openuni_b_512.yaml")
RECIPES = {  # model family -> (the released-size recipe, its tiny CPU counterpart)
    family: (recipe, f"configs/tiny_{family}.yaml")
    for recipe in CHECKED
    for family in [load_train_config(ROOT / recipe).model.family]
}
MODES = ("off", "csa")
BACKENDS = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.MATH,
)
SDPA_OPTIONAL_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
PROBED_CALLS = 4
GIB = 2**30


def to_device(obj: Any, dev: torch.device) -> Any:
    """``obj`` with every tensor (also inside dicts and lists) on ``dev``."""
    if isinstance(obj, Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return {k: to_device(v, dev) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, dev) for v in obj]
    return obj


def synchronize(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def recorded_sdpa() -> Iterator[dict[tuple, dict[str, Any]]]:
    """Records every ``F.scaled_dot_product_attention`` call while open: its signature (shapes,
    strides, dtypes, mask, keyword arguments) -> the layout of its first call (and its mask) and a
    count. A grouped-query call runs with its keys and values repeated per query head (the same
    products), which ``FlopCounterMode`` can count on the GPU."""
    calls: dict[tuple, dict[str, Any]] = {}
    original = F.scaled_dot_product_attention

    def recorder(query: Tensor, key: Tensor, value: Tensor, *rest: Any, **kw: Any) -> Tensor:
        kw.update(zip(SDPA_OPTIONAL_ARGS, rest))
        attn_mask = kw.pop("attn_mask", None)
        qkv = tuple((t.shape, t.stride(), t.dtype) for t in (query, key, value))
        mask = None if attn_mask is None else (attn_mask.shape, attn_mask.stride(), attn_mask.dtype)
        signature = (qkv, mask, tuple(sorted(kw.items())))
        if signature not in calls:
            mask_ref = None if attn_mask is None else attn_mask.detach()
            calls[signature] = {"qkv": qkv, "attn_mask": mask_ref, "kwargs": kw, "count": 0}
        calls[signature]["count"] += 1
        if kw.get("enable_gqa") and key.shape[-3] != query.shape[-3]:
            groups = query.shape[-3] // key.shape[-3]
            key, value = (t.repeat_interleave(groups, dim=-3) for t in (key, value))
            kw = {**kw, "enable_gqa": False}
        return original(query, key, value, attn_mask=attn_mask, **kw)

    F.scaled_dot_product_attention = recorder
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


def sdpa_cost(call: dict[str, Any]) -> int:
    """Score-matrix elements times head width: batch x heads x queries x keys x dim."""
    (q_shape, _, _), (k_shape, _, _), _ = call["qkv"]
    return math.prod(q_shape[:-1]) * k_shape[-2] * q_shape[-1]


def fresh_qkv(call: dict[str, Any], dev: torch.device) -> list[Tensor]:
    """Random query, key and value on ``dev`` with the recorded shapes, strides and dtypes."""
    return [
        torch.empty_strided(shape, stride, dtype=dtype, device=dev).normal_().requires_grad_()
        for shape, stride, dtype in call["qkv"]
    ]


def run_backend(call: dict[str, Any], dev: torch.device, backend: SDPBackend) -> None:
    """Forward + backward of ``call`` on fresh tensors, with ``backend`` alone."""
    mask = None if call["attn_mask"] is None else call["attn_mask"].to(dev)
    with sdpa_kernel([backend]):
        F.scaled_dot_product_attention(
            *fresh_qkv(call, dev), attn_mask=mask, **call["kwargs"]
        ).sum().backward()


def probe_sdpa(calls: dict[tuple, dict[str, Any]], dev: torch.device) -> dict[str, Any]:
    """The enabled backends, then per recorded call (costliest first) the backend torch picks and
    whether each backend runs it alone (or the first reason it gives for not)."""
    enabled = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        "math": torch.backends.cuda.math_sdp_enabled(),
    }
    probed = []
    for call in sorted(calls.values(), key=sdpa_cost, reverse=True)[:PROBED_CALLS]:
        q, k, v = fresh_qkv(call, dev)
        kw = call["kwargs"]
        mask = None if call["attn_mask"] is None else call["attn_mask"].to(dev)
        choice = torch._fused_sdp_choice(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=kw.get("dropout_p", 0.0),
            is_causal=kw.get("is_causal", False),
            scale=kw.get("scale"),
            enable_gqa=kw.get("enable_gqa", False),
        )
        works, errors = [], {}
        for backend in BACKENDS:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    run_backend(call, dev, backend)
                    works.append(backend.name)
                except RuntimeError as error:
                    reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught]
                    errors[backend.name] = " ".join(reasons or [str(error)])[:300]
        probed.append(
            {
                "q": list(q.shape),
                "k": list(k.shape),
                "dtype": str(q.dtype).removeprefix("torch."),
                "mask": None
                if mask is None
                else [*mask.shape, str(mask.dtype).removeprefix("torch.")],
                "kwargs": {name: value for name, value in kw.items() if value is not None},
                "calls_per_step": call["count"],
                "picked": SDPBackend(choice).name,
                "works": works,
                "errors": errors,
            }
        )
    return {"enabled": enabled, "calls": probed}


def count_syncs(step: Callable[[], Any], dev: torch.device) -> tuple[int, dict[str, int]]:
    """Host syncs of one ``step()``: the warnings of ``set_sync_debug_mode("warn")``, in all and
    per source line."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(dev)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    sites = Counter(f"{relative(w.filename)}:{w.lineno}" for w in syncs)
    return len(syncs), dict(sites.most_common(10))


def relative(path: str) -> str:
    """``path`` relative to the repository when inside it."""
    return str(Path(path).relative_to(ROOT)) if Path(path).is_relative_to(ROOT) else path


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def recipe_config(name: str, args: argparse.Namespace, tokenizer: Path) -> TrainConfig:
    """``name``'s recipe (the tiny one with ``--smoke``) at random init with ``tokenizer``, in the
    script's precision, without the cross-rank InfoTok negatives of a multi-GPU job."""
    cfg = plan.planning_config(load_train_config(ROOT / RECIPES[name][args.smoke]), tokenizer)
    infotok = dataclasses.replace(cfg.infotok, gather_negatives=False)
    return dataclasses.replace(cfg, precision="fp32" if args.smoke else "bf16", infotok=infotok)


def with_mode(cfg: TrainConfig, mode: str) -> TrainConfig:
    return dataclasses.replace(cfg, infotok=dataclasses.replace(cfg.infotok, mode=mode))


def predict(cfg: TrainConfig, batch: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The planner's figures for one step of ``cfg``'s model on ``batch`` (fake tensors, host
    CPU) with this script's model states (see the module docstring), not ZeRO-2's."""
    start = time.perf_counter()
    step = plan.profile_step(plan.build_on_meta(cfg), batch)
    width = dtype.itemsize
    states = width * (step.trainable + step.frozen) + 3 * width * step.trainable
    return {
        "predicted_gib": (step.activation_bytes + states) / GIB,
        "predicted_activation_gib": step.activation_bytes / GIB,
        "planned_flops": step.flops,
        "plan_s": time.perf_counter() - start,
    }


def measure(
    adapter: MLLMAdapter, cfg: TrainConfig, batch: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The GPU figures of one InfoTok mode (see the module docstring); ``batch`` is on the
    device."""
    dev = args.device
    model: InfoTokModel = wrap_adapter(
        adapter, cfg.infotok, cfg.loss_weight_i2t, cfg.loss_weight_t2i
    ).to(dev, args.dtype)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trained,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=dev.type == "cuda",
    )
    generator = torch.Generator(device=dev).manual_seed(0)

    def step() -> tuple[Tensor, int | Tensor]:
        loss, _, tokens = model(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach(), tokens

    for _ in range(args.warmup):
        step()
    synchronize(dev)
    on_gpu = dev.type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss, tokens = step()
        synchronize(dev)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(dev) / GIB if on_gpu else None
    reserved = torch.cuda.max_memory_reserved(dev) / GIB if on_gpu else None
    with FlopCounterMode(display=False) as counter, recorded_sdpa() as calls:
        step()
    syncs, sites = count_syncs(step, dev) if on_gpu else (None, None)
    step_s = statistics.median(times)
    flops = counter.get_total_flops()
    peak_tflops = plan.peak_bf16_tflops(torch.cuda.get_device_name(dev)) if on_gpu else None
    n_trained = sum(p.numel() for p in trained)
    return {
        "step_s": step_s,
        "samples_per_s": (cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i) / step_s,
        "flops": flops,
        "tflops_per_s": flops / step_s / 1e12,
        "mfu": ratio(flops / step_s / 1e12, peak_tflops),
        "peak_gib": peak,
        "peak_reserved_gib": reserved,
        "syncs_per_step": syncs,
        "sync_sites": sites,
        "tokens_per_step": int(tokens),
        "loss": loss.item(),
        "trainable_params": n_trained,
        "frozen_params": sum(p.numel() for p in model.parameters()) - n_trained,
        "sdpa": probe_sdpa(calls, dev),
    }


def check_mode(
    adapter: MLLMAdapter,
    cfg: TrainConfig,
    batch: dict[str, Any],
    device_batch: dict[str, Any],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The planner's prediction, then the measured step; a failure of either is in ``error``."""
    entry: dict[str, Any] = {}
    errors = []
    try:
        entry.update(predict(cfg, batch, args.dtype))
    except Exception as error:  # noqa: BLE001 (reported; the step is still measured)
        errors.append(f"planner: {describe(error)}")
    try:
        entry.update(measure(adapter, cfg, device_batch, args))
    except Exception as error:  # noqa: BLE001 (reported; the other entries still run)
        errors.append(f"step: {describe(error)}")
    entry["peak_vs_predicted"] = ratio(entry.get("peak_gib"), entry.get("predicted_gib"))
    entry["flops_vs_planned"] = ratio(entry.get("flops"), entry.get("planned_flops"))
    if errors:
        entry["error"] = "; ".join(errors)
    return entry


def check_model(name: str, args: argparse.Namespace, tokenizer: Path) -> list[dict[str, Any]]:
    """One entry per InfoTok mode for model ``name``."""
    cfg = recipe_config(name, args, tokenizer)
    base = {
        "model": name,
        "preset": cfg.model.preset,
        "micro_batch": [cfg.data.micro_batch_i2t, cfg.data.micro_batch_t2i],
        "dtype": str(args.dtype).removeprefix("torch."),
        "device": args.device_name,
    }
    try:
        torch.manual_seed(0)
        with args.device:  # random init on the GPU: far faster than on the host
            adapter = build_model(cfg.model).to(args.device, args.dtype)
        base["vocab_size"] = adapter.vocab_size
        off = wrap_adapter(adapter, with_mode(cfg, "off").infotok)
        batch = plan.longest_batch(off, *base["micro_batch"])
        device_batch = to_device(batch, args.device)
    except Exception as error:  # noqa: BLE001 (reported, the other models still run)
        return [{**base, "mode": mode, "error": f"build: {describe(error)}"} for mode in MODES]
    entries = []
    for mode in MODES:
        print(f"[gpu_check] {name} {mode}", file=sys.stderr, flush=True)
        entry = check_mode(adapter, with_mode(cfg, mode), batch, device_batch, args)
        entries.append({**base, "mode": mode, **entry})
        adapter.zero_grad(set_to_none=True)
        free_memory()
    return entries


def fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


COLUMNS = (  # markdown header, JSON field, format, scale
    ("tokens", "tokens_per_step", "d", 1),
    ("step s", "step_s", ".3f", 1.0),
    ("samples/s", "samples_per_s", ".1f", 1.0),
    ("TFLOP/step", "flops", ".3g", 1e-12),
    ("planned TFLOP", "planned_flops", ".3g", 1e-12),
    ("FLOPs/planned", "flops_vs_planned", ".3f", 1.0),
    ("TFLOP/s", "tflops_per_s", ".1f", 1.0),
    ("MFU", "mfu", ".1%", 1.0),
    ("peak GiB", "peak_gib", ".2f", 1.0),
    ("predicted GiB", "predicted_gib", ".2f", 1.0),
    ("peak/predicted", "peak_vs_predicted", ".2f", 1.0),
    ("syncs/step", "syncs_per_step", "d", 1),
)


def markdown(entries: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The results table, then the SDPA calls and the host-sync sites of each entry."""
    names = ["model", "mode", "batch i2t+t2i", *(c[0] for c in COLUMNS)]
    names += ["SDPA picked (costliest call)", "plan s", "error"]
    lines = [
        (
            f"# GPU check: {args.device_name}, {str(args.dtype).removeprefix('torch.')}, "
            f"{args.warmup} warm-up + {args.steps} timed steps, torch {torch.__version__}"
        ),
        "",
        f"| {' | '.join(names)} |",
        "|---" * len(names) + "|",
    ]
    for e in entries:
        calls = e.get("sdpa", {}).get("calls")
        error = e.get("error", "").replace("|", "/").replace("\n", " ")[:160]
        cells = [
            f"{e['model']} {e['preset']}",
            e["mode"],
            "+".join(map(str, e["micro_batch"])),
            *(fmt(e.get(key), spec, scale) for _, key, spec, scale in COLUMNS),
            calls[0]["picked"] if calls else "-",
            fmt(e.get("plan_s"), ".0f"),
            error,
        ]
        lines.append(f"| {' | '.join(cells)} |")
    enabled = next((e["sdpa"]["enabled"] for e in entries if "sdpa" in e), None)
    lines += [
        "",
        "## SDPA calls (costliest first): picked backend, backends that run alone",
        "",
        f"Enabled backends: {enabled}",
        "",
    ]
    for e in entries:
        for call in e.get("sdpa", {}).get("calls", []):
            lines.append(
                f"- {e['model']} {e['mode']}: q {call['q']} k {call['k']} mask {call['mask']} "
                f"{call['kwargs']} x{call['calls_per_step']}: picked {call['picked']}, "
                f"works {call['works']}; "
                + "; ".join(f"not {name}: {why[:80]}" for name, why in call["errors"].items())
            )
    syncs = [e for e in entries if e.get("sync_sites")]
    if syncs:
        lines += ["", "## Host-sync sites (count per step)", ""]
        lines += [f"- {e['model']} {e['mode']}: {e['sync_sites']}" for e in syncs]
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check")
    parser.add_argument("--models", default=",".join(RECIPES), help="comma-separated subset")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny presets, fp32, 1 step: checks the script"
    )
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(RECIPES)
    if unknown:
        parser.error(f"unknown model(s) {sorted(unknown)}; choose from {sorted(RECIPES)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args.smoke:
        args.steps, args.warmup = 1, 0
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --smoke")
    args.device = torch.device("cpu" if args.smoke else "cuda")
    args.dtype = torch.float32 if args.smoke else torch.bfloat16
    args.device_name = "cpu" if args.smoke else torch.cuda.get_device_name(args.device)
    return args


def main() -> None:
    args = parse_args()
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as pipeline.train: the VAE's fixed-shape convs
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp) / "tokenizer")
        for name in args.models.split(","):
            entries += check_model(name, args, tokenizer)
            free_memory()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(entries, indent=2) + "\n")
    table = markdown(entries, args)
    (args.out / "results.md").write_text(table)
    print(table)
    sys.exit(1 if any("error" in e for e in entries) else 0)


if __name__ == "__main__":
    main()
