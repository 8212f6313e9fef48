"""OpenUni flow matching (``OpenUniInternVL3SANAHF.diff_loss``), the sampler and the target layout.

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


def sample_timesteps(scheduler: FlowMatchEulerDiscreteScheduler, n: int, generator: torch.Generator | None,
                     device: torch.device) -> tuple[Tensor, Tensor]:
    """Discrete training timesteps and their sigmas, uniform over the scheduler's grid."""
    u = torch.rand(n, generator=generator, device=device)
    index = (u * scheduler.config.num_train_timesteps).long().cpu()
    return scheduler.timesteps[index].to(device), scheduler.sigmas[index].to(device)


def flow_matching_loss(prediction: Tensor, target: Tensor) -> Tensor:
    per_sample = ((prediction.float() - target.float()) ** 2).reshape(len(target), -1).mean(1)
    return per_sample.mean()


def sampling_scheduler(num_train_timesteps: int, flow_shift: float) -> DPMSolverMultistepScheduler:
    """SANA's inference scheduler (diffusers ``convert_sana_to_diffusers.py``, ``flow-dpm_solver``)."""
    return DPMSolverMultistepScheduler(num_train_timesteps=num_train_timesteps, flow_shift=flow_shift,
                                       use_flow_sigmas=True, prediction_type="flow_prediction")


def latent_patches(latents: Tensor, patch: int) -> Tensor:
    """[B, C, H, W] → [B, (H/p)(W/p), p·p·C]: row n = i·(W/p) + j is latent block (i, j), laid out (dy, dx, c).

    The ``V_enc`` token n covers the same image region: the ViT sees the target resized to its
    input (e.g. 512 → 448 px), token (i, j) after the 2×2 pixel shuffle spans ViT patches
    2i…2i+1 × 2j…2j+1, i.e. the (i, j) cell of a 16×16 grid over the image, and the DC-AE latent
    (factor 32) of a 512 px image has one pixel per such cell (p = 1), of a 1024 px image 2×2 (p = 2).
    """
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)
