"""Dense-captioning mAP on Visual Genome: DenseCap's localization-and-language average precision.

It follows the evaluation of the DenseCap paper (Johnson et al., 2016) and its released code.

1. Ground truth is a VG `region_descriptions.json` (phrases normalized as DenseCap does:
   lowercase, punctuation deleted). Per image, overlapping ground-truth boxes are merged
   greedily: the remaining box with the most remaining neighbours at IoU >= 0.7 (itself
   included; ties to the lowest index) absorbs those neighbours into one box, the mean of their
   coordinates, whose references are all of their phrases; repeat until no box remains.
2. Per image, detections in decreasing confidence take their single best-IoU merged box; a box
   already taken makes the detection a miss, as does having no overlapping box at all.
3. All detections of all images are ranked by confidence. For an IoU threshold t and a METEOR
   threshold m, a detection is a true positive when it took a box at IoU >= t and the METEOR of
   its caption against that box's references is > m; the number of positives is the number of
   merged boxes of all evaluated images (so images without predictions only add misses).
   AP is the mean over recall levels 0, 0.01, ..., 1 of the best precision at recall >= level.
4. mAP is the mean AP over IoU {0.3, 0.4, 0.5, 0.6, 0.7} x METEOR {0, 0.05, ..., 0.25};
   the detection mAP is the mean AP over the IoU thresholds with METEOR ignored.

Comparability with published numbers. This follows issue 6, which differs from the released
DenseCap code (jcjohnson/densecap, eval/eval_utils.lua) in two ways, so mAPs from here are not
directly comparable with the paper's or other papers' figures:
- the released code's METEOR thresholds are {-1, 0.05, 0.1, 0.15, 0.2, 0.25}, where -1 serves
  only the detection mAP: its mAP averages 25 APs (METEOR > 0.05 .. 0.25), while this mAP
  averages 30, including METEOR > 0 (the easiest column, so this mAP tends to be higher);
- the released code measures IoU with the +1-pixel convention of inclusive integer corners
  (width = x2 - x1 + 1, intersection likewise), which raises the IoU of small boxes; here boxes
  are continuous (width = x2 - x1).
The default stays as the issue specifies.

METEOR is pycocoevalcap's (meteor-1.5, `-l en -norm`), all matched captions in one JVM; only
detections that took a box at IoU >= 0.3 are scored, since no other can be a true positive.
Predicted captions are normalized like the ground truth before scoring.

Inputs:
    --gt    Visual Genome region_descriptions.json of the evaluated split
    --pred  [{"image_id", "box": [x1, y1, x2, y2], "score", "caption"}, ...] in pixels

Run as `dam-bench densecap --gt region_descriptions.json --pred preds.json [--json]
[--max-images N]` or `python -m bench.densecap ...`; it needs `java` (8 or newer) on PATH.
From Python, `densecap_map(gt, predictions, meteor=...)` takes any METEOR scorer.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np

from dam.commandline import int_at_least
from dam.errors import DamInputError
from dam.jsonio import read_json
from dam.visual_genome import VGRegion, load_region_descriptions, normalize_caption

from bench.caption_metrics import meteor_scores, meteor_session
from bench.harness import run_benchmark

logger = logging.getLogger(__name__)

IOU_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
METEOR_THRESHOLDS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)
MERGE_IOU = 0.7
RECALL_STEPS = 100  # recall levels 0, 1/100, ..., 1

MeteorScorer = Callable[[Sequence[str], Sequence[Sequence[str]]], Sequence[float]]
"""(candidate captions, their reference lists) -> one METEOR per candidate."""

_PRED_KEYS = ("image_id", "box", "score", "caption")


@dataclass(frozen=True)
class Detection:
    """One predicted region: box [x1, y1, x2, y2] in pixels, confidence, caption."""

    image_id: Hashable
    box: tuple[float, float, float, float]
    score: float
    caption: str


@dataclass(frozen=True)
class MergedRegion:
    """A ground-truth box after merging: the mean of its group's boxes and all their phrases."""

    box: tuple[float, float, float, float]
    references: list[str]


