"""The frozen KL-16 VAE of MAR/Harmon as a ``diffusers`` ``AutoencoderKL``.

The released ``kl16.ckpt`` (``{"model": state}``) uses the LDM ``AutoencoderKL`` layout
(``src/models/mar/vae.py``: ``ch=128``, ``ch_mult=(1, 1, 2, 2, 4)``, two ResNet blocks per level,
single-head attention after each block of the 16×16 level and in both mid blocks, no attention in
the decoder's up path, ``quant_conv`` / ``post_quant_conv``). That is ``AutoencoderKL`` with
``AttnDownEncoderBlock2D`` as its last down block; :func:`ldm_to_diffusers` renames the keys.
Latents are the posterior mode times ``scaling_factor`` (0.2325).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from pipeline.config import ConfigError, to_dict
from pipeline.models.harmon.config import VAEConfig
from pipeline.models.common.weights import load_strict, read_weight_file

_RESNET_PARTS = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTN_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def kl16_vae(cfg: VAEConfig) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * (levels - 1) + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        act_fn="silu",
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
    )


def _ldm_key(key: str, levels: int) -> str:
    """One LDM VAE key in diffusers naming; keys of other layouts come back unchanged."""
    m = re.fullmatch(
        r"(encoder|decoder)\.(down|up)\.(\d+)\.block\.(\d+)\.(\w+)\.(weight|bias)", key
    )
    if m and m.group(5) in _RESNET_PARTS:
        side, way, level, block, part, kind = m.groups()
        index = int(level) if way == "down" else levels - 1 - int(level)
        return f"{side}.{way}_blocks.{index}.resnets.{block}.{_RESNET_PARTS[part]}.{kind}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.attn\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m and m.group(3) in _ATTN_PARTS:
        level, block, part, kind = m.groups()
        return f"encoder.down_blocks.{level}.attentions.{block}.{_ATTN_PARTS[part]}.{kind}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)
    if m and m.group(3) in _RESNET_PARTS:
        side, block, part, kind = m.groups()
        return f"{side}.mid_block.resnets.{int(block) - 1}.{_RESNET_PARTS[part]}.{kind}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
    if m and m.group(2) in _ATTN_PARTS:
        side, part, kind = m.groups()
        return f"{side}.mid_block.attentions.0.{_ATTN_PARTS[part]}.{kind}"
    return re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)


def ldm_to_diffusers(state: dict[str, torch.Tensor], levels: int = 5) -> dict[str, torch.Tensor]:
    """Rename an LDM-layout VAE state dict to ``AutoencoderKL`` keys; 1×1 attention convs become linears."""
    out = {}
    for key, value in state.items():
        new = _ldm_key(key, levels)
        is_attn = ".attentions." in new and new.endswith(".weight") and "group_norm" not in new
        out[new] = value[:, :, 0, 0] if is_attn and value.dim() == 4 else value
    return out


def unwrap_state(obj: object) -> dict[str, torch.Tensor]:
    """A training checkpoint's state dict: ``{"model": ...}`` / ``{"state_dict": ...}`` or the dict itself."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                return obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"expected a state dict, got {type(obj).__name__}")
    return obj


def load_vae_state(
    vae: AutoencoderKL, state: dict[str, torch.Tensor], source: str
) -> AutoencoderKL:
    """Load an LDM- or diffusers-layout state into ``vae``, strictly (LDM training-loss keys are skipped)."""
    state = {k: v for k, v in state.items() if not k.startswith("loss.")}
    load_strict(vae, ldm_to_diffusers(state, len(vae.config.block_out_channels)), source=source)
    return vae.requires_grad_(False).eval()


def load_vae(source: str | Path, cfg: VAEConfig) -> AutoencoderKL:
    """The frozen VAE from ``kl16.ckpt`` (or any weight file) or a diffusers ``AutoencoderKL`` directory."""
    source = Path(source)
    if source.is_dir() and (source / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(
            str(source), local_files_only=True, low_cpu_mem_usage=False
        )
        expected = {k: v for k, v in to_dict(cfg).items() if k != "scaling_factor"}
        found = {
            k: (list(vae.config[k]) if k == "block_out_channels" else vae.config[k])
            for k in expected
        }
        if found != expected:
            raise ConfigError(f"VAE {source} has {found}, the model expects {expected}")
        return vae.requires_grad_(False).eval()
    if not source.is_file():
        raise FileNotFoundError(
            f"no VAE at {source}: pass vae_path (kl16.ckpt or a diffusers AutoencoderKL directory)"
        )
    return load_vae_state(kl16_vae(cfg), unwrap_state(read_weight_file(source)), str(source))
