"""Will a recipe fit, and how fast can it go? Memory and FLOPs of one training micro-step at real
size, measured on a CPU with fake tensors (no weights, no GPU, no real memory for the model).

    python -m pipeline.plan --config configs/showo2_7b.yaml [--gpus 16] [--gpu h100] [--json]
        [key=value ...]

The recipe's model is built at its real size on the meta device and given fake parameters
(``torch._subclasses.fake_tensor``); one micro-step then runs for real on fake tensors: the
forward of both tasks at the recipe's micro-batch, with every text at its maximum length and every
image at the model's size, the InfoTok heads, and the backward. Torch's memory tracker
(``torch.distributed._tools.mem_tracker``) measures the activation peak of that step and
``torch.utils.flop_counter`` its FLOPs, split by part of the model. The ZeRO-2 model states per GPU
follow from the parameter counts, the data-parallel ranks and the DeepSpeed JSON (bf16 weights;
fp32 master weights, Adam moments and gradient partitions over the ranks; the reduce buckets).

Prints a table (or ``--json``) and exits 0 when the peak leaves at least 10% of the device's memory
free, 3 when it does not (one line names the largest part and what would fix it), 2 on bad input.
FLOPs are those executed (a recomputed forward under activation checkpointing counts); MFU
figures use the device's dense bf16 peak. The frozen autoencoder only encodes, in the forward: its
share of the FLOPs is what a latent cache (``python -m data_prep encode``) removes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from pipeline.objective import InfoTokModel
    from pipeline.recipe import TrainConfig

GIB = 2**30
HEADROOM = 0.10
MFU_TARGETS = (0.4, 0.5)
EXIT_FITS, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 0, 2, 3
FILLER = "a small red circle beside a tall green triangle under a wide grey sky"


@dataclass(frozen=True)
class Device:
    name: str
    memory_gib: float
    """Memory as ``torch.cuda.get_device_properties().total_memory`` reports it."""
    bf16_tflops: float
    """Dense bf16 peak (no sparsity)."""


DEVICES = {
    "h100": Device("H100 80GB", 79.6, 989.0),
    "h200": Device("H200 141GB", 139.8, 989.0),
    "a100": Device("A100 80GB", 79.2, 312.0),
}


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its CUDA name (e.g. "NVIDIA H100 80GB HBM3"), if known."""
    return next((d.bf16_tflops for k, d in DEVICES.items() if k in device_name.lower()), None)


@dataclass(frozen=True)
class StepProfile:
    """One training micro-step as measured: activation peak, FLOPs, parameter counts."""

    activation_bytes: int
    """Peak of everything the step allocates beyond parameters, buffers and parameter gradients
    (those are the model states, counted for ZeRO-2 apart)."""
    flops: int
    flops_by_part: dict[str, int]
    trainable: int
    frozen: int


@dataclass(frozen=True)
class ModelStates:
    """ZeRO-2 bytes per GPU that exist whatever the batch (DeepSpeed's stage-2 optimizer)."""

    weights: int
    """Every parameter in the training precision, on every rank."""
    master: int
    """fp32 copy of this rank's partition of the trained parameters."""
    moments: int
    """Adam's two fp32 moments of the partition."""
    gradients: int
    """This rank's gradient partition, accumulated in the training precision."""
    buckets: int
    """Reduce buckets the backward fills (two with ``overlap_comm``)."""
    step_extra: int
    """Alive only in the optimizer step: the partition's fp32 gradient and the all-gather bucket."""

    @property
    def resident(self) -> int:
        return self.weights + self.master + self.moments + self.gradients


