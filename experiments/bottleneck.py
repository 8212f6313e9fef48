"""Does the bottleneck do what Eq. 10 says? A synthetic check that runs in seconds on a CPU.

Each sample is an "image" of ``tokens`` tokens. Every token's input holds the sample's
task-relevant part ``s`` (shared by all its tokens, like an object seen in every patch) and its
own high-entropy nuisance ``n_j`` (independent per token, like sensor noise) that no target needs.
A small MLP plays the shared visual encoder V_enc; a linear classifier of sign(s_0) on the mean
token plays L_MLLM. The InfoTok targets are the signs of s_0 and s_1 as a two-token answer
(branch u) and s itself as each token's latent patch (branch g).

Two runs from the same seed differ only in whether the InfoTok gradient reaches V_enc:

* ``off``: plain fine-tuning. The InfoTok heads are still fitted, on detached tokens, so that
  z~ can be measured the same way for both encoders;
* the configured mode (``cs`` by default): L_MLLM + lam * L_InfoTok, gradients into V_enc.

On held-out data it reports how much nuisance a linear probe recovers from the shared tokens z
(what the LLM consumes; Eq. 12's argument is that regularising z~ constrains z), the task
information kept in z~ (answer accuracy, generation-target R^2), the rate and the task loss.

    python -m experiments.bottleneck [--config FILE.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import load_config, param
from pipeline.infotok import InfoTokConfig, InfoTokDims, InfoTokRegularizer, gaussian_kl

ANSWER_VOCAB = 2  # answer tokens are signs: 0 or 1


@dataclass
class BottleneckDemoConfig:
    seed: int = param(0, help="seeds data, initialisation and sampling")
    steps: int = param(400, ge=1, help="optimizer steps per run")
    batch_size: int = param(128, ge=2, help="samples per branch per step")
    lr: float = param(3e-3, gt=0, help="Adam learning rate")
    tokens: int = param(4, ge=1, help="tokens per sample")
    relevant_dims: int = param(2, ge=2, help="task-relevant input dims per sample")
    nuisance_dims: int = param(8, ge=1, help="nuisance input dims per token")
    token_dim: int = param(8, ge=2, help="width D of the shared tokens")
    hidden_dim: int = param(64, ge=1, help="hidden width of V_enc")
    eval_samples: int = param(2048, ge=64, help="held-out samples for the probes")
    infotok: InfoTokConfig = field(
        default_factory=lambda: InfoTokConfig(
            mode="cs",
            lam=1.0,
            beta_u=4.0,
            beta_g=4.0,
            latent_dim=4,
            decoder_hidden=32,
            vocab_rank=8,
            gather_negatives=False,
        )
    )


@dataclass
class RunReport:
    nuisance_r2_z: float
    nuisance_r2_z_tilde: float
    answer_accuracy: float
    target_r2: float
    rate_u: float
    rate_g: float
    task_loss: float


class SyntheticScenes:
    """Samples of token inputs [B, N, relevant + nuisance] with their targets."""

    def __init__(self, cfg: BottleneckDemoConfig):
        self.cfg = cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def sample(self, batch: int) -> dict[str, Tensor]:
        c = self.cfg
        s = torch.randn(batch, 1, c.relevant_dims, generator=self.generator).expand(
            -1, c.tokens, -1
        )
        n = torch.randn(batch, c.tokens, c.nuisance_dims, generator=self.generator)
        signs = (s[:, 0, :2] > 0).long()
        return {
            "x": torch.cat([s, n], dim=-1),
            "nuisance": n,
            "target": s,
            "answer": signs,
            "task": signs[:, 0],
        }


class ToyModel(nn.Module):
    """V_enc (an MLP per token) and the L_MLLM stand-in (a classifier on the mean token)."""

    def __init__(self, cfg: BottleneckDemoConfig):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(cfg.relevant_dims + cfg.nuisance_dims, cfg.hidden_dim),
            nn.GELU(),
            nn.Linear(cfg.hidden_dim, cfg.token_dim),
        )
        self.task_head = nn.Linear(cfg.token_dim, 2)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        z = self.encoder(batch["x"])
        return z, F.cross_entropy(self.task_head(z.mean(1)), batch["task"])


def regularizer_inputs(
    z_u: Tensor, z_g: Tensor, u: dict[str, Tensor], g: dict[str, Tensor]
) -> dict[str, Tensor]:
    return {
        "z_u": z_u,
        "z_g": z_g,
        "text_u": u["target"][:, 0],
        "text_g": g["target"][:, 0],
        "answer_ids": u["answer"],
        "answer_mask": torch.ones_like(u["answer"], dtype=torch.bool),
        "target_patches": g["target"],
    }


def train_and_probe(cfg: BottleneckDemoConfig, mode: str) -> RunReport:
    """Train with ``mode`` (``off`` or the configured InfoTok mode) and probe held-out tokens."""
    torch.manual_seed(cfg.seed)
    data = SyntheticScenes(cfg)
    model = ToyModel(cfg)
    heads_mode = cfg.infotok.mode if mode != "off" else "cs"
    dims = InfoTokDims(
        token_dim=cfg.token_dim,
        text_dim=cfg.relevant_dims,
        vocab_size=ANSWER_VOCAB,
        latent_patch_dim=cfg.relevant_dims,
    )
    regularizer = InfoTokRegularizer(dataclasses.replace(cfg.infotok, mode=heads_mode), dims)
    optimizer = torch.optim.Adam([*model.parameters(), *regularizer.parameters()], lr=cfg.lr)
    for _ in range(cfg.steps):
        u, g = data.sample(cfg.batch_size), data.sample(cfg.batch_size)
        (z_u, task_loss), (z_g, _) = model(u), model(g)
        if mode == "off":  # the heads are fitted on the tokens, but no gradient reaches V_enc
            reg = regularizer(**regularizer_inputs(z_u.detach(), z_g.detach(), u, g))
            loss = task_loss + reg.terms["infotok"]
        else:
            loss = task_loss + regularizer(**regularizer_inputs(z_u, z_g, u, g)).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return _probe(cfg, model, regularizer, data)


@torch.no_grad()
def _probe(
    cfg: BottleneckDemoConfig,
    model: ToyModel,
    regularizer: InfoTokRegularizer,
    data: SyntheticScenes,
) -> RunReport:
    fit, test = data.sample(cfg.eval_samples), data.sample(cfg.eval_samples)

    def encode(batch: dict[str, Tensor], branch: str) -> tuple[Tensor, Tensor, Tensor]:
        z, _ = model(batch)
        mu, logvar = regularizer.posterior[branch](z)
        return z, mu + (0.5 * logvar).exp() * torch.randn_like(mu), gaussian_kl(mu, logvar).mean()

    z_fit, zu_fit, _ = encode(fit, "u")
    z_test, zu_test, rate_u = encode(test, "u")
    _, zg_fit, _ = encode(fit, "g")
    _, zg_test, rate_g = encode(test, "g")
    answer_pred = linear_probe(zu_fit.mean(1), fit["answer"].float(), zu_test.mean(1)) > 0.5
    return RunReport(
        nuisance_r2_z=r2(linear_probe(z_fit, fit["nuisance"], z_test), test["nuisance"]),
        nuisance_r2_z_tilde=r2(linear_probe(zu_fit, fit["nuisance"], zu_test), test["nuisance"]),
        answer_accuracy=(answer_pred == test["answer"].bool()).float().mean().item(),
        target_r2=r2(linear_probe(zg_fit, fit["target"], zg_test), test["target"]),
        rate_u=rate_u.item(),
        rate_g=rate_g.item(),
        task_loss=model(test)[1].item(),
    )


def linear_probe(x_fit: Tensor, y_fit: Tensor, x_test: Tensor) -> Tensor:
    """Least-squares affine map over the last dim, fitted on ``x_fit``, applied to ``x_test``."""

    def design(x: Tensor) -> Tensor:
        x = x.reshape(-1, x.shape[-1])
        return torch.cat([x, torch.ones(len(x), 1)], dim=1)

    w = torch.linalg.lstsq(design(x_fit), y_fit.reshape(-1, y_fit.shape[-1])).solution
    return (design(x_test) @ w).reshape(*x_test.shape[:-1], -1)


def r2(pred: Tensor, target: Tensor) -> float:
    """Fraction of the target's variance explained (pooled over its dims)."""
    target = target.reshape(-1, target.shape[-1])
    residual = (pred.reshape(target.shape) - target).square().sum()
    return (1 - residual / (target - target.mean(0)).square().sum()).item()


