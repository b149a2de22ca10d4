"""`dam-data`: build captioned-region training data in the ``dam.schema`` shard layout.

    dam-data synthetic --num-images 10000 --out data/shapes [--seed 0] [--shard-size 1000]
    dam-data stage1 --config configs/data/stage1_coco.yaml [key.sub=value ...] [--shard I --num-shards N]
    dam-data stage2 --config configs/data/stage2_sa1b.yaml [key.sub=value ...] [--shard I --num-shards N]
    dam-data video --config configs/data/video_sav.yaml [key.sub=value ...] [--shard I --num-shards N]
    dam-data merge --inputs DIR [DIR ...] --out DIR [--allow-partial]
    dam-data stats DIR [--json]

Every subcommand is resumable: rerunning the same command skips the shards already written.
Progress and logs go to stderr; stdout gets one summary line. Errors the user can fix print one
line ``dam-data: error: ...`` and exit with status 2, as argparse does for bad options. A stage
that left shards unwritten because the labeler failed on some regions (errors or timeouts after
every retry) prints its summary, then ``dam-data: error: ... rerun the same command ...``, and
exits with status 1 (EXIT_RETRY).

Subcommands register themselves in :func:`build_parser` with ``set_defaults(handler=...)``
(the SDP stages ``stage1``, ``stage2`` and ``video`` share :func:`_add_stage`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dam.commandline import int_at_least, run_command

EXIT_RETRY = 1
"""A stage left shards for a rerun to retry (transient labeler failures)."""


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
    parser.add_argument(
        "--format",
        choices=("dam", "visual-genome", "coco"),
        default="dam",
        help="dam: training rows (default); visual-genome: images/ + region_descriptions.json for dense "
        "captioning (FCLN, dam-bench densecap); coco: images/ + instances.json, a source for dam-data stage1",
    )
    parser.set_defaults(handler=_run_synthetic)


def _run_synthetic(args: argparse.Namespace) -> int:
    progress = not args.no_progress
    if args.format == "dam":
        from data_pipeline.synthetic import write_synthetic_dataset

        count = write_synthetic_dataset(args.out, args.num_images, seed=args.seed, shard_size=args.shard_size, progress=progress)
        what, layout = "rows", ""
    else:
        from data_pipeline.shapes_layouts import write_shapes_coco, write_shapes_visual_genome

        writer, what, layout = {
            "visual-genome": (write_shapes_visual_genome, "regions", " (Visual Genome layout)"),
            "coco": (write_shapes_coco, "objects", " (COCO instances layout)"),
        }[args.format]
        count = writer(args.out, args.num_images, seed=args.seed, progress=progress)
    print(f"{count} {what} from {args.num_images} images in {args.out}{layout}")
    return 0


def _add_stage(subparsers: Any, common: argparse.ArgumentParser, name: str, help: str, description: str) -> None:
    """A pipeline stage's subcommand: --config, overrides, worker identity (its handler is _run_<name>)."""
    parser = subparsers.add_parser(
        name,
        parents=[common],
        help=help,
        description=(
            f"{description} Rerunning the same command resumes: complete shards are skipped. Shards are split over "
            "workers by --shard/--num-shards, else by RANK/WORLD_SIZE or the SLURM array / task variables."
        ),
    )
    parser.add_argument("--config", required=True, metavar="YAML", help=f"{name} config (see configs/data/)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. output.dir=data/out")
    parser.add_argument("--shard", type=int_at_least(0), metavar="I", help="this process is worker I (of --num-shards)")
    parser.add_argument("--num-shards", type=int_at_least(1), metavar="N", help="number of workers sharing the run")
    parser.set_defaults(handler=_STAGE_HANDLERS[name])


def _add_stage1(subparsers: Any, common: argparse.ArgumentParser) -> None:
    _add_stage(
        subparsers, common, "stage1",
        "caption the regions of a segmentation dataset with a labeler (DLC-SDP stage 1)",
        "Caption every region of a COCO-format, semantic-segmentation or SA-1B source with the configured "
        "labeler; write dam.schema shards + per-shard reports to output.dir.",
    )


def _add_stage2(subparsers: Any, common: argparse.ArgumentParser) -> None:
    _add_stage(
        subparsers, common, "stage2",
        "self-label unlabeled images: OWLv2 boxes, SAM masks, filters, captions (DLC-SDP stage 2, SA-1B)",
        "Detect objects of a vocabulary with OWLv2, segment them with SAM, drop partial objects and low scores, caption "
        "the best two of different classes per image with the labeler (the stage-1 DAM or a VLM) and keep captions "
        "SigLIP agrees with; write dam.schema shards + per-shard reports (counts per filter) to output.dir.",
    )


