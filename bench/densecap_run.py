"""Dense captioning on Visual Genome, end to end: proposals -> captions -> DenseCap mAP.

Proposals come from the DenseCap FCLN or from segment-anything's automatic mask generator
(`--proposals fcln|sam`); captions from the FCLN's LSTM or from DAM (`--captioner fcln|dam`), so
the four combinations are scored by the same mAP (bench.densecap):

    dam-bench densecap-run --proposals fcln --captioner fcln --fcln runs/densecap/final \\
        --gt data/vg/region_descriptions.json --images data/vg/images \\
        --split-ids data/vg/densecap_splits.json --out runs/densecap_run/fcln_fcln
    dam-bench densecap-run --proposals sam --captioner dam --model builtin \\
        --sam-checkpoint sam_vit_h_4b8939.pth --gt ... --images ... --out runs/densecap_run/sam_dam

The evaluated images are those of `--gt` (restricted to `--split-ids`, a JSON list of ids or
DenseCap's {"train", "val", "test"} split file read at `--split`, then to the first
`--max-images`). Their ground truth is filtered as FCLN training and evaluation filter it
(dam.fcln.evaluation.filter_region: phrases normalised, regions of more than `--max-words`
words, empty phrases and boxes empty inside the image dropped; images left without regions
are not evaluated). A DAM reads FCLN boxes as box-shaped masks, or as SAM's masks of the boxes
when `--sam-checkpoint` is given (the same components as `dam densecap`, built by its loader).

Writes, in `--out`:
    checkpoint/          per-batch results (resumable: a rerun skips the images done; a rerun
                         with other models or settings is refused)
    preds.json           [{"image_id", "box": [x1, y1, x2, y2], "score", "caption"}], pixels
    ground_truth.json    the filtered references, VG layout: `dam-bench densecap --gt
                         OUT/ground_truth.json --pred OUT/preds.json` gives the same numbers
and prints the DenseCap report (`--json`: {"map", "det_map", "ap", ...} for scripts). The
score of a SAM region is its predicted IoU x stability; of an FCLN box its final score.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dam.commandline import int_at_least
from dam.errors import DamInputError
from dam.images import image_file_size
from dam.fcln.evaluation import (
    PAPER_MAX_WORDS,
    PredictionCheckpoint,
    filter_region,
    prediction_record,
    region_descriptions_entry,
)
from dam.jsonio import read_json, write_json_atomic
from dam.visual_genome import VGRegion, load_region_descriptions

from bench.densecap import DenseCapResult, MeteorScorer, densecap_map
from bench.harness import run_benchmark
from bench.retrieval import image_file

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
PREDICTIONS_FILE = "preds.json"
GROUND_TRUTH_FILE = "ground_truth.json"


# ---- ground truth --------------------------------------------------------------------------


def read_split_ids(path: str | Path, split: str) -> list[str]:
    """str() of the image ids in a split file: a JSON list of ids, or an object of lists (DenseCap's
    densecap_splits.json) read at `split`."""
    data = read_json(path, "split ids")
    if isinstance(data, dict):
        if not isinstance(data.get(split), list):
            raise DamInputError(
                f"split ids file {str(path)!r} has no list {split!r} (it has {sorted(data)}); pass --split NAME"
            )
        data = data[split]
    if not isinstance(data, list):
        raise DamInputError(f"split ids file {str(path)!r} must be a JSON list of image ids or an object of such lists")
    return [str(image_id) for image_id in data]


def evaluated_ground_truth(gt: Mapping[Hashable, Sequence[VGRegion]], images_dir: str | Path,
                           image_ids: Sequence[Hashable], max_words: int = PAPER_MAX_WORDS,
                           ) -> tuple[dict[Hashable, list[VGRegion]], dict[Hashable, Path]]:
    """The filtered references of `image_ids` (see the module docstring) and each kept image's file."""
    images_dir = Path(images_dir)
    references: dict[Hashable, list[VGRegion]] = {}
    files: dict[Hashable, Path] = {}
    dropped: dict[str, int] = {}
    for image_id in image_ids:
        path = image_file(images_dir, image_id)
        height, width = image_file_size(path)
        kept = []
        for region in gt[image_id]:
            result = filter_region(region.phrase, region.box, height, width, max_words)
            if isinstance(result, str):
                dropped[result] = dropped.get(result, 0) + 1
                continue
            phrase, box = result
            kept.append(VGRegion(image_id, box, phrase, region.region_id))
        if kept:
            references[image_id], files[image_id] = kept, path
        else:
            dropped["images_without_regions"] = dropped.get("images_without_regions", 0) + 1
    if dropped:
        logger.info("ground truth filtered as FCLN evaluation does: dropped %s",
                    ", ".join(f"{key}={value}" for key, value in sorted(dropped.items())))
    if not references:
        raise DamInputError("no evaluated image keeps a ground-truth region after filtering; check --gt and --max-words")
    return references, files


