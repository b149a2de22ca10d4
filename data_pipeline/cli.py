"""`dam-data`: build captioned-region training data in the ``dam.schema`` shard layout.

    dam-data synthetic --num-images 10000 --out data/shapes [--seed 0] [--shard-size 1000]

Every subcommand is resumable: rerunning the same command skips the shards already written.
Progress and logs go to stderr; stdout gets one summary line. Errors the user can fix print one
line ``dam-data: error: ...`` and exit with status 2, as argparse does for bad options.

Subcommands register themselves in :func:`build_parser` with ``set_defaults(handler=...)``
(the SDP stages ``stage1``, ``stage2`` and ``sav`` will join ``synthetic`` there).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dam.commandline import int_at_least, run_command

def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (used as an argparse parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--no-progress", action="store_true", help="no progress bar (e.g. in batch job logs)")
    return common


def _add_synthetic(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "synthetic",
        parents=[common],
        help="render the ShapesDLC synthetic dataset (shapes with exact masks and template captions)",
        description=(
            "Render N ShapesDLC scenes (dam.shapes: 3-5 shapes per 512x512 image) and write one "
            "training row per object: PNG images under DIR/images, parquet shards DIR/shard-*.parquet. "
            "Rerunning the same command resumes: complete shards are skipped."
        ),
    )
    parser.add_argument("--num-images", type=int_at_least(1), required=True, metavar="N", help="number of scenes")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (one dataset per folder)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, metavar="S", help="dataset seed (default 0)")
    parser.add_argument(
        "--shard-size", type=int_at_least(1), default=1000, metavar="K", help="images per parquet shard (default 1000)"
    )
    parser.set_defaults(handler=_run_synthetic)


def _run_synthetic(args: argparse.Namespace) -> int:
    from data_pipeline.synthetic import write_synthetic_dataset

    rows = write_synthetic_dataset(
        args.out, args.num_images, seed=args.seed, shard_size=args.shard_size, progress=not args.no_progress
    )
    print(f"{rows} rows from {args.num_images} images in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``dam-data`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dam-data",
        description="Build detailed-localized-captioning training data (dam.schema parquet shards), resumably.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    _add_synthetic(subparsers, common)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="dam-data: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``dam-data`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    return run_command(build_parser(), argv, _configure_logging, interrupted_hint="; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
