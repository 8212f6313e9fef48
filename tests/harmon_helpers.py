"""Test fixtures for the Harmon adapter: the official LDM KL-VAE key layout and LDM-format state dicts."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from pipeline.models.harmon.vae import ldm_to_diffusers


def ldm_vae_keys(ch_mult=(1, 1, 2, 2, 4), ch=128, res_blocks=2) -> list[str]:
    """The parameter names of the official LDM ``AutoencoderKL`` (``src/models/mar/vae.py``)."""

    def resnet(prefix: str, cin: int, cout: int) -> list[str]:
        parts = ["norm1", "conv1", "norm2", "conv2"] + (["nin_shortcut"] if cin != cout else [])
        return [f"{prefix}.{p}.{w}" for p in parts for w in ("weight", "bias")]

    def attn(prefix: str) -> list[str]:
        return [
            f"{prefix}.{p}.{w}"
            for p in ("norm", "q", "k", "v", "proj_out")
            for w in ("weight", "bias")
        ]

    keys = ["encoder.conv_in.weight", "encoder.conv_in.bias"]
    block_in = ch
    for level, mult in enumerate(ch_mult):
        for block in range(res_blocks):
            keys += resnet(f"encoder.down.{level}.block.{block}", block_in, ch * mult)
            block_in = ch * mult
            if level == len(ch_mult) - 1:  # 256 px / 2**4 = 16 = attn_resolutions
                keys += attn(f"encoder.down.{level}.attn.{block}")
        if level != len(ch_mult) - 1:
            keys += [f"encoder.down.{level}.downsample.conv.{w}" for w in ("weight", "bias")]
    for side in ("encoder", "decoder"):
        mid = ch * ch_mult[-1]
        keys += resnet(f"{side}.mid.block_1", mid, mid) + attn(f"{side}.mid.attn_1")
        keys += resnet(f"{side}.mid.block_2", mid, mid)
        keys += [f"{side}.{p}.{w}" for p in ("norm_out", "conv_out") for w in ("weight", "bias")]
    keys += ["decoder.conv_in.weight", "decoder.conv_in.bias"]
    block_in = ch * ch_mult[-1]
    for level in reversed(range(len(ch_mult))):
        for block in range(res_blocks + 1):
            keys += resnet(f"decoder.up.{level}.block.{block}", block_in, ch * ch_mult[level])
            block_in = ch * ch_mult[level]
        if level:
            keys += [f"decoder.up.{level}.upsample.conv.{w}" for w in ("weight", "bias")]
    return keys + [
        f"{c}.{w}" for c in ("quant_conv", "post_quant_conv") for w in ("weight", "bias")
    ]


def ldm_state(
    vae: AutoencoderKL, ch_mult: tuple[int, ...], ch: int, res_blocks: int
) -> dict[str, torch.Tensor]:
    """``vae``'s weights under the official LDM names (as in ``kl16.ckpt``), attention linears as 1×1 convs."""
    target = vae.state_dict()
    out = {}
    for key in ldm_vae_keys(ch_mult, ch, res_blocks):
        value = target[next(iter(ldm_to_diffusers({key: torch.empty(0)}, len(ch_mult))))].clone()
        is_attn_weight = ".attn" in key and key.endswith(".weight") and ".norm." not in key
        out[key] = value[:, :, None, None] if is_attn_weight else value
    return out
