"""Stage 2 of DLC-SDP: self-labeling of unlabeled images (SA-1B), as in the DAM paper's semi-supervised stage.

    dam-data stage2 --config configs/data/stage2_sa1b.yaml output.dir=data/sa1b_s2 [--shard I --num-shards N]
    run_stage2(load_stage2_config("configs/data/stage2_sa1b.yaml", ["output.dir=data/sa1b_s2"]))

Per image, candidates go through a funnel; each step counts what it keeps and, per reason,
what it drops (the shard reports, :mod:`data_pipeline.tally`), so a report reads where the
candidates went and a threshold can be tuned from it:

=================  =============================================================  =======================
filter             what                                                           rejection reasons
=================  =============================================================  =======================
``detector``       OWLv2 boxes over the vocabulary (:mod:`.detection`)            over_max_detections
``detector_score`` score >= ``rejection.min_detector_score``                      low_detector_score
``sam_iou``        SAM mask per box; predicted IoU >= ``rejection.min_sam_iou``   low_sam_iou
``mask``           ``min_mask_area`` <= area <= ``max_mask_fraction`` of image    empty_mask, too_small,
                                                                                  too_large
``partial``        not a part of an instance (:mod:`.rejection`; needs            partial, unmatched
                   ``partial.path``)
``shortlist``      one per class, one per object, ``selection.shortlist`` best    same_class, overlap,
                                                                                  over_shortlist
``labeler``        a caption (the stage-1 DAM or a VLM, :mod:`.labelers`)         refusal, error, ...
``siglip``         SigLIP(focal crop, caption) >= ``rejection.min_siglip_score``  low_siglip_score
``per_image``      the ``selection.max_per_image`` best                           over_cap
=================  =============================================================  =======================

A threshold set to null turns its filter off (and out of the report); so does a null
``partial.path`` or ``siglip.path``. The SA-1B annotations themselves are not read: stage 2
labels its own detections, and decoding SA-1B's ~100 RLEs per image would cost more CPU than
the detector's GPU time; a corrupt annotation file or image still skips (and counts) its unit.

**Which candidates become rows (at most ``max_per_image``, of different classes).** With
``prescore = detector score x SAM predicted IoU``: candidates are ranked by prescore (ties: detection
order) and shortlisted greedily: one is taken unless an already shortlisted one has its class
("same_class", when ``distinct_classes``), or its mask overlaps a shortlisted mask by an IoU
above ``max_mask_overlap`` ("overlap": the same object under another name, which per-class NMS
cannot see), or ``shortlist`` are taken ("over_shortlist"). Only the shortlist is captioned,
which bounds the labeler's cost per image while leaving spares for captions the labeler or
SigLIP reject. The survivors are ranked by ``score = prescore x SigLIP probability`` (prescore
without SigLIP) and the best ``max_per_image`` become rows, best first; their classes differ by
construction. Row ids are "{source}/{image_id}/det{k}", k the detection's rank by score.

Rows, image storage, sharding and resuming are as in stage 1 (:mod:`data_pipeline.stage1`,
:func:`data_pipeline.sharding.run_sharded`): rerunning the same command skips complete shards;
every model is deterministic on a given device, so a killed and resumed run has the rows of an
uninterrupted one. Models are loaded on first use, so a finished rerun loads none.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dam.configio import ConfigError, to_dict
from dam.errors import DamInputError
from dam.jsonio import read_json
from dam.schema import image_row
from data_pipeline.config import PartialConfig, Stage2Config
from data_pipeline.detection import BoxSegmenter, OwlDetector, load_vocabulary
from data_pipeline.labelers import Labeler, LabelRequest, OwnsLabeler, labeler_config
from data_pipeline.rejection import InstanceSegmenter, SiglipScorer, focal_crop, judge_mask
from data_pipeline.seeds import region_seed
from data_pipeline.sharding import RunSummary, UnitResult, Worker, run_sharded
from data_pipeline.sources import SkipLog, Source, UnitSkipped, WorkUnit, build_source
from data_pipeline.sources.sa1b import Sa1bSource
from data_pipeline.stage1 import LABELER_FILTER, _data_defining, image_root_of, make_labeler, read_answer, stored_image
from data_pipeline.tally import Tally

logger = logging.getLogger(__name__)

__all__ = [
    "FILTERS", "Candidate", "Stage2Models", "Stage2Processor", "run_stage2", "stage2_manifest", "load_image_unit",
    "mask_iou",
]

FILTERS = ("detector", "detector_score", "sam_iou", "mask", "partial", "shortlist", LABELER_FILTER, "siglip", "per_image")
"""The funnel's filter names, in order (see the module docstring)."""


