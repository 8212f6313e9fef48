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

from pipeline.checkpoint import CHECKPOINT_DIR, resolve_resume, tag_for
from pipeline.config import ConfigError
from pipeline.models import build_model
from pipeline.train import load_train_config

ADAPTER_PREFIX, REGULARIZER_PREFIX = "adapter.", "regularizer."


def locate(checkpoint: Path, step: int | None) -> tuple[Path, str]:
    """(checkpoints root, tag): the latest one, or the one of ``step``."""
    found = resolve_resume(checkpoint, str(checkpoint))
    if found is None:
        raise FileNotFoundError(f"{checkpoint}: no checkpoint")
    root, tag = found
    if step is not None:
        tag = tag_for(step)
        if not (root / tag).is_dir():
            available = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
            raise FileNotFoundError(f"{root / tag} does not exist (available: {', '.join(available)})")
    return root, tag


def export(checkpoint: Path, output: Path, step: int | None = None) -> dict[str, int]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = locate(checkpoint, step)
    cfg = load_train_config(root / tag / "config.yaml")
    state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    adapter_state = {k.removeprefix(ADAPTER_PREFIX): v for k, v in state.items() if k.startswith(ADAPTER_PREFIX)}
    dropped = [k for k in state if k.startswith(REGULARIZER_PREFIX)]
    unknown = [k for k in state if not k.startswith((ADAPTER_PREFIX, REGULARIZER_PREFIX))]
    if unknown:
        raise ValueError(f"{root / tag}: unexpected keys outside adapter/regularizer: {unknown[:5]}")
    adapter = build_model(cfg.model)
    missing, unexpected = adapter.load_state_dict(adapter_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{root / tag}: checkpoint does not match the {cfg.model.family} adapter: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    adapter.save_pretrained(output)
    return {"kept": len(adapter_state), "dropped": len(dropped), "step": int(tag.removeprefix("step_"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help=f"run directory, its {CHECKPOINT_DIR}/ directory, or one step_* checkpoint")
    parser.add_argument("--step", type=int, help="export this step instead of the latest")
    parser.add_argument("--output", required=True, type=Path, help="model directory to write")
    args = parser.parse_args(argv)
    try:
        summary = export(args.checkpoint, args.output, args.step)
    except (FileNotFoundError, ValueError, ConfigError) as e:
        print(f"export: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"exported step {summary['step']} to {args.output}: {summary['kept']} model tensors kept, "
          f"{summary['dropped']} InfoTok tensors dropped")


if __name__ == "__main__":
    main()
