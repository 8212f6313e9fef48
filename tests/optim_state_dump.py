"""The optimizer state of a checkpoint, as loaded and as saved.

Run as ``python -m tests.optim_state_dump OUT RECIPE key=value ...`` on N ranks: it builds the
trainer (which resumes from the recipe's ``resume``), then rank 0 saves every trained parameter's
full weights, fp32 master weights and Adam moments, the Adam step and the LR scheduler state.
:func:`saved_state` reads the same from a checkpoint's files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from pipeline.checkpoint import TRAINER_STATE
from pipeline.distributed import resolve_env
from pipeline.recipe import load_train_config
from pipeline.train import Trainer


def main() -> None:
    out, recipe, *overrides = sys.argv[1:]
    trainer = Trainer(load_train_config(recipe, overrides), resolve_env())
    engine = trainer.engine
    # DeepSpeed links the Adam moments to the parameters lazily, at the first step; link them now
    engine.optimizer._lazy_init_hp_params_optimizer_state()
    state = {"params": {}, "start": trainer.start}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        state["params"][name] = {
            "weight": p.detach().float().cpu().clone(),
            "fp32": safe_get_full_fp32_param(p).cpu().clone(),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").cpu().clone(),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").cpu().clone(),
        }
    inner = engine.optimizer.optimizer
    state["adam_steps"] = sorted({float(s["step"]) for s in inner.state.values() if "step" in s})
    state["lr_scheduler"] = engine.lr_scheduler.state_dict()
    if dist.get_rank() == 0:
        torch.save(state, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()


def saved_state(checkpoint: Path) -> dict:
    """The same, read from the files of a ZeRO-2 checkpoint: every rank's flat fp32 partition
    and Adam moments concatenated and cut into the parameters in the order DeepSpeed flattened
    them (``param_shapes``), as ``zero_to_fp32`` does."""
    model = torch.load(checkpoint / "mp_rank_00_model_states.pt", weights_only=False)
    files = sorted(
        checkpoint.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"),
        key=lambda p: int(p.name.split("_")[3]),
    )
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    state = {"params": {}, "start": json.loads((checkpoint / TRAINER_STATE).read_text())["step"]}
    steps = set()
    for group, shapes in enumerate(model["param_shapes"]):
        moments = [p["base_optimizer_state"]["state"][group] for p in parts]
        steps.update(float(m["step"]) for m in moments)
        flat = {
            "fp32": torch.cat([p["single_partition_of_fp32_groups"][group] for p in parts]),
            "exp_avg": torch.cat([m["exp_avg"] for m in moments]),
            "exp_avg_sq": torch.cat([m["exp_avg_sq"] for m in moments]),
        }
        offset = 0
        for name, shape in shapes.items():
            n = shape.numel()
            tensors = {k: v[offset : offset + n].view(shape).clone() for k, v in flat.items()}
            state["params"][name] = {"weight": model["module"][name].float(), **tensors}
            offset += n
    state["adam_steps"] = sorted(steps)
    state["lr_scheduler"] = model["lr_scheduler"]
    return state