@dataclass
class Candidate:
    """One detected object on its way through the funnel."""

    id: str
    index: int
    """Rank of the detection by score in its image (ties of the rankings below fall back to it)."""
    category: str
    box: np.ndarray  # (4,) x0, y0, x1, y1
    detector_score: float
    mask: np.ndarray | None = None  # (H, W) bool
    sam_iou: float = 0.0
    area: int = 0
    window: tuple[slice, slice] | None = None  # the mask's bounding box
    caption: str | None = None
    siglip_score: float | None = None

    @property
    def prescore(self) -> float:
        """Detector score x SAM predicted IoU: the rank before captioning."""
        return self.detector_score * self.sam_iou

    @property
    def score(self) -> float:
        """The final rank: prescore x SigLIP probability (prescore when SigLIP is off)."""
        return self.prescore * (1.0 if self.siglip_score is None else self.siglip_score)


@dataclass
class Stage2Models:
    """The models of stage 2; ``instances`` and ``siglip`` are None when their filter is off."""

    detector: OwlDetector
    segmenter: BoxSegmenter
    instances: InstanceSegmenter | None = None
    siglip: SiglipScorer | None = None

    @classmethod
    def from_config(cls, config: Stage2Config) -> "Stage2Models":
        """Load every model the config names onto ``config.device`` in ``config.dtype``."""
        device, dtype = config.device, config.dtype
        return cls(
            detector=OwlDetector.from_config(config.detector, device, dtype),
            segmenter=BoxSegmenter.from_config(config.sam, device, dtype),
            instances=InstanceSegmenter.from_config(config.partial, device, dtype) if config.partial.path else None,
            siglip=SiglipScorer.from_config(config.siglip, device, dtype) if config.siglip.path else None,
        )


def check_model_paths(config: Stage2Config) -> None:
    """Stop at once (before any shard) when a configured model file or folder is missing."""
    folders = [("detector.path", config.detector.path, True), ("partial.path", config.partial.path, False),
               ("siglip.path", config.siglip.path, False)]
    for key, path, required in folders:
        if path is None and not required:
            continue
        if not path or not (Path(path).expanduser() / "config.json").is_file():
            raise ConfigError(f"{key}: {path!r} is not a local transformers model folder (no config.json); set {key}")
    if not config.sam.checkpoint or not Path(config.sam.checkpoint).expanduser().is_file():
        raise ConfigError(f"sam.checkpoint: {config.sam.checkpoint!r} is not a file; set it to an official SAM checkpoint (sam_vit_h_4b8939.pth)")


def _sa1b_image_unit(source: Sa1bSource, key: str) -> WorkUnit:
    """The SA-1B unit's image (file, size) from its JSON, its annotations left undecoded."""
    json_path = source.root / key
    try:
        data = read_json(json_path, "SA-1B annotation")
    except DamInputError as exc:
        raise UnitSkipped("corrupt_json", str(exc)) from None
    image = data.get("image") if isinstance(data, dict) else None
    size = (image.get("height"), image.get("width")) if isinstance(image, dict) else (None, None)
    if not isinstance(image, dict) or "image_id" not in image or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size
    ):
        raise UnitSkipped("corrupt_json", f"SA-1B annotation file {str(json_path)!r} lacks image {{image_id, width, height}}")
    file_name = image.get("file_name")
    path = json_path.parent / file_name if isinstance(file_name, str) and file_name else json_path.with_suffix(".jpg")
    if not path.is_file():
        raise UnitSkipped("missing_image", f"image {str(path)!r} of {str(json_path)!r} does not exist")
    unit = f"{source.name}/{image['image_id']}"
    return WorkUnit(unit, source.name, "image", path, size, [], Counter(), {"image_id": image["image_id"], "json": str(json_path)})


