"""Image retrieval and text localisation with a region captioner (the DenseCap paper, §4.2).

The protocol of Johnson et al. (2016) on a Visual Genome split: pick `--num-images` images (1000
in the paper) and `--num-queries` query sets (100), each `--captions-per-query` (4) distinct
region captions of one of those images. Every region proposal of every image is scored against
every query caption by the captioner's log-probability of generating the caption from the region
(dam.densecap.scoring: teacher-forced, end token included). An image's score for a query set is
the mean over its captions of the caption's best region score in that image; images are ranked
by it, and the source image's rank gives R@1, R@5, R@10 and the median rank (ties count against
the source image). Localisation: for each query caption, the IoU between the best-scoring box of
the source image and the caption's ground-truth box; the fraction of captions at IoU >= 0.1,
0.3 and 0.5 and the median IoU are reported.

Scorer (`--model KIND PATH`): `fcln PATH` (the FCLN's LSTM) or `dam PATH` (`dam builtin` for the
built-in ShapesDLC model). Proposals (`--proposer`): `fcln` (FCLN boxes; needs `--fcln PATH` unless
the scorer is that FCLN), `sam` (segment-anything masks; `--sam-checkpoint`), or `gt` (the
ground-truth boxes of each image: an oracle that isolates the captioner's part; every region is
kept, whatever `--max-regions` says, so that each query caption's own box is a candidate). A
DAM reads box proposals as box-shaped masks, or SAM's masks of the boxes when `--sam-checkpoint`
is given with `--proposer fcln|gt`.

    dam-bench retrieval --gt data/vg/test_region_descriptions.json --images data/vg/images \\
        --model fcln runs/densecap/final                                     # the paper's setting
    dam-bench retrieval --gt data/shapes_vg/region_descriptions.json --images data/shapes_vg/images \\
        --model dam builtin --proposer gt --num-images 50 --num-queries 20   # CPU, seconds

`--speed` measures query scoring instead: (region, query) pairs per second of the batched scorer
and of one pair at a time (each pair a separate call: its own vision pass and prompt), in one
process on the same pairs, with the ratio and the largest difference between the two scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dam.commandline import int_at_least
from dam.densecap import FixedProposer, QueryScores, Regions, score_queries
from dam.errors import DamInputError
from dam.images import load_image
from dam.jsonio import write_json_atomic
from dam.visual_genome import VGRegion, load_region_descriptions

from bench.densecap import iou_matrix
from bench.harness import run_benchmark

logger = logging.getLogger("bench.retrieval")

RECALL_AT = (1, 5, 10)
IOU_AT = (0.1, 0.3, 0.5)
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


@dataclass(frozen=True)
class QuerySet:
    """`captions` of distinct regions of one image, with their ground-truth boxes."""

    image_id: Hashable
    captions: tuple[str, ...]
    boxes: tuple[tuple[float, float, float, float], ...]


@dataclass
class RetrievalResult:
    """Retrieval (ranks of the source images) and localisation (IoU of the best boxes)."""

    recall: dict[str, float]
    median_rank: float
    iou_at: dict[str, float]
    median_iou: float
    num_images: int
    num_queries: int
    num_captions: int
    num_pairs: int
    seconds: float
    ranks: list[int]
    ious: list[float]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        recall = "  ".join(f"R@{k} {self.recall[f'R@{k}']:.3f}" for k in RECALL_AT)
        iou = "  ".join(f"IoU@{t:g} {self.iou_at[f'IoU@{t:g}']:.3f}" for t in IOU_AT)
        return "\n".join([
            f"retrieval over {self.num_images} images, {self.num_queries} query sets: {recall}  "
            f"median rank {self.median_rank:g}",
            f"localisation of {self.num_captions} query captions: {iou}  median IoU {self.median_iou:.3f}",
            f"{self.num_pairs} (region, query) pairs scored in {self.seconds:.1f} s "
            f"({self.num_pairs / max(self.seconds, 1e-9):.0f} pairs/s, proposals included)",
        ])


# ---- protocol ------------------------------------------------------------------------------


def image_file(images_dir: Path, image_id: Hashable) -> Path:
    """The image file of a VG image id in `images_dir` ({id}.jpg, .png or .jpeg)."""
    for suffix in IMAGE_SUFFIXES:
        path = images_dir / f"{image_id}{suffix}"
        if path.is_file():
            return path
    raise DamInputError(
        f"no image file for image id {image_id!r} in {str(images_dir)!r} (looked for {image_id}.jpg/.png/.jpeg); "
        "pass the folder holding the split's images with --images"
    )


def sample_protocol(gt: Mapping[Hashable, Sequence[VGRegion]], num_images: int, num_queries: int,
                    captions_per_query: int, seed: int = 0) -> tuple[list[Hashable], list[QuerySet]]:
    """The evaluated images and the query sets (see the module docstring), drawn with `seed`."""
    if min(num_images, num_queries, captions_per_query) < 1:
        raise DamInputError("--num-images, --num-queries and --captions-per-query must be at least 1")
    rng = np.random.default_rng(seed)
    ids = list(gt)
    if len(ids) < num_images:
        logger.warning("the ground truth has %d images, fewer than --num-images %d: using all", len(ids), num_images)
        num_images = len(ids)
    chosen = [ids[i] for i in sorted(rng.choice(len(ids), size=num_images, replace=False))]

    def distinct(image_id: Hashable) -> list[VGRegion]:
        seen: dict[str, VGRegion] = {}
        for region in gt[image_id]:
            seen.setdefault(region.phrase.strip().lower(), region)
        return list(seen.values())

    eligible = [image_id for image_id in chosen if len(distinct(image_id)) >= captions_per_query]
    if not eligible:
        raise DamInputError(f"no evaluated image has {captions_per_query} distinct captions; lower --captions-per-query")
    if len(eligible) < num_queries:
        logger.warning("only %d images have %d distinct captions: %d query sets instead of %d",
                       len(eligible), captions_per_query, len(eligible), num_queries)
        num_queries = len(eligible)
    sources = [eligible[i] for i in rng.choice(len(eligible), size=num_queries, replace=False)]
    query_sets = []
    for image_id in sources:
        regions = distinct(image_id)
        picked = [regions[i] for i in rng.choice(len(regions), size=captions_per_query, replace=False)]
        query_sets.append(QuerySet(image_id, tuple(r.phrase.strip() for r in picked), tuple(r.box for r in picked)))
    return chosen, query_sets


def retrieval_metrics(scores: QueryScores, query_sets: Sequence[QuerySet], keys: Mapping[Hashable, str]
                      ) -> tuple[dict[str, float], float, dict[str, float], float, list[int], list[float]]:
    """Recall@K, median rank, IoU@t, median IoU, and every rank and IoU, from scored queries."""
    row_of = {key: row for row, key in enumerate(scores.images)}
    column_of = {query: column for column, query in enumerate(scores.queries)}
    ranks, ious = [], []
    for query_set in query_sets:
        columns = [column_of[caption] for caption in query_set.captions]
        image_scores = scores.image_scores(columns)  # (I,)
        source = row_of[keys[query_set.image_id]]
        others = np.delete(image_scores, source)
        ranks.append(1 + int(np.sum(others >= image_scores[source])))
        for column, gt_box in zip(columns, query_set.boxes):
            box = scores.best_box(source, column)
            ious.append(0.0 if box is None else float(iou_matrix([box], [gt_box])[0, 0]))
    rank_array, iou_array = np.array(ranks), np.array(ious)
    recall = {f"R@{k}": float(np.mean(rank_array <= k)) for k in RECALL_AT}
    iou_at = {f"IoU@{t:g}": float(np.mean(iou_array >= t)) for t in IOU_AT}
    return recall, float(np.median(rank_array)), iou_at, float(np.median(iou_array)), ranks, ious


def _images(images_dir: Path, image_ids: Sequence[Hashable], keys: Mapping[Hashable, str]
            ) -> Iterator[tuple[str, np.ndarray]]:
    for image_id in image_ids:
        yield keys[image_id], load_image(image_file(images_dir, image_id))


def ground_truth_regions(gt: Mapping[Hashable, Sequence[VGRegion]], image_ids: Sequence[Hashable],
                         keys: Mapping[Hashable, str]) -> dict[str, Regions]:
    """Each image's ground-truth boxes as proposals (score 1), for `--proposer gt`."""
    return {
        keys[image_id]: Regions(np.array([r.box for r in gt[image_id]]).reshape(-1, 4), np.ones(len(gt[image_id])))
        for image_id in image_ids
    }


