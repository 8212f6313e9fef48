"""Optimizer parameter groups: per-module learning rates (``optim.groups``) and weight decay.

A group names the parameters it owns by glob patterns over the adapter's parameter names
(``adapter.<the family's checkpoint key>``) and scales ``optim.lr`` by ``lr_scale``. The InfoTok
heads (``regularizer.*``) are always a group of their own, ``infotok_heads``, at
``optim.heads_lr_scale`` (absent with ``infotok.mode=off``); trained parameters no group claims
form the group ``default`` at ``optim.lr``. Every group then splits into matrices (decayed) and
the rest (biases, norms, 1-D scales, learned vectors: not decayed), and all follow the same
warm-up + cosine schedule, which multiplies each group's own learning rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from pipeline.config import ConfigError, param

DEFAULT_GROUP = "default"
HEADS_GROUP = "infotok_heads"
HEADS_PREFIX = "regularizer."


@dataclass
class ParamGroupConfig:
    name: str = param(help="the group's name in logs (not 'default')")
    params: list[str] = param(
        default_factory=list,
        help="glob patterns of parameter names, e.g. 'adapter.image_embedder_und.*' or "
        "'regularizer.*' (python -m pipeline.plan and the start banner list the modules)",
    )
    lr_scale: float = param(1.0, gt=0, help="this group's learning rate is optim.lr x lr_scale")

    def check(self, source: str, prefix: str) -> None:
        if not self.name or self.name in (DEFAULT_GROUP, HEADS_GROUP):
            raise ConfigError(
                f"{source}: {prefix}name: give each group a name other than {DEFAULT_GROUP!r} "
                f"(the parameters no group claims) and {HEADS_GROUP!r} (the InfoTok heads)"
            )
        heads = [p for p in self.params if p.startswith(HEADS_PREFIX)]
        if heads:
            raise ConfigError(
                f"{source}: {prefix}params: {heads[0]!r}: the InfoTok heads are the group "
                f"{HEADS_GROUP!r}; set their learning rate with optim.heads_lr_scale"
            )
        if not self.params:
            raise ConfigError(f"{source}: {prefix}params: expected at least one pattern")


@dataclass(frozen=True)
class ResolvedGroup:
    """What one configured group (or ``default``) holds once matched against the model."""

    name: str
    patterns: tuple[str, ...]
    lr_scale: float
    lr: float
    tensors: int
    numel: int


def resolve_groups(
    model: nn.Module, groups: list[ParamGroupConfig], lr: float, heads_lr_scale: float = 1.0
) -> list[tuple[ResolvedGroup, list[nn.Parameter]]]:
    """Each configured group's trained parameters, then the InfoTok heads', then ``default``'s
    (groups without parameters left out), each with its summary.

    A pattern that matches no trained parameter, and a parameter that two groups claim, are
    errors naming the group(s) and the key ``optim.groups``.
    """
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owner: dict[str, str] = {}
    members: list[tuple[str, tuple[str, ...], float, list[tuple[str, nn.Parameter]]]] = []
    for group in groups:
        for pattern in group.params:
            if not any(fnmatchcase(name, pattern) for name, _ in trained):
                example = trained[0][0] if trained else "none"
                raise ConfigError(
                    f"optim.groups: group {group.name!r}: pattern {pattern!r} matches no trained "
                    f"parameter (names look like {example!r})"
                )
        claimed = [(n, p) for n, p in trained if any(fnmatchcase(n, g) for g in group.params)]
        for name, _ in claimed:
            if name in owner:
                raise ConfigError(
                    f"optim.groups: groups {owner[name]!r} and {group.name!r} both match "
                    f"{name!r}; patterns must not overlap"
                )
            owner[name] = group.name
        members.append((group.name, tuple(group.params), group.lr_scale, claimed))
    heads = [(n, p) for n, p in trained if n.startswith(HEADS_PREFIX)]
    members.append((HEADS_GROUP, (HEADS_PREFIX + "*",), heads_lr_scale, heads))
    owner.update((n, HEADS_GROUP) for n, _ in heads)
    rest = [(n, p) for n, p in trained if n not in owner]
    members.append((DEFAULT_GROUP, ("*",), 1.0, rest))
    return [
        (
            ResolvedGroup(
                name=name,
                patterns=patterns,
                lr_scale=scale,
                lr=lr * scale,
                tensors=len(params),
                numel=sum(p.numel() for _, p in params),
            ),
            [p for _, p in params],
        )
        for name, patterns, scale, params in members
        if params
    ]


def optimizer_groups(
    model: nn.Module,
    groups: list[ParamGroupConfig],
    lr: float,
    weight_decay: float,
    heads_lr_scale: float = 1.0,
) -> tuple[list[dict[str, Any]], list[ResolvedGroup]]:
    """The optimizer's parameter groups (each with its ``lr`` and ``weight_decay``) and the
    resolved summary. When every group has the same learning rate they are one group in the
    model's order (DeepSpeed combines per-group gradient norms, so fewer groups round alike)."""
    resolved = resolve_groups(model, groups, lr, heads_lr_scale)
    if len({group.lr for group, _ in resolved}) <= 1:
        buckets = [(lr, [p for p in model.parameters() if p.requires_grad])]
    else:
        buckets = [(group.lr, params) for group, params in resolved]
    out = []
    for group_lr, params in buckets:
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for tensors, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if tensors:
                out.append({"params": tensors, "weight_decay": wd, "lr": group_lr})
    return out, [group for group, _ in resolved]


def format_groups(summary: list[ResolvedGroup]) -> list[str]:
    """One line per group for the start banner and the run's config.yaml."""
    width = max(len(g.name) for g in summary)
    return [
        f"{g.name:<{width}}  lr {g.lr:.3g} (x{g.lr_scale:g})  {g.numel / 1e6:,.2f}M params in "
        f"{g.tensors} tensors  <- {', '.join(g.patterns)}"
        for g in summary
    ]