def load_image_unit(source: Source, key: str, tally: Tally, log: SkipLog) -> WorkUnit | None:
    """The unit ``key`` for its image only (its regions unused), counted in ``tally``; None when unusable."""
    tally.units_seen += 1
    try:
        unit = _sa1b_image_unit(source, key) if isinstance(source, Sa1bSource) else source.load(key)
    except UnitSkipped as skip:
        tally.skip_unit(skip.reason)
        log.warn(skip.reason, str(skip))
        return None
    return unit


def mask_iou(a: Candidate, b: Candidate) -> float:
    """IoU of two candidates' masks, counting shared pixels only where their bounding boxes meet."""
    (ya, xa), (yb, xb) = a.window, b.window  # type: ignore[misc]
    rows = slice(max(ya.start, yb.start), min(ya.stop, yb.stop))
    cols = slice(max(xa.start, xb.start), min(xa.stop, xb.stop))
    shared = 0
    if rows.start < rows.stop and cols.start < cols.stop:
        shared = int(np.count_nonzero(a.mask[rows, cols] & b.mask[rows, cols]))  # type: ignore[index]
    union = a.area + b.area - shared
    return shared / union if union else 0.0


def _window(mask: np.ndarray) -> tuple[slice, slice]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return slice(0, 0), slice(0, 0)
    return slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)


def funnel(tally: Tally, name: str, candidates: Sequence[Candidate], reason_of: Callable[[Candidate], str | None]) -> list[Candidate]:
    """The candidates ``reason_of`` has no objection to; counted under filter ``name`` (kept also when 0)."""
    passed = []
    for candidate in candidates:
        reason = reason_of(candidate)
        if reason is None:
            passed.append(candidate)
        else:
            tally.reject(name, reason)
    tally.keep(name, len(passed))
    return passed


def partial_reason(verdict: str, config: PartialConfig) -> str | None:
    """The partial filter's rejection reason for a verdict (None: kept)."""
    if verdict == "partial":
        return "partial"
    if verdict == "unmatched" and config.unmatched == "drop":
        return "unmatched"
    return None