@dataclass(frozen=True)
class Plan:
    recipe: str
    device: Device
    gpus: int
    trainable: int
    frozen: int
    states: ModelStates
    activations: int
    peak: int
    flops_per_sample: float
    flops_by_part: dict[str, float]
    """FLOPs per sample of each part of the model."""
    frozen_part: str
    """The part of ``flops_by_part`` that is the frozen autoencoder (the adapter's
    ``FROZEN_MODULE``)."""
    samples_per_step: int
    steps: int

    @property
    def capacity(self) -> int:
        return int(self.device.memory_gib * GIB)

    @property
    def fits(self) -> bool:
        return self.peak <= (1 - HEADROOM) * self.capacity

    def samples_per_s(self, mfu: float) -> float:
        """Per GPU, at ``mfu`` of the device's bf16 peak."""
        return mfu * self.device.bf16_tflops * 1e12 / self.flops_per_sample

    def run_hours(self, mfu: float) -> float:
        return self.steps * self.samples_per_step / (self.gpus * self.samples_per_s(mfu)) / 3600

    @property
    def latent_cache_saving(self) -> float:
        """Share of the step's FLOPs a latent cache (``python -m data_prep encode``) removes: the
        frozen autoencoder's, which only encodes, in the forward."""
        return self.flops_by_part.get(self.frozen_part, 0.0) / self.flops_per_sample

    @property
    def latent_cache_speedup(self) -> float:
        """Samples/s with a latent cache over samples/s without, at the same MFU."""
        return 1 / (1 - self.latent_cache_saving)

    def parts(self) -> dict[str, int]:
        """The peak's parts, in bytes per GPU."""
        s = self.states
        return {
            "weights": s.weights,
            "fp32 master": s.master,
            "Adam moments": s.moments,
            "gradient partition": s.gradients,
            "reduce buckets": s.buckets,
            "activations": self.activations,
        }

    def advice(self) -> str:
        """One line: the largest part and what would fix it."""
        parts = self.parts()
        largest = max(parts, key=parts.get)
        over = self.peak / GIB - (1 - HEADROOM) * self.device.memory_gib
        share = parts[largest] / GIB
        fix = {
            "activations": "turn on model.options.gradient_checkpointing or lower "
            "data.micro_batch_i2t / data.micro_batch_t2i (raise grad_accum to keep the batch)",
            "weights": "freeze more of the model (model.options.trainable) or use more GPUs",
        }.get(
            largest,
            "offload the optimizer (deepspeed: ds_configs/zero2_offload.json) or use more GPUs",
        )
        return (
            f"needs {self.peak / GIB:.1f} GiB of {self.device.memory_gib:.1f} GiB per GPU "
            f"({over:.1f} GiB over the 10% headroom); largest part: {largest} "
            f"{share:.1f} GiB; {fix}"
        )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            fits=self.fits,
            capacity=self.capacity,
            parts=self.parts(),
            samples_per_s_per_gpu={f"{m:.0%}": self.samples_per_s(m) for m in MFU_TARGETS},
            run_hours={f"{m:.0%}": self.run_hours(m) for m in MFU_TARGETS},
            latent_cache_saving=self.latent_cache_saving,
            latent_cache_speedup=self.latent_cache_speedup,
        )
        return out


def zero2_states(
    trainable: int, frozen: int, ranks: int, precision: str, ds: dict[str, Any]
) -> ModelStates:
    """Stage-2 model states per GPU for ``trainable`` and ``frozen`` parameter counts."""
    width = 2 if precision == "bf16" else 4
    zero = ds.get("zero_optimization", {})
    partition = math.ceil(trainable / ranks)
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    on_gpu = 0 if offloaded else 1
    reduce_bucket = int(zero.get("reduce_bucket_size", 5e8))
    allgather_bucket = int(zero.get("allgather_bucket_size", 5e8))
    return ModelStates(
        weights=width * (trainable + frozen),
        master=on_gpu * 4 * partition,
        moments=on_gpu * 8 * partition,
        gradients=on_gpu * width * partition,
        buckets=width * min(reduce_bucket, trainable) * (2 if zero.get("overlap_comm") else 1),
        step_extra=on_gpu * 4 * partition + width * min(allgather_bucket, trainable),
    )


