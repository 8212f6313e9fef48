"""Validation during training (``eval.every``): the held-out loss terms of a fixed set of
samples, computed by every rank on its share and averaged over the whole set.

The held-out set is the first ``eval.batches`` global batches of a loader over ``eval.i2t`` /
``eval.t2i`` (its own order, seeded like the training data, split over the ranks and micro-steps
like the training batch), the same samples every time and on any number of ranks. The model runs
in eval mode without gradients; every micro-batch's noise is seeded from its place in the set and
the global RNG streams are restored afterwards, so validation changes neither the training data
order nor any random draw of training: a run with validation logs the same training steps as one
without, and the held-out numbers do not depend on the number of ranks.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor

from pipeline.data import TwoStreamLoader
from pipeline.distributed import to_device
from pipeline.noise import seed_noise
from pipeline.objective import InfoTokModel
from pipeline.recipe import TrainConfig

PREFIX = "val/"


class Validator:
    def __init__(
        self,
        cfg: TrainConfig,
        model: InfoTokModel,
        *,
        rank: int,
        world_size: int,
        grad_accum: int = 1,
    ) -> None:
        data = dataclasses.replace(
            cfg.data,
            i2t=list(cfg.eval.i2t),
            t2i=list(cfg.eval.t2i),
            micro_batch_i2t=cfg.data.micro_batch_i2t if cfg.eval.i2t else 0,
            micro_batch_t2i=cfg.data.micro_batch_t2i if cfg.eval.t2i else 0,
            num_workers=0,
        )
        self.loader = TwoStreamLoader(
            data,
            model.adapter.processor,
            model.adapter.collate,
            rank=rank,
            world_size=world_size,
            grad_accum=grad_accum,
        )
        self.start = self.loader.state_dict()
        self.micro_batches = cfg.eval.batches * grad_accum  # of this rank
        self.seed = cfg.seed + 50_021

    def run(self, model: InfoTokModel, dev: torch.device) -> dict[str, float]:
        """``val/<term>`` for every loss term, means over the held-out set and the ranks."""
        self.loader.load_state_dict(self.start)
        batches = iter(self.loader)
        sums: dict[str, Tensor] = {}
        was_training = model.training
        model.eval()
        devices = [dev] if dev.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                generator = torch.Generator(device=dev)
                for _ in range(self.micro_batches):
                    batch = next(batches)
                    seed_noise(generator, self.seed, batch["step"], batch["micro_batch"])
                    _, terms, _ = model(to_device(batch["inputs"], dev), generator)
                    for name, value in terms.items():
                        value = value.detach().float().reshape(())
                        sums[name] = sums[name] + value if name in sums else value
        finally:
            model.train(was_training)
        names = sorted(sums)
        values = torch.stack([sums[n] for n in names]).double()
        if dist.is_initialized():
            dist.all_reduce(values)
            values /= dist.get_world_size()
        values /= self.micro_batches
        return {PREFIX + n: v for n, v in zip(names, values.tolist())}