class Stage2Processor(OwnsLabeler):
    """One SA-1B image -> its stage-2 rows and tally; plugged into ``run_sharded``.

    Models and labeler are built on first use, so a rerun with every shard complete loads nothing.
    """

    def __init__(
        self, source: Source, config: Stage2Config, models_factory: Callable[[], Stage2Models],
        labeler_factory: Callable[[], Labeler],
    ) -> None:
        self.source, self.config = source, config
        self.image_root = image_root_of(config)  # type: ignore[arg-type]  # reads output and source only
        self._models_factory, self._labeler_factory = models_factory, labeler_factory
        self._models: Stage2Models | None = None
        self.log = SkipLog()

    @property
    def models(self) -> Stage2Models:
        if self._models is None:
            self._models = self._models_factory()
        return self._models

    def __call__(self, key: str) -> UnitResult:
        result = UnitResult()
        tally = result.tally
        unit = load_image_unit(self.source, key, tally, self.log)
        if unit is None:
            return result
        try:
            image = unit.load_image()
            stored = stored_image(unit.path, self.image_root)
        except (UnitSkipped, OSError) as exc:
            reason = exc.reason if isinstance(exc, UnitSkipped) else "unreadable_image"
            tally.skip_unit(reason)
            self.log.warn(reason, str(exc))
            return result
        chosen = self.select(unit, image, result)
        result.regions = tally.kept("detector") + tally.rejected("detector")
        result.rows = [image_row(c.id, stored, c.mask, c.caption, unit.source, c.category) for c in chosen]  # type: ignore[arg-type]
        return result

    def select(self, unit: WorkUnit, image: np.ndarray, result: UnitResult) -> list[Candidate]:
        """The funnel of one decoded image (see the module docstring): the candidates that become rows, best
        first; counted in ``result`` (its tally, and its transient labeler failures)."""
        config, models, tally = self.config, self.models, result.tally
        rejection, selection = config.rejection, config.selection
        found = models.detector.detect(image)
        tally.keep("detector", len(found))
        if found.over_cap:
            tally.reject("detector", "over_max_detections", found.over_cap)
        candidates = [
            Candidate(f"{unit.id}/det{k}", k, found.categories[k], found.boxes[k], float(found.scores[k]))
            for k in range(len(found))
        ]
        if rejection.min_detector_score is not None:
            low = rejection.min_detector_score
            candidates = funnel(tally, "detector_score", candidates, lambda c: "low_detector_score" if c.detector_score < low else None)
        if candidates:
            masks, ious = models.segmenter.segment(image, np.stack([c.box for c in candidates]))
            for candidate, mask, iou in zip(candidates, masks, ious):
                candidate.mask, candidate.sam_iou = mask, float(iou)
                candidate.area, candidate.window = int(np.count_nonzero(mask)), _window(mask)
        if rejection.min_sam_iou is not None:
            least = rejection.min_sam_iou
            candidates = funnel(tally, "sam_iou", candidates, lambda c: "low_sam_iou" if c.sam_iou < least else None)
        largest = None if rejection.max_mask_fraction is None else rejection.max_mask_fraction * image.shape[0] * image.shape[1]

        def mask_reason(c: Candidate) -> str | None:
            if c.area == 0:
                return "empty_mask"
            if c.area < rejection.min_mask_area:
                return "too_small"
            return "too_large" if largest is not None and c.area > largest else None

        candidates = funnel(tally, "mask", candidates, mask_reason)
        if models.instances is not None:
            instances = models.instances.instances(image) if candidates else None
            match = config.partial

            def judged(c: Candidate) -> str | None:
                verdict = judge_mask(c.mask, instances.masks, match_iou=match.match_iou, min_inside=match.min_inside)  # type: ignore[union-attr]
                return partial_reason(verdict.verdict, match)

            candidates = funnel(tally, "partial", candidates, judged)
        candidates = self._shortlist(candidates, tally)
        candidates = self._caption(unit, image, candidates, result)
        if models.siglip is not None:
            if candidates:
                crops = [focal_crop(image, c.mask, config.siglip.alpha, config.siglip.min_size) for c in candidates]  # type: ignore[arg-type]
                for candidate, probability in zip(candidates, models.siglip.scores(crops, [c.caption for c in candidates])):  # type: ignore[misc]
                    candidate.siglip_score = float(probability)
            least_siglip = rejection.min_siglip_score
            if least_siglip is not None:
                candidates = funnel(tally, "siglip", candidates, lambda c: "low_siglip_score" if c.siglip_score < least_siglip else None)  # type: ignore[operator]
        ranked = sorted(candidates, key=lambda c: (-c.score, c.index))
        best = {c.id for c in ranked[: selection.max_per_image]}
        funnel(tally, "per_image", ranked, lambda c: None if c.id in best else "over_cap")
        return ranked[: selection.max_per_image]

    def _shortlist(self, candidates: list[Candidate], tally: Tally) -> list[Candidate]:
        selection = self.config.selection
        chosen: list[Candidate] = []

        def reason(c: Candidate) -> str | None:
            if selection.distinct_classes and any(o.category == c.category for o in chosen):
                return "same_class"
            if any(mask_iou(c, o) > selection.max_mask_overlap for o in chosen):
                return "overlap"
            if len(chosen) >= selection.shortlist:
                return "over_shortlist"
            chosen.append(c)
            return None

        return funnel(tally, "shortlist", sorted(candidates, key=lambda c: (-c.prescore, c.index)), reason)

    def _caption(self, unit: WorkUnit, image: np.ndarray, candidates: list[Candidate], result: UnitResult) -> list[Candidate]:
        size = self.config.batch_size
        failed: dict[str, str] = {}  # candidate id -> rejection reason
        for start in range(0, len(candidates), size):
            batch = candidates[start:start + size]
            requests = [
                LabelRequest(region_id=c.id, image=image, mask=c.mask, category=c.category, seed=region_seed(self.config.seed, c.id))  # type: ignore[arg-type]
                for c in batch
            ]
            answers = self.labeler.label(requests)
            if len(answers) != len(requests):
                raise RuntimeError(f"the labeler returned {len(answers)} results for {len(requests)} requests; it must return one per request")
            for candidate, answer in zip(batch, answers):
                caption, reason = read_answer(answer, f"region {candidate.id!r} of {unit.id!r}", result, self.log)
                if caption is None:
                    failed[candidate.id] = reason  # type: ignore[assignment]
                else:
                    candidate.caption = caption
        return funnel(result.tally, LABELER_FILTER, candidates, lambda c: failed.get(c.id))


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(os.path.expanduser(path))