def planning_config(cfg: TrainConfig, tokenizer: Path) -> TrainConfig:
    """``cfg`` with the model built at random init (no weight files are read) and ``tokenizer``."""
    options = {k: v for k, v in cfg.model.options.items() if not k.endswith("_path")}
    model = replace(
        cfg.model, path=None, vae_path=None, tokenizer_path=str(tokenizer), options=options
    )
    return replace(cfg, model=model)


def build_on_meta(cfg: TrainConfig) -> InfoTokModel:
    """The recipe's model on the meta device in its training precision (no memory, no RNG use)."""
    import torch

    from pipeline.objective import build_objective

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_objective(cfg.model, cfg.infotok, cfg.loss_weight_i2t, cfg.loss_weight_t2i)
    if cfg.precision == "bf16":
        model.to(torch.bfloat16)
    return model.train()


def longest_samples(n_i2t: int, n_t2i: int, image_size: int) -> list[dict[str, Any]]:
    """Raw samples (the shard format's fields) whose texts run past every model's maximum length,
    so the processor cuts them to the longest sequence the recipe can produce."""
    from PIL import Image

    words = " ".join([FILLER] * 400)
    image = Image.new("RGB", (image_size, image_size), (90, 120, 150))
    i2t = {
        "task": "i2t",
        "image": image,
        "messages": [
            {"role": "user", "content": "<image>\ndescribe the picture"},
            {"role": "assistant", "content": words},
        ],
    }
    t2i = {"task": "t2i", "image": image, "prompt": words}
    return [{**i2t, "__key__": f"u{i}"} for i in range(n_i2t)] + [
        {**t2i, "__key__": f"g{i}"} for i in range(n_t2i)
    ]


def longest_batch(model: InfoTokModel, n_i2t: int, n_t2i: int) -> dict[str, Any]:
    """The largest collated batch of ``n_i2t`` + ``n_t2i`` samples the adapter's processor makes."""
    adapter = model.adapter
    samples = longest_samples(n_i2t, n_t2i, adapter.config.image_size)
    return adapter.collate([adapter.processor(s) for s in samples])