@dataclass
class DenseCapResult:
    """DenseCap mAP, detection mAP and every AP, on DenseCap's [0, 1] scale (papers print x100)."""

    map: float
    det_map: float
    ap: dict[str, float]
    """AP per "iou=T,meteor=M"."""
    det_ap: dict[str, float]
    """AP per "iou=T" with METEOR ignored."""
    num_images: int
    num_detections: int
    num_ground_truth: int
    """Merged ground-truth boxes, the positives of every AP."""
    num_regions: int = 0
    """Ground-truth regions before merging."""

    def to_json(self) -> dict[str, Any]:
        return {
            "map": self.map,
            "det_map": self.det_map,
            "ap": dict(self.ap),
            "det_ap": dict(self.det_ap),
            "num_images": self.num_images,
            "num_detections": self.num_detections,
            "num_ground_truth": self.num_ground_truth,
            "num_regions": self.num_regions,
        }

    def summary(self) -> str:
        lines = [
            f"DenseCap mAP (x100): {100 * self.map:.2f}   detection mAP (x100): {100 * self.det_map:.2f}",
            f"{self.num_images} images, {self.num_detections} detections, {self.num_ground_truth} merged "
            f"ground-truth boxes (from {self.num_regions} regions)",
            "AP (x100)   " + "".join(f"{f'METEOR>{m:g}':>12}" for m in METEOR_THRESHOLDS) + f"{'det':>8}",
        ]
        for t in IOU_THRESHOLDS:
            cells = "".join(f"{100 * self.ap[_ap_key(t, m)]:>12.2f}" for m in METEOR_THRESHOLDS)
            lines.append(f"{f'IoU>={t:g}':<12}{cells}{100 * self.det_ap[_ap_key(t)]:>8.2f}")
        return "\n".join(lines)


def _ap_key(iou: float, meteor: float | None = None) -> str:
    return f"iou={iou:g}" if meteor is None else f"iou={iou:g},meteor={meteor:g}"


