"""OpenUni flow matching (``OpenUniInternVL3SANAHF.diff_loss``) and the sampler.

Training (``src/models/openuni/internvl3_sana_hf.py``): the train scheduler is
``FlowMatchEulerDiscreteScheduler`` built from SANA's scheduler config, whose shift stays 1.0
(SANA ships a DPM-Solver config; its ``flow_shift`` is not a FlowMatchEuler key). Per sample,
``u ~ U[0, 1)`` (weighting scheme ``none``), ``index = ⌊u·1000⌋``, ``t = timesteps[index]``
(1000 … 1), ``σ = sigmas[index] = t/1000``; ``x_σ = (1−σ)·x + σ·ε``; the DiT predicts
``ε − x``; the loss is the per-sample mean squared error, averaged (unit weighting).
Sampling: SANA's DPM-Solver++ for flow matching (``flow_shift`` 3.0) with classifier-free guidance.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor


def training_scheduler(num_train_timesteps: int, shift: float) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=shift)


def sample_timesteps(
    scheduler: FlowMatchEulerDiscreteScheduler,
    n: int,
    generator: torch.Generator | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Discrete training timesteps and their sigmas, uniform over the scheduler's grid.

    The entries at the drawn indices are computed on ``device`` with the operations that build
    the scheduler's ``timesteps`` / ``sigmas`` tables (bit for bit), so no index is read back on
    the host. The divisor is a device tensor: CUDA turns a division by a Python number into a
    multiplication by its reciprocal, which can round differently from the CPU-built table.
    """
    steps, shift = scheduler.config.num_train_timesteps, scheduler.config.shift
    u = torch.rand(n, generator=generator, device=device)
    index = (u * steps).long().clamp_max(steps - 1)
    sigmas = (steps - index).float() / torch.full((), steps, dtype=torch.float32, device=device)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return sigmas * steps, sigmas


def flow_matching_loss(prediction: Tensor, target: Tensor) -> Tensor:
    per_sample = ((prediction.float() - target.float()) ** 2).reshape(len(target), -1).mean(1)
    return per_sample.mean()


def sampling_scheduler(num_train_timesteps: int, flow_shift: float) -> DPMSolverMultistepScheduler:
    """SANA's inference scheduler (diffusers ``convert_sana_to_diffusers.py``, ``flow-dpm_solver``)."""
    return DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        flow_shift=flow_shift,
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
    )
