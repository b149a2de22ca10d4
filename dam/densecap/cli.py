"""`dam densecap`: dense captions of an image or a folder, or open-world detection of text queries.

    dam densecap --input photos/ --output out/ --fcln runs/fcln/final                 # FCLN boxes, DAM captions
    dam densecap --input photos/ --output out/ --proposer sam --sam-checkpoint sam_vit_h_4b8939.pth
    dam densecap --input photos/ --output out/ --fcln runs/fcln/final --captioner fcln  # DenseCap itself
    dam densecap --input photos/ --output out/ --fcln runs/fcln/final --query "head of a giraffe"

Writes OUTPUT/<relative path>.json and .drawn.jpg per image and OUTPUT/index.html (the viewer);
a rerun skips images already done. With --query, scores every region of every image by the
captioner's log-probability of the query and prints (and writes to OUTPUT/query_results.json)
the best boxes over the folder. Images that cannot be read are skipped with a warning; the
exit status is then 1 (EXIT_SOME_FAILED), after the other images are done. Registered by dam.cli.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dam.commandline import int_at_least
from dam.errors import DamInputError

EXIT_SOME_FAILED = 1
"""Exit status when some images could not be read (the others were processed)."""
DEFAULT_TOP_K = 10


def add_densecap_parser(subparsers: Any, common: argparse.ArgumentParser) -> None:
    """Register `densecap` on the `dam` command's subparsers."""
    parser = subparsers.add_parser(
        "densecap",
        parents=[common],
        help="dense captions of an image or a folder (FCLN or SAM boxes, FCLN or DAM captions), or text queries",
        description=(
            "Propose regions (FCLN boxes or SAM masks) in every image of a folder, caption them (FCLN's LSTM or "
            "DAM), and write one JSON per image, a picture with the regions and captions drawn, and a static "
            "viewer (index.html). Resumable: images whose JSON exists are skipped. With --query, print the "
            "regions of the whole folder that best match the text instead."
        ),
    )
    parser.add_argument("--input", required=True, metavar="IMAGE|DIR", help="an image, or a folder searched recursively")
    parser.add_argument("--output", required=True, metavar="DIR", help="results folder (JSON, drawn images, index.html)")
    parser.add_argument(
        "--proposer", choices=("fcln", "sam"),
        help="where regions come from (default: fcln when --fcln is given, else sam with --sam-checkpoint)",
    )
    parser.add_argument(
        "--captioner", choices=("fcln", "dam"), default="dam",
        help="who captions (and, with --query, scores) the regions (default: dam)",
    )
    parser.add_argument("--max-regions", type=int_at_least(1), default=30, metavar="N", help="regions per image (default 30)")
    parser.add_argument("--fcln", metavar="PATH", help="a trained FCLN folder (FclnModel.save_pretrained)")
    parser.add_argument("--model", metavar="DAM_PATH", help="DAM checkpoint folder (default: the built-in ShapesDLC model)")
    parser.add_argument(
        "--query", action="append", metavar="TEXT",
        help="open-world detection: the best regions for this text over the folder (repeatable)",
    )
    parser.add_argument("--top-k", type=int_at_least(1), metavar="K",
                        help=f"with --query: hits printed per query (default {DEFAULT_TOP_K})")
    parser.add_argument("--json", action="store_true", help="with --query: print the results as one JSON object")
    parser.add_argument("--overwrite", action="store_true", help="caption every image again, even those already done")
    sam = parser.add_argument_group(
        "segment-anything (SAM proposals, or masks of FCLN boxes for DAM; the masks are stored and drawn)"
    )
    sam.add_argument("--sam-checkpoint", metavar="PTH", help="SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
    sam.add_argument("--sam-model-type", default="vit_h", metavar="TYPE", help="vit_h (default), vit_l or vit_b")
    sam.add_argument("--sam-points-per-side", type=int_at_least(1), default=32, metavar="N",
                     help="point grid of the automatic mask generator (default 32)")
    sam.add_argument("--sam-pred-iou-thresh", type=float, default=0.88, metavar="T", help="default 0.88")
    sam.add_argument("--sam-stability-thresh", type=float, default=0.95, metavar="T", help="default 0.95")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    runtime.add_argument("--dtype", help="DAM weights: float32, bfloat16 or float16 (default: float32)")
    runtime.add_argument("--batch-size", type=int_at_least(1), default=32, metavar="N",
                         help="regions DAM captions (or scores) together (default 32)")
    runtime.add_argument("--image-batch", type=int_at_least(1), default=8, metavar="N",
                         help="images proposed and captioned per step (default 8)")
    runtime.add_argument(
        "--threads", type=int_at_least(1), metavar="N",
        help="CPU threads for torch (default: torch's choice); 1 is fastest for small models on a busy CPU",
    )
    runtime.add_argument("--max-new-tokens", type=int_at_least(1), metavar="N", help="DAM caption length limit in tokens")
    parser.set_defaults(handler=run_densecap_command)


def _check_args(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot express, checked before any model loads."""
    if args.proposer is None:
        if args.fcln is not None:
            args.proposer = "fcln"
        elif args.sam_checkpoint is not None:
            args.proposer = "sam"
        else:
            raise DamInputError(
                "no region proposer: pass --fcln PATH (a trained FCLN folder) or --proposer sam with "
                "--sam-checkpoint sam_vit_h_4b8939.pth"
            )
    if (args.proposer == "fcln" or args.captioner == "fcln") and args.fcln is None:
        raise DamInputError(
            f"--{'proposer' if args.proposer == 'fcln' else 'captioner'} fcln needs --fcln PATH: a trained FCLN folder "
            "(e.g. runs/fcln_tiny_shapes/final from `dam-train fcln --config configs/train/fcln/tiny_shapes.yaml`)"
        )
    if args.fcln is not None and not (Path(args.fcln) / "config.json").is_file():
        raise DamInputError(f"--fcln {args.fcln!r} is not an FCLN folder (no config.json); pass the folder written by "
                            "FclnModel.save_pretrained (a training run's final/)")
    if args.proposer == "sam" and args.sam_checkpoint is None:
        raise DamInputError("--proposer sam needs --sam-checkpoint PTH (e.g. sam_vit_h_4b8939.pth)")
    if args.sam_checkpoint is not None and args.proposer == "fcln" and args.captioner == "fcln":
        raise DamInputError(
            "--sam-checkpoint is unused with --proposer fcln --captioner fcln (SAM gives proposals with --proposer "
            "sam, or masks of the FCLN boxes for --captioner dam); drop it, or pick one of those"
        )
    if args.sam_checkpoint is not None and not Path(args.sam_checkpoint).is_file():
        raise DamInputError(
            f"SAM checkpoint {args.sam_checkpoint!r} does not exist; download an official one "
            "(sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth) and pass its path"
        )
    _check_paths(args)
    _check_query_options(args)


def _check_paths(args: argparse.Namespace) -> None:
    if not Path(args.input).exists():
        raise DamInputError(f"--input {args.input!r} does not exist; pass an image file or a folder of images")
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        raise DamInputError(f"--output {args.output!r} is a file, not a folder; pass a folder for the results "
                            "(it is created when missing)")


def _check_query_options(args: argparse.Namespace) -> None:
    # --top-k has no argparse default, so that giving it without --query can be told apart.
    for option, given in (("--json", args.json), ("--top-k", args.top_k is not None)):
        if given and not args.query:
            raise DamInputError(f"{option} is for --query results; drop it, or add --query TEXT")
    if args.query and any(not query.strip() for query in args.query):
        raise DamInputError("--query is blank; give the text to look for, e.g. --query \"head of a giraffe\"")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def build_components(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(proposer, captioner, query scorer) as the options ask; loads the models."""
    from dam.densecap.captioners import DamCaptioner, FclnCaptioner
    from dam.densecap.proposers import FclnProposer, SamProposer
    from dam.densecap.scoring import DamQueryScorer, FclnQueryScorer

    device = args.device or _default_device()
    fcln = None
    if args.fcln is not None:
        from dam.fcln import FclnModel

        try:
            fcln = FclnModel.from_pretrained(args.fcln).to(device).eval()
        except OSError as error:
            raise DamInputError(f"could not load an FCLN from --fcln {args.fcln!r}: {error}") from error
    prompter = None
    if args.sam_checkpoint is not None:
        from dam.sam import SamPrompter

        prompter = SamPrompter.from_checkpoint(args.sam_checkpoint, args.sam_model_type, device=device)
    if args.proposer == "fcln":
        proposer: Any = FclnProposer(fcln)
    else:
        proposer = SamProposer(
            prompter.predictor.model, points_per_side=args.sam_points_per_side,
            pred_iou_thresh=args.sam_pred_iou_thresh, stability_score_thresh=args.sam_stability_thresh,
        )
    if args.captioner == "fcln":
        return proposer, FclnCaptioner(fcln), FclnQueryScorer(fcln)
    from dam.describe import DescribeAnything

    describer = DescribeAnything.from_pretrained(args.model, device=device, dtype=args.dtype)
    generate_kwargs: dict[str, Any] = {"do_sample": False}
    if args.max_new_tokens is not None:
        generate_kwargs["max_new_tokens"] = args.max_new_tokens
    # SAM turns FCLN boxes into masks for DAM when a checkpoint is given; else the box is the mask.
    box_masks = prompter if args.proposer == "fcln" else None
    captioner = DamCaptioner(describer, box_masks, batch_size=args.batch_size, **generate_kwargs)
    scorer = DamQueryScorer(describer, box_masks, region_batch_size=max(1, args.batch_size // 4),
                            pair_batch_size=args.batch_size * 2)
    return proposer, captioner, scorer


def _print_hits(result: dict[str, Any]) -> None:
    for entry in result["queries"]:
        for rank, hit in enumerate(entry["hits"], start=1):
            box = " ".join(f"{v:.1f}" for v in hit["box"])
            print(f"{entry['query']}\t{rank}\t{hit['logprob']:.3f}\t{hit['image']}\t{box}")


def run_densecap_command(args: argparse.Namespace) -> int:
    from dam.densecap.runner import QUERY_RESULTS_FILE, DenseCaptioner, run_folder, search_folder

    _check_args(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    proposer, captioner, scorer = build_components(args)
    if args.query:
        result = search_folder(args.query, proposer, scorer, args.input, args.output, max_regions=args.max_regions,
                               image_batch_size=args.image_batch, top_k=args.top_k or DEFAULT_TOP_K)
        if args.json:
            print(json.dumps(result))
        else:
            _print_hits(result)
            # The tally goes to stderr so that stdout holds only the hits (one per line, tab-separated).
            unreadable = f", {len(result['failed'])} unreadable images skipped" if result["failed"] else ""
            print(f"{result['num_pairs']} (region, query) pairs over {result['num_images']} images in "
                  f"{result['seconds']:.1f} s{unreadable}; written to {Path(args.output) / QUERY_RESULTS_FILE}",
                  file=sys.stderr)
        return EXIT_SOME_FAILED if result["failed"] else 0
    stats = run_folder(DenseCaptioner(proposer, captioner, args.max_regions), args.input, args.output,
                       image_batch_size=args.image_batch, overwrite=args.overwrite)
    print(stats.summary())
    if stats.viewer is not None:
        print(f"viewer: {stats.viewer}")
    return EXIT_SOME_FAILED if stats.failed else 0