def iou_matrix(a: Any, b: Any) -> np.ndarray:
    """(N, M) IoU of boxes `a` (N, 4) and `b` (M, 4) given as [x1, y1, x2, y2] (continuous
    coordinates, no +1); 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    width = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    height = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = width * height  # (N, M)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def merge_ground_truth(regions: Sequence[VGRegion], threshold: float = MERGE_IOU) -> list[MergedRegion]:
    """DenseCap's greedy merge of one image's ground-truth regions (see the module docstring)."""
    if not regions:
        return []
    boxes = np.asarray([r.box for r in regions], dtype=np.float64)  # (N, 4)
    close = iou_matrix(boxes, boxes) >= threshold
    np.fill_diagonal(close, True)  # a zero-area box has IoU 0 with itself but must still form a group
    remaining = np.ones(len(regions), dtype=bool)
    merged: list[MergedRegion] = []
    while remaining.any():
        counts = (close & remaining[None, :]).sum(axis=1)
        counts[~remaining] = -1
        top = int(np.argmax(counts))  # argmax takes the first maximum: ties go to the lowest index
        group = np.flatnonzero(close[top] & remaining)
        box = tuple(float(v) for v in boxes[group].mean(axis=0))
        merged.append(MergedRegion(box=box, references=[regions[i].phrase for i in group]))  # type: ignore[arg-type]
        remaining[group] = False
    return merged


def interpolated_ap(is_tp: Sequence[bool], npos: int) -> float:
    """AP of a ranking (best first) whose entries are true or false positives, with `npos`
    positives: the mean over recall levels 0, 0.01, ..., 1 of the highest precision reached at a
    recall >= the level (0 where the ranking never reaches it)."""
    if npos <= 0:
        raise DamInputError("average precision needs at least one ground-truth positive")
    flags = np.asarray(is_tp, dtype=bool)
    if flags.size == 0:
        return 0.0
    tp = np.cumsum(flags)  # (n,)
    precision = tp / np.arange(1, flags.size + 1)
    best_after = np.maximum.accumulate(precision[::-1])[::-1]  # best precision from each rank on
    # recall >= k/100  <=>  100 * tp >= k * npos, compared in integers so 0.3 == 30/100 exactly;
    # recall only grows along the ranking, so the ranks reaching a level form a suffix.
    levels = np.arange(RECALL_STEPS + 1) * npos
    first = np.searchsorted(RECALL_STEPS * tp, levels, side="left")
    reached = first < flags.size
    return float(np.where(reached, best_after[np.minimum(first, flags.size - 1)], 0.0).sum() / levels.size)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_predictions(
    data: Any, gt_ids: Mapping[str, Hashable], source: str = "predictions"
) -> list[Detection]:
    """Validated detections of a predictions list; `gt_ids` maps str(image id) to the ground
    truth's image id (so 1 and "1" match). Errors name `source` and the entry's index."""
    hint = 'each entry is {"image_id", "box": [x1, y1, x2, y2], "score", "caption"}'
    if not isinstance(data, list):
        raise DamInputError(f"{source} must be a list of detections; {hint}")
    detections = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DamInputError(f"{source}: entry {index} is not an object; {hint}")
        missing = [key for key in _PRED_KEYS if key not in entry]
        if missing:
            raise DamInputError(f"{source}: entry {index} lacks {', '.join(repr(k) for k in missing)}; {hint}")
        box = entry["box"]
        if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise DamInputError(
                f"{source}: entry {index} has box {box!r}; it must be 4 finite numbers [x1, y1, x2, y2]"
            )
        if box[2] < box[0] or box[3] < box[1]:
            raise DamInputError(
                f"{source}: entry {index} has box {box!r} with x2 < x1 or y2 < y1; boxes are corners "
                "[x1, y1, x2, y2], not [x, y, width, height]"
            )
        if not _is_number(entry["score"]):
            raise DamInputError(f"{source}: entry {index} has score {entry['score']!r}; it must be a finite number")
        if not isinstance(entry["caption"], str):
            raise DamInputError(f"{source}: entry {index} has a caption that is not a string")
        key = str(entry["image_id"])
        if key not in gt_ids:
            raise DamInputError(
                f"{source}: entry {index} has image_id {entry['image_id']!r}, which is not in the ground truth; "
                "predict only for images of the ground-truth file"
            )
        detections.append(
            Detection(
                image_id=gt_ids[key],
                box=tuple(float(v) for v in box),  # type: ignore[arg-type]
                score=float(entry["score"]),
                caption=entry["caption"],
            )
        )
    return detections


@dataclass
class _Assignment:
    """A detection after per-image matching; `references` is None for a miss."""

    score: float
    iou: float = 0.0
    caption: str = ""
    references: list[str] | None = None
    meteor: float = 0.0


def _assign(detections: Sequence[Detection], merged: Sequence[MergedRegion]) -> list[_Assignment]:
    order = sorted(range(len(detections)), key=lambda i: -detections[i].score)  # stable: ties keep input order
    if not merged:
        return [_Assignment(score=detections[i].score) for i in order]
    ious = iou_matrix([d.box for d in detections], [m.box for m in merged])  # (D, G)
    taken = np.zeros(len(merged), dtype=bool)
    out = []
    for i in order:
        j = int(np.argmax(ious[i]))
        iou = float(ious[i, j])
        if iou <= 0 or taken[j]:
            out.append(_Assignment(score=detections[i].score))
            continue
        taken[j] = True
        det = detections[i]
        out.append(_Assignment(score=det.score, iou=iou, caption=normalize_caption(det.caption),
                               references=merged[j].references))  # fmt: skip
    return out


def java_meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> list[float]:
    """METEOR of each candidate against its references, all in one pycocoevalcap METEOR JVM
    (none is started when there is nothing to score)."""
    if not candidates:
        return []
    gts = {str(i): list(refs) for i, refs in enumerate(references)}
    res = {str(i): [caption] for i, caption in enumerate(candidates)}
    logger.info("scoring %d matched captions with METEOR (one JVM)", len(candidates))
    with meteor_session() as meteor:
        _, scores = meteor_scores(meteor, gts, res)
    return [float(s) for s in scores]


def densecap_map(
    gt: Mapping[Hashable, Sequence[VGRegion]],
    predictions: Any,
    *,
    meteor: MeteorScorer | None = None,
    max_images: int | None = None,
    source: str = "predictions",
) -> DenseCapResult:
    """DenseCap's mAP of `predictions` (a list of {"image_id", "box", "score", "caption"}) against
    `gt` {image_id: [regions]} (as `dam.visual_genome.load_region_descriptions` returns).

    `meteor` scores (captions, reference lists) -> METEORs; by default Java METEOR via
    pycocoevalcap. `max_images` evaluates the first N images of `gt` only (predictions for the
    others are dropped). `source` names the predictions in errors.
    """
    gt_ids = {str(image_id): image_id for image_id in gt}
    detections = parse_predictions(predictions, gt_ids, source)
    image_ids = list(gt)[:max_images] if max_images is not None else list(gt)
    by_image: dict[Hashable, list[Detection]] = {image_id: [] for image_id in image_ids}
    for det in detections:
        if det.image_id in by_image:
            by_image[det.image_id].append(det)

    normalized = {
        image_id: [VGRegion(r.image_id, r.box, normalize_caption(r.phrase), r.region_id) for r in gt[image_id]]
        for image_id in image_ids
    }
    assignments: list[_Assignment] = []
    npos = num_regions = 0
    for image_id in image_ids:
        merged = merge_ground_truth(normalized[image_id])
        npos += len(merged)
        num_regions += len(normalized[image_id])
        if by_image[image_id]:
            assignments.extend(_assign(by_image[image_id], merged))
    if npos == 0:
        raise DamInputError("the ground truth of the evaluated images has no regions; nothing to detect")
    without = sum(1 for image_id in image_ids if not by_image[image_id])
    if without:
        logger.warning(
            "%d of %d ground-truth images have no predictions; their regions count as missed (pass the ground "
            "truth of the evaluated split only)", without, len(image_ids),
        )  # fmt: skip

    to_score = [a for a in assignments if a.references is not None and a.iou >= min(IOU_THRESHOLDS)]
    scorer = meteor or java_meteor
    scores = list(scorer([a.caption for a in to_score], [a.references or [] for a in to_score]))
    if len(scores) != len(to_score):
        raise DamInputError(f"the METEOR scorer returned {len(scores)} scores for {len(to_score)} captions")
    for a, s in zip(to_score, scores):
        a.meteor = float(s)

    ranked = sorted(assignments, key=lambda a: -a.score)  # stable across images
    iou = np.array([a.iou for a in ranked])
    matched = np.array([a.references is not None for a in ranked], dtype=bool)
    met = np.array([a.meteor for a in ranked])
    ap: dict[str, float] = {}
    det_ap: dict[str, float] = {}
    for t in IOU_THRESHOLDS:
        located = matched & (iou >= t)
        det_ap[_ap_key(t)] = interpolated_ap(located, npos)
        for m in METEOR_THRESHOLDS:
            ap[_ap_key(t, m)] = interpolated_ap(located & (met > m), npos)
    return DenseCapResult(
        map=float(np.mean(list(ap.values()))),
        det_map=float(np.mean(list(det_ap.values()))),
        ap=ap,
        det_ap=det_ap,
        num_images=len(image_ids),
        num_detections=len(assignments),
        num_ground_truth=npos,
        num_regions=num_regions,
    )


_positive_int = int_at_least(1)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench densecap`."""
    p = parser or argparse.ArgumentParser(prog="dam-bench densecap", description=__doc__.splitlines()[0])
    p.add_argument("--gt", required=True, help="Visual Genome region_descriptions.json of the evaluated images")
    p.add_argument(
        "--pred", required=True, help='predictions JSON [{"image_id", "box": [x1, y1, x2, y2], "score", "caption"}]'
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (on DenseCap's [0, 1] scale)")
    p.add_argument("--max-images", type=_positive_int, metavar="N", help="evaluate the first N ground-truth images only")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run `densecap` from parsed arguments; prints the summary table or the JSON result."""
    gt = load_region_descriptions(args.gt)
    predictions = read_json(args.pred, "predictions")
    result = densecap_map(gt, predictions, max_images=args.max_images, source=f"predictions file {args.pred!r}")
    print(json.dumps(result.to_json(), indent=2) if args.json else result.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench densecap` entry point."""
    return run_benchmark("dam-bench densecap", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
