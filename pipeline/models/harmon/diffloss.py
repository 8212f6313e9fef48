"""MAR's per-token diffusion head (``src/models/mar/diffloss.py`` and ``src/models/mar/diffusion/``).

``DiffLoss.net`` is ``SimpleMLPAdaLN`` (checkpoint keys ``mar.diffloss.net.*``): a residual MLP
whose blocks are adaLN-modulated by timestep + condition embeddings. It predicts the noise ε and,
in a second half of its output, the interpolation weight of a learned variance ("learned range",
Improved DDPM). The schedule is the cosine ``alpha_bar`` with 1000 steps; the training loss per
token is ``mean_c (ε − ε̂)² + L_vb``, where ``L_vb`` (in bits, on a stopped-gradient mean) is
``KL(q(x_{t−1}|x_t,x_0) || p(x_{t−1}|x_t))`` for t > 0 and the discretized-Gaussian decoder NLL
at t = 0. Sampling respaces the schedule to ``num_sampling_steps`` (``space_timesteps``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.models.harmon.config import MARConfig


def cosine_betas(steps: int, max_beta: float = 0.999) -> Tensor:
    """Betas from ``alpha_bar(t) = cos²((t + 0.008)/1.008 · π/2)`` (float64)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return torch.tensor(
        [
            min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta)
            for i in range(steps)
        ],
        dtype=torch.float64,
        device="cpu",
    )


def spaced_steps(steps: int, count: int) -> list[int]:
    """Original timesteps kept by ``space_timesteps(steps, [count])``: evenly strided, rounded."""
    stride = 1.0 if count <= 1 else (steps - 1) / (count - 1)
    taken, position = [], 0.0
    for _ in range(count):
        taken.append(round(position))
        position += stride
    return taken