def stage2_manifest(config: Stage2Config, source: Source, vocabulary: list[str] | None) -> dict[str, Any]:
    """What defines a stage-2 output (recorded in run.json; a rerun must match it).

    Batch sizes and the device say how to run, not what comes out, so they may change between
    reruns; model paths, thresholds, the vocabulary and the dtype may not.
    """
    root = image_root_of(config)  # type: ignore[arg-type]
    detector = {k: v for k, v in to_dict(config.detector).items() if k not in ("text_batch_size", "vocabulary")}
    partial = None if config.partial.path is None else dict(to_dict(config.partial), path=_absolute(config.partial.path))
    siglip = None
    if config.siglip.path is not None:
        siglip = {k: v for k, v in to_dict(config.siglip).items() if k != "batch_size"} | {"path": _absolute(config.siglip.path)}
    return {
        "stage": "stage2", "source": source.name, "kind": source.kind,
        "image_storage": config.output.image_storage, "image_root": None if root is None else str(root),
        "config": {
            "source": to_dict(config.source.resolved()),
            "detector": detector | {"path": _absolute(config.detector.path), "vocabulary": vocabulary},
            "sam": {"checkpoint": _absolute(config.sam.checkpoint), "model_type": config.sam.model_type,
                    "multimask_output": config.sam.multimask_output},
            "partial": partial, "siglip": siglip,
            "rejection": to_dict(config.rejection), "selection": to_dict(config.selection),
            "labeler": _data_defining(config.labeler), "seed": config.seed, "dtype": config.dtype,
        },
    }


def run_stage2(
    config: Stage2Config, *, worker: Worker | None = None, labeler: Labeler | None = None,
    models: Stage2Models | None = None, progress: bool = True,
) -> RunSummary:
    """Run (or resume) this worker's share of stage 2.

    ``labeler`` overrides the config's ``labeler:`` section and ``models`` the model paths (tests,
    or models already in memory); whatever is built from the config is checked before any shard
    starts, loaded on first use, and the labeler closed at the end.
    """
    config.validate()
    if labeler is None:
        labeler_config(config.labeler)  # bad labeler keys stop the run before any work
    if models is None:
        check_model_paths(config)
        vocabulary = load_vocabulary(config.detector.vocabulary)
    else:
        vocabulary = models.detector.vocabulary
        # The manifest records the config's filters: the models given must be the ones it names.
        for key, path, model in (("partial.path", config.partial.path, models.instances), ("siglip.path", config.siglip.path, models.siglip)):
            if (path is None) != (model is None):
                raise ConfigError(f"{key} is {'set' if path else 'null'} but the models given {'lack' if model is None else 'have'} that model; make them agree")
    source = build_source(config.source)
    if source.kind != "image":
        raise ConfigError(f"source.type {config.source.type!r} gives videos; stage2 labels images (use dam-data video)")
    processor = Stage2Processor(
        source, config, (lambda: models) if models is not None else (lambda: Stage2Models.from_config(config)),
        (lambda: labeler) if labeler is not None else (lambda: make_labeler(config.labeler)),
    )
    try:
        return run_sharded(
            source.units(), processor, config.output.dir, stage2_manifest(config, source, vocabulary),
            shard_size=config.output.shard_size, worker=worker, progress=progress, desc=f"stage2 {source.name}",
        )
    finally:
        if labeler is None:
            processor.close()