# ---- running -------------------------------------------------------------------------------


def caption_images(dense: Any, files: Mapping[Hashable, Path], checkpoint: PredictionCheckpoint,
                   image_batch_size: int = 8, progress: bool = True) -> int:
    """Dense captions of the images in `files` not yet in `checkpoint`, `image_batch_size` per
    step (one proposer and one captioner call), each step stored as a checkpoint chunk.

    `dense` is a `dam.densecap.DenseCaptioner`. Returns the number of images captioned now.
    """
    if image_batch_size < 1:
        raise DamInputError(f"image_batch_size={image_batch_size} must be at least 1")
    done = checkpoint.done()
    todo = [image_id for image_id in files if str(image_id) not in done]
    bar = tqdm(total=len(files), initial=len(files) - len(todo), desc="dense captioning", unit="img",
               dynamic_ncols=True, disable=not progress)
    for start in range(0, len(todo), image_batch_size):
        batch = todo[start : start + image_batch_size]
        results = dense([files[image_id] for image_id in batch], keys=[str(image_id) for image_id in batch])
        checkpoint.add(
            (image_id, [prediction_record(image_id, box, score, caption)
                        for box, score, caption in zip(result.boxes.tolist(), result.scores.tolist(), result.captions)])
            for image_id, result in zip(batch, results)
        )  # fmt: skip
        bar.update(len(batch))
    bar.close()
    return len(todo)


def densecap_run(dense: Any, gt: Mapping[Hashable, Sequence[VGRegion]], images_dir: str | Path,
                 out: str | Path, *, image_ids: Sequence[Hashable] | None = None,
                 max_words: int = PAPER_MAX_WORDS, image_batch_size: int = 8, progress: bool = True,
                 meteor: MeteorScorer | None = None) -> DenseCapResult:
    """Caption the evaluated images with `dense` (resumably, in `out`), write preds.json and
    ground_truth.json there, and score them with DenseCap's mAP (`meteor`: see bench.densecap).

    `dense.settings` (its models' fingerprints and options) key the checkpoint: one made with
    others is refused.
    `image_ids` default to every image of `gt`.
    """
    out = Path(out)
    ids = list(gt) if image_ids is None else list(image_ids)
    references, files = evaluated_ground_truth(gt, images_dir, ids, max_words)
    write_json_atomic(out / GROUND_TRUTH_FILE, [
        region_descriptions_entry(image_id, [r.box for r in regions], [r.phrase for r in regions])
        for image_id, regions in references.items()
    ])  # fmt: skip
    checkpoint = PredictionCheckpoint(out / CHECKPOINT_DIR, dense.settings)
    captioned = caption_images(dense, files, checkpoint, image_batch_size, progress)
    logger.info("%d images captioned now, %d were done before", captioned, len(files) - captioned)
    predictions = checkpoint.predictions(references)
    write_json_atomic(out / PREDICTIONS_FILE, predictions)
    return densecap_map(references, predictions, meteor=meteor, source=f"predictions file {str(out / PREDICTIONS_FILE)!r}")


# ---- command line --------------------------------------------------------------------------


