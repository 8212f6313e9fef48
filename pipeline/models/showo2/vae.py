"""Show-o2's Wan2.1 VAE on images: diffusers' ``AutoencoderKLWan`` with a single-frame fast path.

Show-o2 encodes and decodes images as one-frame videos. A causal 3-D convolution pads its input
with ``k_t − 1`` zero frames in front, so on one frame every temporal tap of its kernel but the
last multiplies zeros: the single output frame is the 2-D convolution of the frame with the
kernel's last temporal slice. ``single_frame_fast_path`` makes the VAE's convolutions compute it
that way (same weights and keys; the same numbers up to float rounding) and its RMS norms reduce
with a cheaper kernel; videos and cached chunks take diffusers' own path. ``bench/wan_vae.py``
measures the gain.
"""

from __future__ import annotations

import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm
from torch import Tensor


class SingleFrameCausalConv3d(WanCausalConv3d):
    """A ``WanCausalConv3d`` that convolves a lone uncached frame in 2-D."""

    def forward(self, x: Tensor, cache_x: Tensor | None = None) -> Tensor:
        zero_history = self._padding[4] == self.kernel_size[0] - 1 and self.dilation[0] == 1
        if x.shape[2] != 1 or cache_x is not None or not zero_history:
            return super().forward(x, cache_x)
        frame = F.pad(x[:, :, 0], self._padding[:4])
        out = F.conv2d(
            frame,
            self.weight[:, :, -1],
            self.bias,
            self.stride[1:],
            0,
            self.dilation[1:],
            self.groups,
        )
        return out[:, :, None]


class SumOfSquaresRMSNorm(WanRMS_norm):
    """A ``WanRMS_norm`` whose L2 norm is a sum of squares (``F.normalize``'s strided channel
    reduction is about 1.7 times as slow on CPU); the same formula, in fp32 for half precisions."""

    def forward(self, x: Tensor) -> Tensor:
        values = x.float() if x.element_size() < 4 else x
        norm = (
            values.square()
            .sum(1 if self.channel_first else -1, keepdim=True)
            .sqrt()
            .clamp_min(1e-12)
        )
        return (values / norm).to(x.dtype) * self.scale * self.gamma + self.bias


FAST_CLASSES = {WanCausalConv3d: SingleFrameCausalConv3d, WanRMS_norm: SumOfSquaresRMSNorm}


def single_frame_fast_path(vae: AutoencoderKLWan) -> AutoencoderKLWan:
    """``vae`` itself, its causal convolutions and RMS norms switched to the fast classes in place."""
    for module in vae.modules():
        fast = FAST_CLASSES.get(type(module))
        if fast is not None:
            module.__class__ = fast
    return vae