def _add_video(subparsers: Any, common: argparse.ArgumentParser) -> None:
    _add_stage(
        subparsers, common, "video",
        "caption SA-V masklets from 8 frames each with a video DAM or a VLM (DLC-SDP video data)",
        "Sample frames of every SA-V masklet, drop partial objects, caption each masklet with the labeler; write "
        "dam.schema video rows (video path + frame indices + masks) + per-shard reports to output.dir.",
    )


def _summary(stage: str, summary: Any) -> int:
    """Print a stage's summary line; the exit status (EXIT_RETRY when shards are left for a rerun)."""
    tally = summary.tally
    print(
        f"{stage}: {summary.rows} rows from {tally.units_seen} units in {len(summary.shards_written) + len(summary.shards_skipped)} "
        f"of {summary.num_shards} shards (worker {summary.worker}; {len(summary.shards_skipped)} complete before) in {summary.out_dir}"
    )
    retry = summary.retry_message()
    if retry is None:
        return 0
    print(f"dam-data: error: {retry}", file=sys.stderr)
    return EXIT_RETRY


def _run_stage1(args: argparse.Namespace) -> int:
    from data_pipeline.config import load_stage1_config
    from data_pipeline.sharding import resolve_worker
    from data_pipeline.stage1 import run_stage1

    config = load_stage1_config(args.config, args.overrides)
    worker = resolve_worker(args.shard, args.num_shards)
    return _summary("stage1", run_stage1(config, worker=worker, progress=not args.no_progress))


def _run_stage2(args: argparse.Namespace) -> int:
    from data_pipeline.config import load_stage2_config
    from data_pipeline.sharding import resolve_worker
    from data_pipeline.stage2 import run_stage2

    config = load_stage2_config(args.config, args.overrides)
    worker = resolve_worker(args.shard, args.num_shards)
    return _summary("stage2", run_stage2(config, worker=worker, progress=not args.no_progress))


def _run_video(args: argparse.Namespace) -> int:
    from data_pipeline.config import load_video_config
    from data_pipeline.sharding import resolve_worker
    from data_pipeline.video_stage import run_video_stage

    config = load_video_config(args.config, args.overrides)
    worker = resolve_worker(args.shard, args.num_shards)
    return _summary("video", run_video_stage(config, worker=worker, progress=not args.no_progress))


_STAGE_HANDLERS = {"stage1": _run_stage1, "stage2": _run_stage2, "video": _run_video}


def _add_merge(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "merge",
        parents=[common],
        help="join stage outputs (worker folders) into one dataset folder with manifest.json and report.json",
        description=(
            "Merge stage output folders (or merged datasets) into one dam.schema dataset folder. Refuses incomplete "
            "shards (unless --allow-partial) and row ids that occur twice."
        ),
    )
    parser.add_argument("--inputs", required=True, nargs="+", metavar="DIR", help="stage output folders / merged datasets")
    parser.add_argument("--out", required=True, metavar="DIR", help="the new dataset folder (must not exist, or be empty)")
    parser.add_argument("--allow-partial", action="store_true", help="merge the complete shards of unfinished runs")
    parser.set_defaults(handler=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from data_pipeline.merge import merge_datasets

    summary = merge_datasets(args.inputs, args.out, allow_partial=args.allow_partial, progress=not args.no_progress)
    partial = " (partial: some shards incomplete)" if summary.partial else ""
    print(f"merged {summary.rows} rows in {summary.shards} shards from {summary.inputs} inputs into {summary.out}{partial}")
    return 0


def _add_stats(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "stats",
        parents=[common],
        help="rows, images, sources, caption lengths, top categories and filter counts of a dataset",
        description="Summarise a dataset folder (merged, or a stage output) or one parquet shard.",
    )
    parser.add_argument("path", metavar="DIR", help="dataset folder or parquet file")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON")
    parser.add_argument("--top", type=int_at_least(1), default=10, metavar="K", help="categories to list (default 10)")
    parser.set_defaults(handler=_run_stats)


def _run_stats(args: argparse.Namespace) -> int:
    import json

    from data_pipeline.stats import dataset_stats, format_stats

    stats = dataset_stats(args.path, top=args.top)
    print(json.dumps(stats, indent=2) if args.json else format_stats(stats))
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
    _add_stage1(subparsers, common)
    _add_stage2(subparsers, common)
    _add_video(subparsers, common)
    _add_merge(subparsers, common)
    _add_stats(subparsers, common)
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="dam-data: %(levelname)s: %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The openai client's HTTP layer logs every request at INFO: millions of lines in a labeling run.
    for name in ("httpx", "httpx2", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """Run ``dam-data`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    return run_command(build_parser(), argv, _configure_logging, interrupted_hint="; rerun the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
