"""Command line: ``python -m data_prep {shard,verify,stats,synth,encode} ...``.

A thin layer over :mod:`data_prep.commands`: each flag's destination is the keyword argument of
the same name and its default is that of the function's signature.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from data_prep.commands import default_workers, out_of_range, shard, stats, synth, verify
from data_prep.errors import CommandError
from data_prep.scenes import LAYOUTS
from data_prep.schema import TASKS

PROG = "python -m data_prep"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of the usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int(name: str) -> Callable[[str], int]:
    """Parser of the integer argument ``name``, within its ``commands.LIMITS``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        problem = out_of_range(name, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    return parse


def _defaults(function: Callable[..., Any]) -> dict[str, Any]:
    """The default of each argument of ``function`` that has one."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not p.empty}


SHARD_HELP = """\
Turn image-text records into WebDataset shards (DESIGN.md section 3): shard-NNNNNN.tar files,
manifest.json and ledger.jsonl (one line per input record: written to which shard, or skipped
and why). Records from all sources are shuffled together (seeded), so shards mix sources; the
same inputs and seed give byte-identical output whatever --workers is.

source kinds (--source [NAME=]KIND:PATH, repeatable; NAME labels the source in samples/stats):
  jsonl:FILE    one JSON object per line: "image" (path relative to FILE's folder or
                --image-root) plus "messages" or "conversations" (I2T), "question"+"answer"
                (I2T), "prompt" (T2I) or "caption" (task from --task); an optional "meta"
                object is copied into the sample json
  llava:FILE    a LLaVA JSON array: "id", "image", "conversations" with from human/gpt
  folder:DIR    images with sidecars: x.jpg + x.txt (a caption) or x.json (fields as jsonl)
  hf:PATH       a datasets save_to_disk directory or parquet file(s); see --image-column
  wds:PATH      WebDataset tars as published (a directory of *.tar, a quoted glob, or one tar),
                read in place: <key>.jpg|jpeg|png|webp + <key>.txt and/or <key>.json (a
                "prompt", "caption", "text" or --text-column field, or messages/conversations)

Interrupted runs (even kill -9) finish with --resume and give the same result."""


def _add_shard(commands: argparse._SubParsersAction) -> None:
    from data_prep.images import CHECKS, IMAGE_FORMATS

    default = _defaults(shard)
    p = commands.add_parser(
        "shard",
        help="write shards, manifest and ledger from sources",
        description=SHARD_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--source",
        action="append",
        required=True,
        metavar="[NAME=]KIND:PATH",
        dest="sources",
        help="an input; repeat for several (kinds above)",
    )
    p.add_argument(
        "--output",
        required=True,
        type=Path,
        metavar="DIR",
        help="dataset directory to create (must not hold another run's output unless --resume)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default=default["task"],
        help="task of plain-caption records (jsonl 'caption', folder .txt, hf text column); "
        "records with messages/question/prompt fix their own task (default: %(default)s)",
    )
    p.add_argument(
        "--shard-size",
        type=_int("shard_size"),
        default=default["shard_size"],
        metavar="N",
        help="records per shard; skipped records leave a shard slightly smaller (default: %(default)s)",
    )
    p.add_argument(
        "--max-side",
        type=_int("max_side"),
        default=default["max_side"],
        metavar="PX",
        help="downscale images whose longer side exceeds PX, keeping aspect; 0: never "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--min-side",
        type=_int("min_side"),
        default=default["min_side"],
        metavar="PX",
        help="skip images whose shorter side is below PX, reason too_small (default: %(default)s)",
    )
    p.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default=default["image_format"],
        help="stored format: keep (JPEG/PNG/WebP stay, others become PNG), or convert all to "
        "jpg or webp; images that need no change keep their original bytes (default: %(default)s)",
    )
    p.add_argument(
        "--quality",
        type=_int("quality"),
        default=default["quality"],
        metavar="Q",
        help="JPEG/WebP quality, 1-100, for re-encoded images (default: %(default)s)",
    )
    p.add_argument(
        "--check",
        choices=CHECKS,
        default=default["check"],
        help="how images kept byte-for-byte are verified: 'decode' decodes them (any corrupt "
        "data is caught); 'structure' only checks markers, chunk CRCs and sizes, which catches "
        "truncation and runs at I/O speed. Re-encoded images are always decoded "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_int("workers"),
        default=default_workers(),
        metavar="N",
        help="parallel processes, each writing whole shards (default: the CPUs available, %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=default["seed"],
        metavar="S",
        help="seed of the global shuffle (default: %(default)s)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        default=default["resume"],
        help="finish an interrupted run in --output (same sources and flags); a no-op on a finished one",
    )
    p.add_argument(
        "--image-root",
        type=Path,
        default=default["image_root"],
        metavar="DIR",
        help="base folder for relative image paths of jsonl, llava and hf path columns "
        "(default: the source file's folder)",
    )
    p.add_argument(
        "--image-column",
        default=default["image_column"],
        metavar="NAME",
        help="hf sources: the column with the image: datasets Image, bytes, or a file path "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--text-column",
        default=default["text_column"],
        metavar="NAME",
        help="hf sources: a column holding a caption string (task from --task) or a list of "
        "turns; wds sources: the .json field holding the text; default: read the columns (the "
        ".json) like jsonl fields",
    )
    p.add_argument(
        "--take",
        action="append",
        default=[],
        metavar="NAME=N|FRACTION",
        help="keep a sub-sample of source NAME: N records or each with probability FRACTION, "
        "chosen by a hash of --seed, NAME and the record's key (the same whatever the order or "
        "--workers); records left out are never read further and are counted in the manifest, "
        "not listed in the ledger (repeatable, one per source)",
    )
    p.set_defaults(run=shard)


def _add_verify(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "verify",
        help="re-check a dataset directory against its manifest",
        description="Re-read every shard of DIR and check it against manifest.json and ledger.jsonl: "
        "sizes, sha256, sample counts per task, keys, every json parses as a sample and every "
        "image decodes at the size its json states. Prints each problem on its own line and "
        "exits 1 if there is any, 0 if none.",
    )
    p.add_argument("path", type=Path, metavar="DIR", help="a directory written by 'shard'")
    p.add_argument(
        "--workers",
        type=_int("workers"),
        default=default_workers(),
        metavar="N",
        help="shards checked in parallel (default: the CPUs available, %(default)s)",
    )
    p.set_defaults(run=verify)


def _add_stats(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "stats",
        help="print totals, skip reasons and histograms of a dataset directory",
        description="Print the samples per task and per source, the skip reasons, and histograms of "
        "image size and text length of DIR (reads the json members only, not the images).",
    )
    p.add_argument("path", type=Path, metavar="DIR", help="a directory written by 'shard'")
    p.set_defaults(run=stats)


def _add_synth(commands: argparse._SubParsersAction) -> None:
    default = _defaults(synth)
    p = commands.add_parser(
        "synth",
        help="generate the synthetic scenes corpus (a jsonl source)",
        description="Draw N scenes of coloured shapes and write DIR/synth.jsonl + DIR/images/: I2T "
        "question/answer and caption records and T2I prompts in GenEval's categories, each "
        "with its ground truth (shapes, colors, counts, boxes) under 'meta'. Shard it with "
        "--source jsonl:DIR/synth.jsonl. The same seed gives the same files.",
    )
    p.add_argument(
        "--output", required=True, type=Path, metavar="DIR", help="directory to write (created)"
    )
    p.add_argument(
        "--count", required=True, type=_int("count"), metavar="N", help="number of records"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=default["seed"],
        metavar="S",
        help="random seed (default: %(default)s)",
    )
    p.add_argument(
        "--size",
        type=_int("size"),
        default=default["size"],
        metavar="PX",
        help="image side in pixels (default: %(default)s)",
    )
    p.add_argument(
        "--layout",
        choices=LAYOUTS,
        default=default["layout"],
        help="where objects go: 'free' = anywhere, at 0.16-0.26 of the side; 'grid' = centred in the "
        "cells of a 4x4 grid, at 0.8-0.9 of a cell, so that at 64 px each object covers a fixed "
        "2x2 block of 8 px visual tokens (what tiny models learn to draw on a CPU budget; "
        "experiments.ablate uses it) (default: %(default)s)",
    )
    p.set_defaults(run=synth)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Prepare InfoTok training data as WebDataset shards.")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_shard(commands)
    _add_verify(commands)
    _add_stats(commands)
    _add_synth(commands)
    _add_encode(commands)
    return parser


def _add_encode(commands: argparse._SubParsersAction) -> None:
    commands.add_parser(
        "encode",
        help="encode the images once with a recipe's frozen VAE (latent cache; needs pipeline)",
        description="Runs python -m pipeline.encode with the same arguments; see its --help.",
    )


def encode(argv: list[str]) -> NoReturn:
    """``encode`` is the one command that needs the models: the process becomes
    ``python -m pipeline.encode`` (same pid, environment and signals, as srun expects)."""
    os.execv(sys.executable, [sys.executable, "-m", "pipeline.encode", *argv])


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status (0: done; 1: verify found problems)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["encode"]:
        encode(argv[1:])
    args = build_parser().parse_args(argv)
    prefix = f"{PROG} {args.command}: error:"
    try:
        parameters = inspect.signature(args.run).parameters
        result = args.run(**{name: getattr(args, name) for name in parameters})
    except CommandError as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the disk filled up while writing
        hint = "; fix it and rerun with --resume" if args.command == "shard" else ""
        print(f"{prefix} {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        hint = "; rerun with --resume to finish" if args.command == "shard" else ""
        print(f"{PROG} {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
    return 1 if args.run is verify and result else 0