def resolve_proposer(proposer: Any, gt: Mapping[Hashable, Sequence[VGRegion]], image_ids: Sequence[Hashable],
                     keys: Mapping[Hashable, str], max_regions: int) -> tuple[Any, int]:
    """(proposer, regions kept per image): "gt" becomes the ground-truth regions, all of them, since
    cutting them could drop a query caption's own box and the oracle would be one no more."""
    if proposer != "gt":
        return proposer, max_regions
    regions = ground_truth_regions(gt, image_ids, keys)
    return FixedProposer(regions, name="gt"), max([1, *(len(r) for r in regions.values())])


def evaluate_retrieval(gt: Mapping[Hashable, Sequence[VGRegion]], images_dir: str | Path, proposer: Any, scorer: Any,
                       *, num_images: int = 1000, num_queries: int = 100, captions_per_query: int = 4,
                       max_regions: int = 30, image_batch_size: int = 8, seed: int = 0,
                       progress: bool = True) -> tuple[RetrievalResult, list[QuerySet], QueryScores]:
    """Run the protocol (module docstring). `proposer` may be the string "gt" for the ground-truth boxes."""
    images_dir = Path(images_dir)
    image_ids, query_sets = sample_protocol(gt, num_images, num_queries, captions_per_query, seed)
    keys = {image_id: str(image_id) for image_id in image_ids}
    for image_id in image_ids:  # fail on a missing file now, not after an hour of scoring
        image_file(images_dir, image_id)
    proposer, max_regions = resolve_proposer(proposer, gt, image_ids, keys, max_regions)
    captions = list(dict.fromkeys(caption for query_set in query_sets for caption in query_set.captions))
    scores = score_queries(_images(images_dir, image_ids, keys), captions, proposer, scorer, max_regions=max_regions,
                           image_batch_size=image_batch_size, keep_hits=0, progress=progress,
                           num_images=len(image_ids))
    recall, median_rank, iou_at, median_iou, ranks, ious = retrieval_metrics(scores, query_sets, keys)
    result = RetrievalResult(recall, median_rank, iou_at, median_iou, len(image_ids), len(query_sets),
                             len(ious), scores.num_pairs, scores.seconds, ranks, ious)
    return result, query_sets, scores