def weak_compactness(cfg: BottleneckDemoConfig, factor: float = 100.0) -> BottleneckDemoConfig:
    """The same sufficiency (and alignment) weights with the KL weight divided by ``factor``."""
    c = cfg.infotok
    infotok = dataclasses.replace(
        c,
        lam=c.lam / factor,
        beta_u=c.beta_u * factor,
        beta_g=c.beta_g * factor,
        alpha_u=c.alpha_u * factor,
        alpha_g=c.alpha_g * factor,
    )
    return dataclasses.replace(cfg, infotok=infotok)


def compare(cfg: BottleneckDemoConfig) -> dict[str, RunReport]:
    """Plain fine-tuning, the configured mode, and that mode with 1/100 of the KL weight."""
    return {
        "off": train_and_probe(cfg, "off"),
        cfg.infotok.mode: train_and_probe(cfg, cfg.infotok.mode),
        f"{cfg.infotok.mode}, KL/100": train_and_probe(weak_compactness(cfg), cfg.infotok.mode),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML recipe (default: the embedded defaults)")
    parser.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. infotok.beta_u=8"
    )
    args = parser.parse_args(argv)
    cfg = load_config(BottleneckDemoConfig, args.config, args.overrides)
    if not cfg.infotok.enabled:
        parser.error("infotok.mode=off has nothing to compare against; use cs or csa")
    columns = [f.name for f in dataclasses.fields(RunReport)]
    print(f"{'run':<12}" + "".join(f"{c:>21}" for c in columns))
    for label, report in compare(cfg).items():
        print(f"{label:<12}" + "".join(f"{v:>21.3f}" for v in dataclasses.astuple(report)))


if __name__ == "__main__":
    main()
