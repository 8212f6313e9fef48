"""What does InfoTok add to a training step? csa and cs against off, measured in one run.

A small Show-o2 (the real classes: Qwen2 LLM 4 x 256, SigLIP layers, flow head, Wan VAE) at
realistic token counts: 432 px images -> 729 visual tokens, Qwen2.5's 151,669-row vocabulary,
2 I2T + 2 T2I samples per step. Each mode runs in its own process (forward, backward, AdamW
step), reporting the median step time and the peak memory of the training steps.

    python bench/train_step.py [--steps 6] [--device cpu|cuda] [--dtype fp32|bf16] [--smoke]

``--smoke``: seconds-long, the same model at 64 px (16 visual tokens) with the tiny tokenizer's
vocabulary, 1 timed step per mode; checks the bench runs (the test suite does), not the figures.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import in_fresh_process, parse_args, time_and_peak  # noqa: E402
from pipeline.infotok import InfoTokConfig  # noqa: E402
from pipeline.models import ModelConfig, build_model  # noqa: E402
from pipeline.models.common.presets import deep_merge  # noqa: E402
from pipeline.models.common.tiny_tokenizer import make_tokenizer  # noqa: E402
from pipeline.objective import wrap_adapter  # noqa: E402

SMALL_SHOWO2 = {
    "llm": {
        "vocab_size": 151_669,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "semantic": {
        "hidden_size": 192,
        "intermediate_size": 384,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_positions": 729,
    },
    "flow_head": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # The tiny preset's VAE at the released 8x spatial factor: 432 px -> 54x54 latents, 729 tokens.
    "vae": {
        "base_dim": 8,
        "num_res_blocks": 1,
        "dim_mult": [1, 2, 4, 4],
        "temperal_downsample": [False, True, True],
    },
    "image_size": 432,
    "max_seq_len": 1024,
}
SMOKE_SHOWO2 = deep_merge(
    SMALL_SHOWO2, {"llm": {"vocab_size": None}, "semantic": {"num_positions": 16}, "image_size": 64}
)


def _samples(n: int, task: str) -> list[dict]:
    rng = random.Random(n)
    out = []
    for i in range(n):
        image = Image.new("RGB", (480, 432), tuple(rng.randrange(256) for _ in range(3)))
        ImageDraw.Draw(image).ellipse((40, 40, 300, 260), fill=(200, 30, 30))
        if task == "i2t":
            out.append(
                {
                    "task": "i2t",
                    "image": image,
                    "__key__": f"u{i}",
                    "messages": [
                        {"role": "user", "content": "<image>\ndescribe this picture in detail"},
                        {
                            "role": "assistant",
                            "content": "a red circle on a blue square near the top left " * 4,
                        },
                    ],
                }
            )
        else:
            out.append(
                {
                    "task": "t2i",
                    "image": image,
                    "__key__": f"g{i}",
                    "prompt": "a photo of a red circle on the left of a green triangle",
                }
            )
    return out


def _measure(
    mode: str, args: argparse.Namespace, tokenizer: str
) -> tuple[str, float, int, int, int, dict[str, int]]:
    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    options = SMOKE_SHOWO2 if args.smoke else SMALL_SHOWO2
    adapter = build_model(
        ModelConfig(family="showo2", preset="tiny", tokenizer_path=tokenizer, options=options)
    )
    sizes = {"tokens": adapter.config.num_image_tokens, "vocab": adapter.vocab_size}
    model = wrap_adapter(adapter, InfoTokConfig(mode=mode, gather_negatives=False)).to(dev, dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = adapter.collate([adapter.processor(s) for s in _samples(2, "i2t") + _samples(2, "t2i")])
    batch = {
        k: v.to(dev, dtype if v.is_floating_point() else None) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
    generator = torch.Generator(device=dev).manual_seed(0)

    def step() -> int | torch.Tensor:
        loss, _, tokens = model(batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return tokens

    seconds, peak, tokens = time_and_peak(step, args.steps, dev)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return mode, seconds, peak, int(tokens), params, sizes


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=6, help="timed steps per mode (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parse_args(parser, {"steps": 1})
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = str(make_tokenizer(Path(tmp) / "tokenizer"))
        results = {}
        for mode in ("off", "cs", "csa"):
            name, *result, sizes = in_fresh_process(_measure, mode, args, tokenizer)
            results[name] = tuple(result)
    print(
        f"small Show-o2, {sizes['tokens']} visual tokens/image, vocab {sizes['vocab']:,}, "
        f"2 I2T + 2 T2I per step, device={args.device} dtype={args.dtype}"
    )
    print(
        f"{'mode':<6}{'step (s)':>10}{'tokens/s':>11}{'peak mem (MiB)':>16}{'trained params (M)':>20}"
        f"{'time vs off':>13}{'memory vs off':>15}"
    )
    off_time, off_peak = results["off"][0], results["off"][1]
    for mode, (seconds, peak, tokens, params) in results.items():
        print(
            f"{mode:<6}{seconds:>10.3f}{tokens / seconds:>11.0f}{peak / 2**20:>16.1f}{params / 1e6:>20.2f}"
            f"{seconds / off_time:>13.3f}{peak / off_peak:>15.3f}"
        )
    print("targets: InfoTok <= 1.10x step time and <= 1.05x peak memory of off")


if __name__ == "__main__":
    main()
