"""DeepSpeed checkpoint -> a model directory in the adapter's ``from_pretrained`` layout.

    python -m pipeline.export --checkpoint RUN_DIR [--step N] --output DIR

The ZeRO-2 partitions are consolidated to fp32 (DeepSpeed's ``zero_to_fp32``), the InfoTok heads,
decoders and text projections (``regularizer.*``) are dropped, and the adapter writes its own
released layout (safetensors), so the family's code and ``from_pretrained`` read it directly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.checkpoint import CHECKPOINT_DIR, locate
from pipeline.config import ConfigError
from pipeline.consolidate import consolidate, load_exactly
from pipeline.models import build_model


def export(checkpoint: Path, output: Path, step: int | None = None) -> dict[str, int]:
    """Write the adapter of ``checkpoint`` (latest, or ``step``) to ``output``; returns counts."""
    ckpt = consolidate(*locate(checkpoint, step))
    adapter = build_model(ckpt.config.model)
    load_exactly(adapter, ckpt.adapter_state, f"{ckpt.source} ({ckpt.config.model.family} adapter)")
    adapter.save_pretrained(output)
    return {
        "kept": len(ckpt.adapter_state),
        "dropped": len(ckpt.regularizer_state),
        "step": ckpt.step,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help=f"run directory, its {CHECKPOINT_DIR}/ directory, or one step_* checkpoint",
    )
    parser.add_argument("--step", type=int, help="export this step instead of the latest")
    parser.add_argument("--output", required=True, type=Path, help="model directory to write")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.output, args.step)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(
        f"exported step {summary['step']} to {args.output}: {summary['kept']} model tensors kept, "
        f"{summary['dropped']} InfoTok tensors dropped"
    )


if __name__ == "__main__":
    main()