@contextmanager
def fake_parameters(model: nn.Module, mode: Any) -> Iterator[None]:
    """While open, every parameter and buffer of ``model`` is a fake CPU twin (ties and
    ``requires_grad`` kept), so the model runs under ``mode`` with no memory behind its tensors;
    the real ones are put back on exit."""
    import torch
    from torch import nn

    twins: dict[int, torch.Tensor] = {}
    originals: list[tuple[dict[str, Any], str, torch.Tensor]] = []

    def twin(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in twins:
            with mode:
                fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cpu")
            twins[id(t)] = (
                nn.Parameter(fake, requires_grad=t.requires_grad)
                if isinstance(t, nn.Parameter)
                else fake
            )
        return twins[id(t)]

    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    originals.append((store, name, tensor))
                    store[name] = twin(tensor)
    try:
        yield
    finally:
        for store, name, tensor in originals:
            store[name] = tensor


def module_parts(model: InfoTokModel) -> dict[nn.Module, str]:
    """The part of the model each module belongs to, from the adapter's declared parameter groups
    (shared visual encoder, its trainable groups, the frozen autoencoder) and the regularizer."""
    adapter = type(model.adapter)
    groups = [("shared visual encoder", adapter.ENCODER_PREFIXES)]
    groups += list(adapter.TRAINABLE_GROUPS.items())
    groups.append((adapter.FROZEN_MODULE, (f"{adapter.FROZEN_MODULE}.",)))
    prefixes = [(part, tuple(f"adapter.{p}" for p in group)) for part, group in groups]
    prefixes.append(("InfoTok", ("regularizer.",)))
    parts = {}
    for name, module in model.named_modules():
        part = next((p for p, group in prefixes if f"{name}.".startswith(group)), None)
        if part is not None:
            parts[module] = part
    return parts


def part_flop_counter(model: InfoTokModel) -> Any:
    """A ``FlopCounterMode`` that also adds up FLOPs per part (``.by_part``) while it is open.

    A forward op counts for the innermost part module running it. Its autograd nodes are tagged
    with that part, so its backward counts for the same part; untagged work goes to ``other``.
    """
    from collections import Counter
    from functools import partial

    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves
    from torch.utils.flop_counter import FlopCounterMode

    stack: list[str] = []

    def current_part() -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return node.metadata.get("part", "other")
        return stack[-1] if stack else "other"

    def enter(part: str, *_: Any) -> None:
        stack.append(part)

    def leave(*_: Any) -> None:
        stack.pop()

    class NodeTagger(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            out = func(*args, **(kwargs or {}))
            part = current_part()
            nodes = [t.grad_fn for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            while nodes:
                node = nodes.pop()
                if node is not None and "part" not in node.metadata:
                    node.metadata["part"] = part
                    nodes.extend(n for n, _ in node.next_functions)
            return out

    class PartFlopCounter(FlopCounterMode):
        def __init__(self) -> None:
            super().__init__(display=False)
            self.by_part: Counter[str] = Counter({p: 0 for p in dict.fromkeys(parts.values())})
            self.by_part["other"] = 0
            self._tagger = NodeTagger()
            self._hooks: list[Any] = []

        def __enter__(self) -> PartFlopCounter:
            for module, part in parts.items():
                self._hooks.append(module.register_forward_pre_hook(partial(enter, part)))
                self._hooks.append(module.register_forward_hook(leave))
            self._tagger.__enter__()
            return super().__enter__()

        def __exit__(self, *args: Any) -> None:
            super().__exit__(*args)
            self._tagger.__exit__(*args)
            for hook in self._hooks:
                hook.remove()

        def _count_flops(self, func_packet, out, args, kwargs):  # noqa: ANN001
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                self.by_part[current_part()] += flops
            return super()._count_flops(func_packet, out, args, kwargs)

    parts = module_parts(model)
    return PartFlopCounter()


@contextmanager
def attention_without_dropout() -> Iterator[None]:
    """``scaled_dot_product_attention`` with ``dropout_p=0`` inside the block.

    On the GPU, attention with dropout runs in a fused kernel that redraws its dropout mask in the
    backward from a seed, so it keeps no more than attention without dropout. On the CPU that the
    planner runs on, dropout sends it to the unfused path that keeps the attention matrix, its
    mask and the dropped copy for the backward: Harmon's MAR blocks planned 29 GiB of activations
    where an H200 used 8. The function itself is replaced (not intercepted by a torch-function
    mode), so that activation checkpointing's recomputation in the backward sees it too.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def without_dropout(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 4:
            args = (*args[:4], 0.0, *args[5:])
        else:
            kwargs["dropout_p"] = 0.0
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = without_dropout
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextmanager
def tracked_step(
    model: InfoTokModel, fake_mode: Any | None, memory: bool = True
) -> Iterator[dict[str, Any]]:
    """FLOP counter and (with ``memory``) memory tracker around one step, under ``fake_mode``
    when given."""
    from collections import OrderedDict
    from contextlib import nullcontext

    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.hooks import RemovableHandle

    class PeakTracker(MemTracker):
        """Keeps the device-wide peak only: the tracker's per-module peaks walk every module at
        every op, three quarters of a real-size step's planning time."""

        def _update_peak_stats(self, peak_state: Any) -> None:
            for dev, snapshot in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snapshot["Total"]:
                    self._peak_mem[dev] = snapshot["Total"]
                    self._peak_mem_snap[dev] = dict(snapshot)

    tracker = PeakTracker()
    tracker.track_external(model)
    no_hook = RemovableHandle(OrderedDict())
    for parameter in model.parameters():  # the tracker would hook frozen parameters, which fails
        if not parameter.requires_grad:
            tracker._param_to_grad_hook_handles[parameter] = (no_hook, no_hook)
    counter = part_flop_counter(model)
    result: dict[str, Any] = {}
    with (
        fake_mode if fake_mode is not None else nullcontext(),
        counter,
        tracker if memory else nullcontext(),
    ):
        yield result
    result["activation_bytes"] = 0
    if memory:
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
        states = sum(peak.get(k, 0) for k in ("Parameter", "Buffer", "Gradient"))
        result["activation_bytes"] = peak["Total"] - states
    result["flops"] = counter.get_total_flops()
    result["flops_by_part"] = dict(counter.by_part)


def profile_step(
    model: InfoTokModel,
    batch: dict[str, Any],
    *,
    fake: bool = True,
    memory: bool = True,
    seed: int = 0,
) -> StepProfile:
    """One micro-step of ``model`` on ``batch``: forward (both tasks, InfoTok) and backward.

    With ``fake`` (``model`` may live on the meta device) nothing is computed or allocated, and
    the model is left as it was. Attention is measured as the GPU's fused kernels keep it
    (:func:`attention_without_dropout`); ``memory=False`` counts FLOPs only (faster).
    """
    from contextlib import nullcontext

    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._pytree import tree_map_only

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    mode = FakeTensorMode() if fake else None
    if mode is not None:
        batch = tree_map_only(torch.Tensor, mode.from_tensor, batch)
    with (
        fake_parameters(model, mode) if mode is not None else nullcontext(),
        attention_without_dropout(),
        torch.random.fork_rng(devices=[]),
        warnings.catch_warnings(),
        tracked_step(model, mode, memory) as result,
    ):
        # Two module trackers (memory, FLOPs) at once make torch warn that its hierarchy "maybe
        # messed up"; neither figure taken here uses that hierarchy.
        warnings.filterwarnings("ignore", message="The module hierarchy tracking")
        loss, _, _ = model(batch, torch.Generator().manual_seed(seed))
        loss.backward()
    return StepProfile(
        activation_bytes=result["activation_bytes"],
        flops=result["flops"],
        flops_by_part=result["flops_by_part"],
        trainable=trainable,
        frozen=frozen,
    )


def flops_per_sample(
    model: InfoTokModel, n_i2t: int, n_t2i: int, *, cached_latents: bool = False
) -> float:
    """Forward + backward FLOPs per sample of a micro-step of the longest samples, counted on fake
    twins of ``model``'s tensors (the model is not touched); without the frozen autoencoder's
    when ``cached_latents`` (the run reads a latent cache)."""
    batch = longest_batch(model, n_i2t, n_t2i)
    step = profile_step(model, batch, memory=False)
    frozen = step.flops_by_part.get(type(model.adapter).FROZEN_MODULE, 0) if cached_latents else 0
    return (step.flops - frozen) / (n_i2t + n_t2i)


def plan_recipe(
    cfg: TrainConfig, gpus: int, device: Device, recipe: str = "", tokenizer: Path | None = None
) -> Plan:
    """Measure ``cfg``'s micro-step on fake tensors and add the ZeRO-2 states for ``gpus`` ranks."""
    from pipeline.models.common.tiny_tokenizer import make_tokenizer
    from pipeline.recipe import deepspeed_config

    ds = deepspeed_config(cfg, gpus)
    micro = cfg.data.micro_batch_i2t + cfg.data.micro_batch_t2i
    with tempfile.TemporaryDirectory(prefix="plan-tokenizer-") as scratch:
        tokenizer = tokenizer or make_tokenizer(scratch)
        model = build_on_meta(planning_config(cfg, tokenizer))
        batch = longest_batch(model, cfg.data.micro_batch_i2t, cfg.data.micro_batch_t2i)
        step = profile_step(model, batch, seed=cfg.seed)
    states = zero2_states(step.trainable, step.frozen, gpus, cfg.precision, ds)
    backward = step.activation_bytes + states.buckets
    return Plan(
        recipe=recipe,
        device=device,
        gpus=gpus,
        trainable=step.trainable,
        frozen=step.frozen,
        states=states,
        activations=step.activation_bytes,
        peak=states.resident + max(backward, states.step_extra),
        flops_per_sample=step.flops / micro,
        flops_by_part={k: v / micro for k, v in step.flops_by_part.items()},
        frozen_part=type(model.adapter).FROZEN_MODULE,
        samples_per_step=micro * ds["gradient_accumulation_steps"] * gpus,
        steps=cfg.steps,
    )


def format_plan(plan: Plan) -> str:
    """The plan as the markdown tables the README shows."""
    dev, s = plan.device, plan.states
    frac = f"1/{plan.gpus}"
    rows = [
        ("weights, all parameters", s.weights),
        (f"fp32 master weights ({frac} of trained)", s.master),
        (f"Adam moments ({frac})", s.moments),
        (f"gradient partition ({frac})", s.gradients),
        ("reduce buckets", s.buckets),
        ("activations, micro-step peak", plan.activations),
    ]
    used = plan.peak / plan.capacity
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines = [
        f"**{plan.recipe}** on {plan.gpus} x {dev.name} ({dev.memory_gib:.1f} GiB): "
        f"{plan.trainable / 1e6:,.1f} M trained + {plan.frozen / 1e6:,.1f} M frozen parameters",
        "",
        "| memory per GPU | GiB |",
        "|---|---:|",
        *(f"| {name} | {value / GIB:.1f} |" for name, value in rows),
        f"| **peak** ({used:.0%} of the GPU: {verdict}, 10% headroom kept) | "
        f"**{plan.peak / GIB:.1f}** |",
        "",
        "| FLOPs per sample (forward + backward) | GFLOP | share |",
        "|---|---:|---:|",
    ]
    total = plan.flops_per_sample
    lines += [
        f"| {part} | {value / 1e9:,.0f} | {value / total:.0%} |"
        for part, value in plan.flops_by_part.items()
        if value
    ]
    lines.append(f"| **total** | **{total / 1e9:,.0f}** | |")
    if plan.latent_cache_saving:
        lines += [
            "",
            f"a latent cache (python -m data_prep encode) removes the {plan.frozen_part}'s "
            f"{plan.latent_cache_saving:.0%} of these FLOPs: about "
            f"{plan.latent_cache_speedup:.2f}x the samples/s at the same MFU",
        ]
    speed = [
        f"{m:.0%} MFU: {plan.samples_per_s(m):.1f} samples/s per GPU, "
        f"{plan.run_hours(m):.1f} h for the run"
        for m in MFU_TARGETS
    ]
    lines += [
        "",
        f"{plan.steps} steps x {plan.samples_per_step} samples on {plan.gpus} GPUs: "
        + "; ".join(speed),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plan",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--gpus", type=int, default=16, help="data-parallel GPUs (default 16)")
    parser.add_argument(
        "--gpu", default="h100", help=f"device: {', '.join(DEVICES)} (default h100)"
    )
    parser.add_argument(
        "--gpu-memory-gib",
        type=float,
        help="memory per GPU instead of the device's (the preflight passes the node's own)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, as given to pipeline.train"
    )
    return parser.parse_args(argv)


def device_for(name: str, memory_gib: float | None) -> Device:
    if name not in DEVICES:
        raise ValueError(f"--gpu: unknown device {name!r} (known: {', '.join(DEVICES)})")
    device = DEVICES[name]
    if memory_gib is not None:
        if memory_gib <= 0:
            raise ValueError(f"--gpu-memory-gib: must be positive, got {memory_gib}")
        device = replace(device, memory_gib=memory_gib)
    return device


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.config import ConfigError
    from pipeline.recipe import load_train_config

    try:
        device = device_for(args.gpu, args.gpu_memory_gib)
        if args.gpus < 1:
            raise ValueError(f"--gpus: must be at least 1, got {args.gpus}")
        cfg = load_train_config(args.config, args.overrides)
        plan = plan_recipe(cfg, args.gpus, device, args.config)
    except (ConfigError, ValueError, OSError) as e:
        print(f"plan: FAILED: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan), flush=True)
    if not plan.fits:
        print(f"plan: does not fit: {plan.advice()}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return EXIT_FITS


if __name__ == "__main__":
    sys.exit(main())
