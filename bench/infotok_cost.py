"""What does the InfoTok regularizer cost next to the model it regularizes?

Forward+backward time and peak memory of the whole regularizer (both branches, mode csa) at
Show-o2 1.5B's sizes (729 tokens x 1536 wide, batch 8 per branch, vocabulary 151,665, 2x2
patches of 16 Wan latent channels), against ONE `transformers` Qwen2 decoder layer at
Qwen2.5-1.5B's dims over the same visual tokens (the LLM has 28 such layers), measured in the
same run. Each measurement runs in its own process so peak memory is its own.

    python bench/infotok_cost.py                       # CPU, float32, the real sizes
    python bench/infotok_cost.py --device cuda --dtype bf16
    python bench/infotok_cost.py --smoke               # seconds: tiny sizes, 1 rep (a run check)

``--smoke`` shrinks the defaults (batch 2, 16 tokens x 48 wide, vocabulary 1,000, 8 answer
tokens, 1 rep); the test suite runs it so the bench cannot rot. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import in_fresh_process, parse_args, time_and_peak  # noqa: E402
from pipeline.infotok import InfoTokConfig, InfoTokDims, InfoTokRegularizer  # noqa: E402

SMOKE = {"batch": 2, "tokens": 16, "width": 48, "vocab": 1000, "answer_len": 8, "reps": 1}
QWEN25_15B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    max_position_embeddings=32768,
)


def _build_regularizer(args, device, dtype):
    dims = InfoTokDims(
        token_dim=args.width,
        text_dim=args.width,
        vocab_size=args.vocab,
        latent_patch_dim=args.patch_dim,
    )
    module = InfoTokRegularizer(InfoTokConfig(mode=args.mode), dims).to(device, dtype)
    b, n, w = args.batch, args.tokens, args.width
    inputs = {
        "z_u": torch.randn(b, n, w, device=device, dtype=dtype, requires_grad=True),
        "z_g": torch.randn(b, n, w, device=device, dtype=dtype, requires_grad=True),
        "text_u": torch.randn(b, w, device=device, dtype=dtype),
        "text_g": torch.randn(b, w, device=device, dtype=dtype),
        "answer_ids": torch.randint(0, args.vocab, (b, args.answer_len), device=device),
        "answer_mask": torch.ones(b, args.answer_len, dtype=torch.bool, device=device),
        "target_patches": torch.randn(b, n, args.patch_dim, device=device, dtype=dtype),
    }
    return lambda: module(**inputs).total, module


def _build_qwen2_layer(args, device, dtype):
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RotaryEmbedding

    config = Qwen2Config(**{**QWEN25_15B, "hidden_size": args.width}, attn_implementation="sdpa")
    layer = Qwen2DecoderLayer(config, layer_idx=0).to(device, dtype)
    rotary = Qwen2RotaryEmbedding(config).to(device)
    # Both branches' visual tokens, as the LLM sees them: 2 x batch sequences of `tokens` tokens.
    x = torch.randn(
        2 * args.batch, args.tokens, args.width, device=device, dtype=dtype, requires_grad=True
    )
    positions = torch.arange(args.tokens, device=device)[None].expand(x.shape[0], -1)
    rope = rotary(x, positions)
    return lambda: layer(x, position_embeddings=rope).float().square().mean(), layer


def _measure(kind: str, args) -> tuple[str, float, int, int]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    device, dtype = (
        torch.device(args.device),
        {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
    )
    step, module = (_build_regularizer if kind == "regularizer" else _build_qwen2_layer)(
        args, device, dtype
    )

    def run() -> None:
        module.zero_grad(set_to_none=True)
        step().backward()

    seconds, peak, _ = time_and_peak(run, args.reps, device)
    return kind, seconds, peak, sum(p.numel() for p in module.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8, help="samples per branch")
    parser.add_argument(
        "--tokens", type=int, default=729, help="visual tokens per image (27x27 at 432 px)"
    )
    parser.add_argument(
        "--width", type=int, default=1536, help="token width D (Qwen2.5-1.5B hidden size)"
    )
    parser.add_argument(
        "--vocab", type=int, default=151_665, help="answer vocabulary (Qwen2.5 tokenizer)"
    )
    parser.add_argument("--answer-len", type=int, default=64, help="answer tokens per I2T sample")
    parser.add_argument(
        "--patch-dim", type=int, default=64, help="latent patch size (16 channels x 2 x 2)"
    )
    parser.add_argument("--mode", default="csa", choices=["cs", "csa"])
    parser.add_argument(
        "--reps", type=int, default=3, help="timed forward+backward passes (median)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parse_args(parser, SMOKE)

    results = {}
    for kind in ("qwen2_layer", "regularizer"):
        name, seconds, peak, params = in_fresh_process(_measure, kind, args)
        results[name] = (seconds, peak, params)

    print(
        f"device={args.device} dtype={args.dtype} batch={args.batch}/branch tokens={args.tokens} "
        f"width={args.width} vocab={args.vocab} answer_len={args.answer_len} mode={args.mode}"
    )
    print(f"{'component':<24}{'fwd+bwd (s)':>14}{'peak mem (MiB)':>17}{'params (M)':>13}")
    for name, (seconds, peak, params) in results.items():
        print(f"{name:<24}{seconds:>14.3f}{peak / 2**20:>17.1f}{params / 1e6:>13.2f}")
    (t_reg, m_reg, _), (t_layer, m_layer, _) = results["regularizer"], results["qwen2_layer"]
    print(
        f"ratio regularizer / one Qwen2 layer: time {t_reg / t_layer:.3f}x, peak memory {m_reg / m_layer:.3f}x "
        f"(goal: both < 1; the LLM has 28 layers)"
    )


if __name__ == "__main__":
    main()
