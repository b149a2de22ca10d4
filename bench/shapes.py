"""`dam-bench shapes`: per-attribute accuracy of a model on fresh ShapesDLC regions.

    dam-bench shapes --model runs/shapes/final --num-regions 500
    dam-bench shapes --num-regions 100            # the built-in model

Scenes are rendered with a seed no training set uses by default (`--seed 1000003`); every
object of each scene is a region, until `--num-regions`. Each caption is read back with
`dam.shapes.parse_caption` and each of size, color, pattern, shape, position is scored
against the truth, overall and split by the object's size class (the focal crop matters for
small objects). Greedy decoding.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from typing import Any

from dam.describe import DescribeAnything
from dam.errors import DamInputError
from dam.jsonio import write_json_atomic
from dam.shapes import ATTRIBUTES, SIZES, parse_caption, scene

from bench.harness import run_benchmark

logger = logging.getLogger(__name__)

EVAL_SEED = 1_000_003
"""Seed of the evaluation scenes; training sets written by `dam-data synthetic` use small seeds."""


def evaluation_regions(num_regions: int, seed: int = EVAL_SEED) -> tuple[list[tuple[Any, Any]], list[dict[str, str]]]:
    """(image, mask) regions and their true attributes, every object of scenes 0, 1, ... of `seed`."""
    regions, truths = [], []
    index = 0
    while len(regions) < num_regions:
        rendered = scene(seed, index)
        for obj, mask in zip(rendered.objects, rendered.masks):
            if len(regions) < num_regions:
                regions.append((rendered.image, mask))
                truths.append(obj.attributes)
        index += 1
    return regions, truths


def score_captions(captions: list[str], truths: list[dict[str, str]]) -> dict[str, Any]:
    """Accuracy per attribute overall and per size class, and the exact-caption rate."""
    hits: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    counts: dict[str, int] = defaultdict(int)
    exact = 0
    for caption, truth in zip(captions, truths):
        parsed = parse_caption(caption)
        groups = ("all", truth["size"])
        for group in groups:
            counts[group] += 1
        correct = [parsed[attribute] == truth[attribute] for attribute in ATTRIBUTES]
        exact += all(correct)
        for attribute, ok in zip(ATTRIBUTES, correct):
            for group in groups:
                hits[group][attribute] += ok
    accuracy = {
        group: {attribute: hits[group][attribute] / counts[group] for attribute in ATTRIBUTES}
        for group in ("all", *SIZES)
        if counts[group]
    }
    return {"accuracy": accuracy, "counts": dict(counts), "all_attributes_correct": exact / max(1, len(captions))}


def format_table(report: dict[str, Any]) -> str:
    """Accuracy (%) per attribute (columns) for all regions and each size class (rows)."""
    lines = [f"{'regions':<14}{'n':>5}" + "".join(f"{a:>10}" for a in ATTRIBUTES)]
    for group, accuracy in report["accuracy"].items():
        cells = "".join(f"{100 * accuracy[a]:>9.1f}%" for a in ATTRIBUTES)
        lines.append(f"{group:<14}{report['counts'][group]:>5}{cells}")
    lines.append(f"all five attributes correct: {100 * report['all_attributes_correct']:.1f}%")
    return "\n".join(lines)


def evaluate(model: DescribeAnything, num_regions: int, seed: int = EVAL_SEED, batch_size: int = 32) -> dict[str, Any]:
    """Caption fresh regions with `model` and score them."""
    regions, truths = evaluation_regions(num_regions, seed)
    captions = model.describe_batch(regions, batch_size=batch_size, progress=True, do_sample=False, max_new_tokens=24)
    report = score_captions(captions, truths)
    report["examples"] = [{"caption": c, "truth": " ".join(t[a] for a in ATTRIBUTES)} for c, t in zip(captions[:10], truths)]
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dam-bench shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a DAM folder (default: the built-in ShapesDLC model)")
    parser.add_argument("--num-regions", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="scene seed (keep it apart from training seeds)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the report here")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run `shapes` from parsed arguments; prints the accuracy table."""
    if args.num_regions < 1:
        raise DamInputError("--num-regions must be >= 1")
    model = DescribeAnything.from_pretrained(args.model, device=args.device)
    report = evaluate(model, args.num_regions, args.seed, args.batch_size)
    print(format_table(report))
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench shapes` entry point."""
    return run_benchmark("dam-bench shapes", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    sys.exit(main())