# ---- speed ---------------------------------------------------------------------------------


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def scoring_speed(scorer: Any, images: Sequence[np.ndarray], regions: Sequence[Regions], queries: Sequence[str],
                  baseline_pairs: int = 64) -> dict[str, Any]:
    """Pairs/s of `scorer` batched over all (region, query) pairs of `images` vs one pair per call
    (on the first `baseline_pairs` pairs), after a warm-up of each; with the largest score difference."""
    pairs = [(i, r, q) for i in range(len(images)) for r in range(len(regions[i])) for q in range(len(queries))]
    if not pairs:
        raise DamInputError("no (region, query) pair to time: the images have no regions")
    scorer.score(images[:1], [regions[0].head(2)], list(queries[:2]))  # warm-up (allocations, kernels)
    _synchronize()
    start = time.perf_counter()
    batched = scorer.score(images, regions, queries)
    _synchronize()
    batched_seconds = time.perf_counter() - start

    subset = pairs[:baseline_pairs]
    i, r, q = subset[0]
    scorer.score([images[i]], [regions[i].subset([r])], [queries[q]])  # warm-up at batch 1
    _synchronize()
    single = []
    start = time.perf_counter()
    for i, r, q in subset:
        single.append(float(scorer.score([images[i]], [regions[i].subset([r])], [queries[q]])[0][0, 0]))
    _synchronize()
    single_seconds = time.perf_counter() - start
    difference = max(abs(float(batched[i][r, q]) - value) for (i, r, q), value in zip(subset, single))
    batched_rate = len(pairs) / batched_seconds
    single_rate = len(subset) / single_seconds
    return {
        "scorer": scorer.name, "pairs": len(pairs), "regions": sum(len(x) for x in regions), "queries": len(queries),
        "batched_pairs_per_s": batched_rate, "single_pairs": len(subset), "single_pairs_per_s": single_rate,
        "ratio": batched_rate / single_rate, "max_abs_difference": difference,
    }


