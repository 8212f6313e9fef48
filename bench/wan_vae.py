"""What does the single-frame fast path save on Show-o2's Wan VAE? Stock diffusers against it, one run.

Show-o2 passes images through the Wan2.1 video VAE as one-frame videos (``pipeline/models/showo2/vae.py``).
Two VAEs with the same random weights, diffusers' own classes and the fast path, each in its own
process: median time of an encode (as every training step does), a decode (as generation does) and
an autoencoder training step (encode, decode, backward; as ``ablate`` trains the tiny VAE).

    python bench/wan_vae.py [--preset tiny|released] [--batch N] [--reps 5] [--device cpu|cuda]
    python bench/wan_vae.py --smoke    # seconds: preset tiny, batch 1, 1 rep (a run check)

``tiny``: the tiny recipe's VAE on 64 px scenes (batch 32, a pretraining step's images).
``released``: Wan2.1's dimensions at Show-o2's 432 px (batch 2).
``--smoke``: the test suite runs it so the bench cannot rot; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import in_fresh_process, parse_args, time_and_peak  # noqa: E402
from pipeline.config import to_dict  # noqa: E402
from pipeline.models.showo2.config import showo2_config  # noqa: E402
from pipeline.models.showo2.vae import single_frame_fast_path  # noqa: E402

SETTINGS = {"tiny": ("tiny", 32), "released": ("1.5b", 2)}


def _measure(fast: bool, args: argparse.Namespace) -> dict[str, float]:
    preset, default_batch = SETTINGS[args.preset]
    config = showo2_config(preset)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(**to_dict(config.vae)).to(dev)
    if fast:
        single_frame_fast_path(vae)
    size = config.image_size
    x = torch.rand(args.batch or default_batch, 3, 1, size, size, device=dev) * 2 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean

    def encode() -> None:
        with torch.no_grad():
            vae.encode(x)

    def decode() -> None:
        with torch.no_grad():
            vae.decode(z)

    def train_step() -> None:
        loss = (vae.decode(vae.encode(x).latent_dist.mean).sample - x).square().mean()
        loss.backward()
        vae.zero_grad(set_to_none=True)

    return {
        name: time_and_peak(fn, args.reps, dev)[0]
        for name, fn in (("encode", encode), ("decode", decode), ("train step", train_step))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=SETTINGS, default="tiny")
    parser.add_argument(
        "--batch", type=int, default=None, help="images per call (default: see above)"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed calls per case (median)")
    parser.add_argument("--device", default="cpu")
    args = parse_args(parser, {"preset": "tiny", "batch": 1, "reps": 1})
    stock = in_fresh_process(_measure, False, args)
    fast = in_fresh_process(_measure, True, args)
    preset, default_batch = SETTINGS[args.preset]
    print(
        f"Wan VAE ({args.preset}: preset {preset}, {showo2_config(preset).image_size} px, "
        f"batch {args.batch or default_batch}), device={args.device}, threads={torch.get_num_threads()}"
    )
    print(f"{'call':<12}{'stock (ms)':>12}{'fast path (ms)':>16}{'speed-up':>10}")
    for name, seconds in stock.items():
        print(
            f"{name:<12}{seconds * 1e3:>12.1f}{fast[name] * 1e3:>16.1f}{seconds / fast[name]:>10.2f}x"
        )


if __name__ == "__main__":
    main()