def respaced_betas(betas: Tensor, keep: list[int]) -> Tensor:
    """Betas of the sub-process visiting only the ``keep`` timesteps (same ``alpha_bar`` there)."""
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    out, last = [], 1.0
    for i in keep:
        out.append(1 - float(alphas_cumprod[i]) / last)
        last = float(alphas_cumprod[i])
    return torch.tensor(out, dtype=torch.float64, device="cpu")


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability of the 1/255-wide bin around ``x`` (tanh approximation of the normal CDF)."""

    def cdf(v: Tensor) -> Tensor:
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - mean, torch.exp(-log_scale)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta)
    )


class Schedule(nn.Module):
    """Gaussian diffusion tables in float64; :meth:`at` gathers them as float32 columns for timesteps ``t``.

    The tables are non-persistent buffers holding the float64 values' int64 bit patterns: they move
    with the module to its device (no host-to-device copy, hence no stall, per step), and
    ``module.to(bfloat16)`` leaves them unrounded. They are computed on the CPU from float64 betas,
    also when the model is built on the meta device; :meth:`reset` fills them again after
    ``to_empty``.
    """

    def __init__(self, betas: Tensor, timestep_map: list[int] | None = None) -> None:
        super().__init__()
        self.num_steps = len(betas)
        self.betas = betas
        self.steps = list(timestep_map) if timestep_map is not None else list(range(len(betas)))
        self.reset()

    def reset(self) -> None:
        """(Re)compute the buffers on the CPU; the module's ``.to(device)`` moves them."""
        betas = self.betas
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        self.register_buffer(
            "timestep_map", torch.tensor(self.steps, device="cpu"), persistent=False
        )
        tables = {
            "sqrt_ac": alphas_cumprod.sqrt(),
            "sqrt_1m_ac": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_ac": (1 / alphas_cumprod).sqrt(),
            "sqrt_recipm1_ac": (1 / alphas_cumprod - 1).sqrt(),
            "post_logvar": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "log_betas": torch.log(betas),
            "coef_x0": betas * prev.sqrt() / (1 - alphas_cumprod),
            "coef_xt": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        for name, table in tables.items():
            self.register_buffer(name, table.view(torch.int64), persistent=False)

    def at(self, name: str, t: Tensor) -> Tensor:
        return getattr(self, name).view(torch.float64)[t].float()[:, None]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return self.at("sqrt_ac", t) * x0 + self.at("sqrt_1m_ac", t) * noise

    def posterior_mean(self, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        return self.at("coef_x0", t) * x0 + self.at("coef_xt", t) * xt

    def p_mean_logvar(
        self, xt: Tensor, t: Tensor, eps: Tensor, var_values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Model mean (through the predicted x0) and learned-range log-variance of p(x_{t−1}|x_t)."""
        frac = (var_values + 1) / 2
        logvar = frac * self.at("log_betas", t) + (1 - frac) * self.at("post_logvar", t)
        x0 = self.at("sqrt_recip_ac", t) * xt - self.at("sqrt_recipm1_ac", t) * eps
        return self.posterior_mean(x0, xt, t), logvar

    def vb_bits(self, x0: Tensor, xt: Tensor, t: Tensor, eps: Tensor, var_values: Tensor) -> Tensor:
        """Per-row variational bound term in bits (KL for t > 0, decoder NLL at t = 0)."""
        mean, logvar = self.p_mean_logvar(xt, t, eps, var_values)
        kl = normal_kl(
            self.posterior_mean(x0, xt, t), self.at("post_logvar", t), mean, logvar
        ).mean(1)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).mean(1)
        return torch.where(t == 0, nll, kl) / math.log(2.0)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (256, cos then sin) of the integer timestep, then a 2-layer SiLU MLP."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width)
        )

    def forward(self, t: Tensor) -> Tensor:
        half = self.frequency_dim // 2
        freqs = torch.exp(
            -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]
        return self.mlp(
            torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(self.mlp[0].weight.dtype)
        )


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(self.in_ln(x) * (1 + scale) + shift)


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(self.norm_final(x) * (1 + scale) + shift)


class SimpleMLPAdaLN(nn.Module):
    """ε and variance predictor: x_t [N, C], t [N], condition c [N, D] → [N, 2C]."""

    def __init__(
        self, channels: int, width: int, z_channels: int, depth: int, gradient_checkpointing: bool
    ) -> None:
        super().__init__()
        self.gradient_checkpointing = gradient_checkpointing
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * channels)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official: xavier linears, N(0, 0.02) time MLP, zero adaLN and output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[1] for block in self.res_blocks] + [
            self.final_layer.adaLN_modulation[1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        dtype = self.input_proj.weight.dtype
        x = self.input_proj(x.to(dtype))
        y = self.time_embed(t) + self.cond_embed(c.to(dtype))
        for block in self.res_blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, y, use_reentrant=False)
            else:
                x = block(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    """The diffusion head: training loss over tokens and the per-token DDPM sampler."""

    def __init__(
        self, channels: int, z_channels: int, cfg: MARConfig, gradient_checkpointing: bool = False
    ) -> None:
        super().__init__()
        self.channels = channels
        self.batch_mul = cfg.diffusion_batch_mul
        self.net = SimpleMLPAdaLN(
            channels, cfg.diffloss_w, z_channels, cfg.diffloss_d, gradient_checkpointing
        )
        betas = cosine_betas(cfg.diffusion_steps)
        self.train_schedule = Schedule(betas)
        keep = spaced_steps(cfg.diffusion_steps, cfg.num_sampling_steps)
        self.sample_schedule = Schedule(respaced_betas(betas, keep), keep)

    def reset_schedules(self) -> None:
        """Fill the schedules' non-persistent buffers again (after ``to_empty``)."""
        self.train_schedule.reset()
        self.sample_schedule.reset()

    def token_losses(self, target: Tensor, cond: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """Per-row ``mse(ε) + L_vb`` for targets x0 [M, C] at timesteps ``t`` with noise ε."""
        schedule = self.train_schedule
        xt = schedule.q_sample(target, t, noise)
        eps, var_values = self.net(xt, t, cond).float().split(self.channels, dim=1)
        mse = ((noise - eps) ** 2).mean(1)
        return mse + schedule.vb_bits(target, xt, t, eps.detach(), var_values)

    def forward(
        self, target: Tensor, cond: Tensor, mask: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Masked mean loss over tokens [M, C] with conditions [M, D], each drawn ``batch_mul`` times.

        Draws from ``generator``: the timesteps, then the noise.
        """
        target = target.float().repeat(self.batch_mul, 1)
        cond = cond.repeat(self.batch_mul, 1)
        weights = mask.float().repeat(self.batch_mul)
        t = torch.randint(
            0,
            self.train_schedule.num_steps,
            (len(target),),
            generator=generator,
            device=target.device,
        )
        noise = torch.randn(target.shape, generator=generator, device=target.device)
        return (self.token_losses(target, cond, t, noise) * weights).sum() / weights.sum()

    @torch.no_grad()
    def sample(
        self,
        cond: Tensor,
        uncond: Tensor | None = None,
        *,
        scale: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Token latents [M, C] by ancestral sampling; with ``uncond`` the noise prediction is guided:
        ``ε = ε_u + scale·(ε_c − ε_u)`` (the variance stays the conditional one).

        Draws from ``generator``: the start noise, then one noise tensor per step.
        """
        schedule = self.sample_schedule
        x = torch.randn(len(cond), self.channels, generator=generator, device=cond.device)
        for step in reversed(range(schedule.num_steps)):
            t = torch.full((len(cond),), step, dtype=torch.long, device=cond.device)
            model_t = schedule.timestep_map[t]
            if uncond is None:
                eps, var_values = self.net(x, model_t, cond).float().split(self.channels, dim=1)
            else:
                out = self.net(
                    torch.cat([x, x]), torch.cat([model_t, model_t]), torch.cat([cond, uncond])
                ).float()
                (eps_c, var_values), eps_u = (
                    out[: len(x)].split(self.channels, dim=1),
                    out[len(x) :, : self.channels],
                )
                eps = eps_u + scale * (eps_c - eps_u)
            mean, logvar = schedule.p_mean_logvar(x, t, eps, var_values)
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = mean + (t != 0).float()[:, None] * torch.exp(0.5 * logvar) * noise * temperature
        return x