def run_speed(gt: Mapping[Hashable, Sequence[VGRegion]], images_dir: str | Path, proposer: Any, scorer: Any, *,
              num_images: int, num_queries: int, captions_per_query: int, max_regions: int, seed: int,
              baseline_pairs: int) -> dict[str, Any]:
    """`scoring_speed` on the protocol's first `num_images` images and the captions of its first
    `num_queries` query sets (proposals are made first and not timed)."""
    images_dir = Path(images_dir)
    image_ids, query_sets = sample_protocol(gt, num_images, num_queries, captions_per_query, seed)
    keys = {image_id: str(image_id) for image_id in image_ids}
    proposer, max_regions = resolve_proposer(proposer, gt, image_ids, keys, max_regions)
    pixels = [load_image(image_file(images_dir, image_id)) for image_id in image_ids]
    regions = [r.head(max_regions) for r in proposer.propose(pixels, max_regions, [keys[i] for i in image_ids])]
    captions = list(dict.fromkeys(caption for query_set in query_sets for caption in query_set.captions))
    return scoring_speed(scorer, pixels, regions, captions, baseline_pairs)


# ---- command line --------------------------------------------------------------------------


_positive_int = int_at_least(1)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench retrieval`."""
    p = parser or argparse.ArgumentParser(prog="dam-bench retrieval", description=__doc__.splitlines()[0])
    p.add_argument("--gt", required=True, help="Visual Genome region_descriptions.json of the evaluated split")
    p.add_argument("--images", required=True, help="folder of the split's images ({image_id}.jpg or .png)")
    p.add_argument("--model", nargs=2, required=True, metavar=("KIND", "PATH"),
                   help="the scorer: 'fcln PATH' or 'dam PATH' ('dam builtin': the built-in ShapesDLC model)")
    p.add_argument("--proposer", choices=("fcln", "sam", "gt"),
                   help="region proposals (default: fcln when an FCLN is given, else sam with --sam-checkpoint)")
    p.add_argument("--fcln", metavar="PATH", help="FCLN folder for --proposer fcln (default: the --model FCLN)")
    p.add_argument("--sam-checkpoint", metavar="PTH", help="SAM checkpoint (SAM proposals, or masks of boxes for DAM)")
    p.add_argument("--sam-model-type", default="vit_h", help="vit_h (default), vit_l or vit_b")
    p.add_argument("--num-images", type=_positive_int, default=1000, help="images ranked (default 1000, as the paper)")
    p.add_argument("--num-queries", type=_positive_int, default=100, help="query sets (default 100)")
    p.add_argument("--captions-per-query", type=_positive_int, default=4, help="captions per query set (default 4)")
    p.add_argument("--max-regions", type=_positive_int, default=30,
                   help="proposals per image (default 30); --proposer gt keeps every ground-truth region")
    p.add_argument("--seed", type=int, default=0, help="seed of the image and query sampling (default 0)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="DAM weights: float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="(region, query) pairs per forward (default 64)")
    p.add_argument("--image-batch", type=_positive_int, default=8, help="images proposed and scored per step (default 8)")
    p.add_argument("--threads", type=_positive_int, help="CPU threads for torch (1 is fastest for tiny models on a busy CPU)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", metavar="JSON", help="also write the result, per-query ranks and IoUs to this file")
    speed = p.add_argument_group("speed (--speed: time query scoring instead of running the protocol)")
    speed.add_argument("--speed", action="store_true", help="pairs/s batched vs one pair at a time, and the ratio")
    speed.add_argument("--speed-images", type=_positive_int, default=4, help="images timed (default 4)")
    speed.add_argument("--speed-queries", type=_positive_int, default=4, help="query sets whose captions are timed (default 4)")
    speed.add_argument("--speed-baseline-pairs", type=_positive_int, default=64,
                       help="pairs timed one at a time (default 64)")
    return p


def build_scorer_and_proposer(args: argparse.Namespace) -> tuple[Any, Any]:
    """(query scorer, proposer or "gt") from the options; loads the models."""
    import torch

    from dam.densecap import DamQueryScorer, FclnProposer, FclnQueryScorer, SamProposer

    kind, path = args.model
    if kind not in ("fcln", "dam"):
        raise DamInputError(f"--model {kind} {path}: the kind must be 'fcln' or 'dam'")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    fcln_path = args.fcln or (path if kind == "fcln" else None)
    proposer_kind = args.proposer or ("fcln" if fcln_path else "sam" if args.sam_checkpoint else None)
    if proposer_kind is None:
        raise DamInputError("no region proposals: pass --fcln PATH, --proposer sam --sam-checkpoint PTH, or --proposer gt")
    if proposer_kind == "fcln" and fcln_path is None:
        raise DamInputError("--proposer fcln needs an FCLN: pass --fcln PATH")
    if proposer_kind == "sam" and args.sam_checkpoint is None:
        raise DamInputError("--proposer sam needs --sam-checkpoint PTH")

    fcln_models: dict[str, Any] = {}

    def load_fcln(folder: str) -> Any:
        from dam.fcln import FclnModel

        if folder not in fcln_models:
            if not (Path(folder) / "config.json").is_file():
                raise DamInputError(f"{folder!r} is not an FCLN folder (no config.json); pass a training run's final/")
            fcln_models[folder] = FclnModel.from_pretrained(folder).to(device).eval()
        return fcln_models[folder]

    prompter = None
    if args.sam_checkpoint is not None:
        from dam.sam import SamPrompter

        prompter = SamPrompter.from_checkpoint(args.sam_checkpoint, args.sam_model_type, device=device)
    if kind == "fcln":
        scorer: Any = FclnQueryScorer(load_fcln(path), pair_batch_size=max(args.batch_size, 4096))
    else:
        from dam.describe import DescribeAnything

        describer = DescribeAnything.from_pretrained(None if path == "builtin" else path, device=device, dtype=args.dtype)
        box_masks = prompter if proposer_kind != "sam" else None
        scorer = DamQueryScorer(describer, box_masks, region_batch_size=max(1, args.batch_size // 8),
                                pair_batch_size=args.batch_size)
    if proposer_kind == "gt":
        return scorer, "gt"
    if proposer_kind == "fcln":
        return scorer, FclnProposer(load_fcln(fcln_path))  # type: ignore[arg-type]
    return scorer, SamProposer(prompter.predictor.model)  # type: ignore[union-attr]


def run_from_args(args: argparse.Namespace) -> int:
    """Run `retrieval` from parsed arguments."""
    gt = load_region_descriptions(args.gt)
    if not Path(args.images).is_dir():
        raise DamInputError(f"--images {args.images!r} is not a folder; pass the folder of the split's images")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    scorer, proposer = build_scorer_and_proposer(args)
    if args.speed:
        speed = run_speed(gt, args.images, proposer, scorer, num_images=args.speed_images,
                          num_queries=args.speed_queries, captions_per_query=args.captions_per_query,
                          max_regions=args.max_regions, seed=args.seed, baseline_pairs=args.speed_baseline_pairs)
        if args.out:
            write_json_atomic(args.out, speed)
        if args.json:
            print(json.dumps(speed))
        else:
            print(f"query scoring ({speed['scorer']}): {speed['regions']} regions x {speed['queries']} queries")
            print(f"batched:            {speed['batched_pairs_per_s']:10.1f} pairs/s ({speed['pairs']} pairs)")
            print(f"one pair at a time: {speed['single_pairs_per_s']:10.1f} pairs/s ({speed['single_pairs']} pairs)")
            print(f"ratio (batched / one at a time): {speed['ratio']:.1f}x; "
                  f"largest score difference {speed['max_abs_difference']:.2e}")
        return 0
    result, query_sets, _ = evaluate_retrieval(
        gt, args.images, proposer, scorer, num_images=args.num_images, num_queries=args.num_queries,
        captions_per_query=args.captions_per_query, max_regions=args.max_regions,
        image_batch_size=args.image_batch, seed=args.seed,
    )
    if args.out:
        details = result.to_json()
        details["query_sets"] = [
            {"image_id": q.image_id, "captions": list(q.captions), "boxes": [list(b) for b in q.boxes]} for q in query_sets
        ]
        details["settings"] = {"model": list(args.model), "proposer": getattr(proposer, "name", proposer),
                               "max_regions": None if proposer == "gt" else args.max_regions, "seed": args.seed}
        write_json_atomic(args.out, details)
    if args.json:
        summary = result.to_json()
        summary.pop("ranks")
        summary.pop("ious")
        print(json.dumps(summary))
    else:
        print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench retrieval` entry point."""
    return run_benchmark("dam-bench retrieval", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
