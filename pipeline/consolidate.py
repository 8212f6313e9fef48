"""One training checkpoint as fp32 tensors, split into the adapter's and the InfoTok heads' parts.

The ZeRO-2 partitions are merged by DeepSpeed's ``zero_to_fp32``. Export keeps the adapter part;
evaluation and the held-out losses load both into an :class:`~pipeline.objective.InfoTokModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from pipeline.checkpoint import RECIPE_COPY, step_of
from pipeline.recipe import TrainConfig, load_train_config

# The submodule names of InfoTokModel: every key of a training checkpoint starts with one of them.
ADAPTER_PREFIX, REGULARIZER_PREFIX = "adapter.", "regularizer."


@dataclass
class ConsolidatedCheckpoint:
    config: TrainConfig  # the run's resolved recipe, saved beside the checkpoint
    adapter_state: dict[str, Tensor]  # keys without ADAPTER_PREFIX
    regularizer_state: dict[str, Tensor]  # keys without REGULARIZER_PREFIX (empty for mode off)
    root: Path  # the checkpoints directory
    tag: str

    @property
    def step(self) -> int:
        return step_of(self.tag)

    @property
    def source(self) -> Path:
        return self.root / self.tag


def split_state(
    state: dict[str, Tensor], source: Path
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(adapter state, regularizer state), prefixes removed; any other key is an error."""
    unknown = [k for k in state if not k.startswith((ADAPTER_PREFIX, REGULARIZER_PREFIX))]
    if unknown:
        raise ValueError(
            f"{source}: unexpected keys outside {ADAPTER_PREFIX}* and "
            f"{REGULARIZER_PREFIX}*: {unknown[:5]}"
        )
    parts = [
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        for prefix in (ADAPTER_PREFIX, REGULARIZER_PREFIX)
    ]
    return parts[0], parts[1]


def consolidate(root: Path, tag: str) -> ConsolidatedCheckpoint:
    """The checkpoint ``root/tag`` (see :func:`pipeline.checkpoint.locate`) with its recipe."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    config = load_train_config(root / tag / RECIPE_COPY)
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    adapter_state, regularizer_state = split_state(state, root / tag)
    return ConsolidatedCheckpoint(config, adapter_state, regularizer_state, root, tag)


def load_exactly(module: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``; every key of each must match the other's."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