_positive_int = int_at_least(1)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench densecap-run`."""
    p = parser or argparse.ArgumentParser(prog="dam-bench densecap-run", description=__doc__.splitlines()[0])
    p.add_argument("--proposals", required=True, choices=("fcln", "sam"), help="region proposals: FCLN boxes or SAM masks")
    p.add_argument("--captioner", required=True, choices=("fcln", "dam"), help="who captions the regions")
    p.add_argument("--gt", required=True, help="Visual Genome region_descriptions.json of the evaluated images")
    p.add_argument("--images", required=True, help="folder of the images ({image_id}.jpg, .png or .jpeg)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for preds.json, ground_truth.json, checkpoint/")
    p.add_argument("--split-ids", metavar="JSON", help="evaluate only these ids: a JSON list, or DenseCap's split file")
    p.add_argument("--split", default="test", help="the list to read from a --split-ids object (default test)")
    p.add_argument("--max-images", type=_positive_int, metavar="N", help="evaluate the first N selected images only")
    p.add_argument("--max-words", type=_positive_int, default=PAPER_MAX_WORDS,
                   help=f"drop ground-truth regions longer than this (default {PAPER_MAX_WORDS}, as DenseCap)")
    p.add_argument("--max-regions", type=_positive_int, default=300, metavar="N",
                   help="regions per image, best first (default 300: every FCLN box at the paper's settings)")
    p.add_argument("--fcln", metavar="PATH", help="a trained FCLN folder (needed by --proposals fcln or --captioner fcln)")
    p.add_argument("--model", metavar="DAM_PATH", help="DAM checkpoint folder for --captioner dam (default: builtin)")
    sam = p.add_argument_group("segment-anything (SAM proposals, or masks of FCLN boxes for DAM)")
    sam.add_argument("--sam-checkpoint", metavar="PTH", help="SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
    sam.add_argument("--sam-model-type", default="vit_h", help="vit_h (default), vit_l or vit_b")
    sam.add_argument("--sam-points-per-side", type=_positive_int, default=32, help="point grid (default 32)")
    sam.add_argument("--sam-pred-iou-thresh", type=float, default=0.88, help="default 0.88")
    sam.add_argument("--sam-stability-thresh", type=float, default=0.95, help="default 0.95")
    runtime = p.add_argument_group("runtime")
    runtime.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    runtime.add_argument("--dtype", help="DAM weights: float32, bfloat16 or float16 (default: float32)")
    runtime.add_argument("--batch-size", type=_positive_int, default=32, help="regions DAM captions together (default 32)")
    runtime.add_argument("--image-batch", type=_positive_int, default=8, help="images per step and checkpoint (default 8)")
    runtime.add_argument("--threads", type=_positive_int, help="CPU threads for torch")
    runtime.add_argument("--max-new-tokens", type=_positive_int, help="DAM caption length limit in tokens")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the result as JSON (on DenseCap's [0, 1] scale)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """What argparse cannot check, before any model loads."""
    if "fcln" in (args.proposals, args.captioner) and args.fcln is None:
        flag = "--proposals" if args.proposals == "fcln" else "--captioner"
        raise DamInputError(f"{flag} fcln needs --fcln PATH, a trained FCLN folder (a training run's final/)")
    if args.fcln is not None and not (Path(args.fcln) / "config.json").is_file():
        raise DamInputError(f"--fcln {args.fcln!r} is not an FCLN folder (no config.json); pass a training run's final/")
    if args.proposals == "sam" and args.sam_checkpoint is None:
        raise DamInputError("--proposals sam needs --sam-checkpoint PTH (e.g. sam_vit_h_4b8939.pth)")
    if args.sam_checkpoint is not None and not Path(args.sam_checkpoint).is_file():
        raise DamInputError(f"--sam-checkpoint {args.sam_checkpoint!r} does not exist; pass a segment-anything checkpoint")
    if args.model is not None and args.captioner != "dam":
        raise DamInputError("--model is the DAM of --captioner dam; drop it, or use --captioner dam")
    if not Path(args.images).is_dir():
        raise DamInputError(f"--images {args.images!r} is not a folder; pass the folder of the evaluated images")


def build_dense_captioner(args: argparse.Namespace) -> Any:
    """The proposer and captioner the options ask for, loaded by `dam densecap`'s own loader."""
    from dam.densecap import DenseCaptioner
    from dam.densecap.cli import build_components

    components = argparse.Namespace(
        proposer=args.proposals, captioner=args.captioner, fcln=args.fcln,
        model=None if args.model == "builtin" else args.model,
        sam_checkpoint=args.sam_checkpoint, sam_model_type=args.sam_model_type,
        sam_points_per_side=args.sam_points_per_side, sam_pred_iou_thresh=args.sam_pred_iou_thresh,
        sam_stability_thresh=args.sam_stability_thresh, device=args.device, dtype=args.dtype,
        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
    )
    proposer, captioner, _ = build_components(components)
    return DenseCaptioner(proposer, captioner, args.max_regions)


def selected_image_ids(gt: Mapping[Hashable, Any], split_ids: str | None, split: str,
                       max_images: int | None) -> list[Hashable]:
    """The ids of `gt` to evaluate, in file order: those listed in `split_ids` (when given), at most `max_images`."""
    ids = list(gt)
    if split_ids is not None:
        wanted = set(read_split_ids(split_ids, split))
        ids = [image_id for image_id in ids if str(image_id) in wanted]
        if not ids:
            raise DamInputError(f"no image of --gt is listed in --split-ids {split_ids!r}; do they name the same images?")
    return ids[:max_images] if max_images is not None else ids


def run_from_args(args: argparse.Namespace) -> int:
    """Run `densecap-run` from parsed arguments; prints the report or the JSON result."""
    _check_args(args)
    gt = load_region_descriptions(args.gt)
    image_ids = selected_image_ids(gt, args.split_ids, args.split, args.max_images)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    dense = build_dense_captioner(args)
    result = densecap_run(dense, gt, args.images, args.out, image_ids=image_ids,
                          max_words=args.max_words, image_batch_size=args.image_batch,
                          progress=not args.no_progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(f"proposals {args.proposals}, captions {args.captioner}: predictions in {Path(args.out) / PREDICTIONS_FILE}")
        print(result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench densecap-run` entry point."""
    return run_benchmark("dam-bench densecap-run", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
