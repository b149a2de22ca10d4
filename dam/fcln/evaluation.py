"""What DenseCap's evaluation needs in both `train` (FCLN test split) and `bench` (densecap-run).

`train` and `bench` may not import each other (DESIGN.md), so the pieces both use live here:

- `filter_region`: the paper's per-region preprocessing, which decides the ground truth an
  evaluation scores against (phrase normalised, regions longer than `max_words` words dropped,
  empty phrases and boxes that are empty once clipped to the image dropped);
- `region_descriptions_entry`: one image of a ground-truth file in Visual Genome's
  region_descriptions.json layout, so the evaluated references can be scored again with
  `dam-bench densecap --gt`;
- `prediction_record`: one entry of a predictions file, {"image_id", "box": [x1, y1, x2, y2],
  "score", "caption"}, as `dam-bench densecap --pred` reads it;
- `PredictionCheckpoint`: the predictions of a long run, checkpointed image by image so that a
  killed run resumes where it stopped instead of captioning 5,000 images again (its settings
  hold the model's `dam.fingerprint.model_identity`, so two models' predictions never mix).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dam.errors import DamInputError
from dam.fcln.vocabulary import tokenize
from dam.jsonio import read_json, write_json_atomic
from dam.visual_genome import normalize_caption

logger = logging.getLogger(__name__)

PAPER_MAX_WORDS = 10
"""DenseCap drops ground-truth regions with more words than this (train and evaluate alike)."""

Box = tuple[float, float, float, float]


def filter_region(phrase: str, box: Sequence[float], height: float, width: float,
                  max_words: int = PAPER_MAX_WORDS) -> tuple[str, Box] | str:
    """A ground-truth region as DenseCap keeps it: (normalised phrase, box clipped to the
    width x height image), or, when the region is dropped, the reason as a stats key:
    "regions_empty_phrase", "regions_too_long" or "regions_empty_box" (under one pixel wide or
    high after clipping)."""
    words = tokenize(normalize_caption(phrase))
    if not words:
        return "regions_empty_phrase"
    if len(words) > max_words:
        return "regions_too_long"
    x1, y1, x2, y2 = (float(v) for v in box)
    x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
    y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    if x2 - x1 < 1 or y2 - y1 < 1:
        return "regions_empty_box"
    return " ".join(words), (x1, y1, x2, y2)


def region_descriptions_entry(image_id: Hashable, boxes: Iterable[Sequence[float]],
                              phrases: Iterable[str]) -> dict[str, Any]:
    """One image of a region_descriptions.json: {"id", "regions": [{"image_id", "phrase", "x",
    "y", "width", "height"}]} from xyxy boxes and their phrases."""
    return {
        "id": image_id,
        "regions": [
            {"image_id": image_id, "phrase": phrase, "x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1}
            for (x1, y1, x2, y2), phrase in zip(boxes, phrases)
        ],
    }


def prediction_record(image_id: Hashable, box: Sequence[float], score: float, caption: str) -> dict[str, Any]:
    """One detection of a predictions file; boxes to 0.01 px and scores to 1e-6 keep files small
    without changing any IoU threshold decision that matters at pixel scale."""
    return {"image_id": image_id, "box": [round(float(v), 2) for v in box], "score": round(float(score), 6),
            "caption": caption}


_CHUNK = re.compile(r"chunk-(\d+)\.json")
SETTINGS_FILE = "settings.json"


class PredictionCheckpoint:
    """Per-image predictions of a run, in `folder` as atomically written chunk files.

    `add` writes the results of some images (their ids, with or without detections) as one
    chunk-N.json, renamed into place, so a chunk on disk is always complete and a killed run
    loses at most the images in flight. `done` tells a rerun which images to skip and
    `predictions` gathers everything in a fixed image order. `settings` (the model, its weights'
    stamp, thresholds, ...) are stored on first use, so two models' predictions never mix in one
    file: a checkpoint made with other settings is an error, or, with `replace_stale` (for
    folders the program owns rather than the user), discarded with a warning.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict[str, Any], *, replace_stale: bool = False,
                 what: str = "predictions") -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        settings_path = self.folder / SETTINGS_FILE
        previous = read_json(settings_path, f"{what} checkpoint settings") if settings_path.is_file() else None
        if previous is not None and previous != settings:
            if not replace_stale:
                raise DamInputError(
                    f"the {what} checkpoint in {str(self.folder)!r} was made with other settings ({previous}) than "
                    f"this run ({settings}); delete that folder to start over, or write to another output"
                )
            logger.warning("discarding the %s checkpoint in %s: it was made with other settings", what, self.folder)
            for path in self.folder.glob("chunk-*.json"):
                path.unlink()
        if previous != settings:
            write_json_atomic(settings_path, settings)
        self._by_image: dict[str, list[dict[str, Any]]] = {}
        self._next = 0
        for path in sorted(self.folder.glob("chunk-*.json")):
            match = _CHUNK.fullmatch(path.name)
            if match is None:
                continue
            chunk = read_json(path, f"{what} checkpoint chunk")
            for entry in chunk:
                self._by_image[str(entry["image_id"])] = entry["predictions"]
            self._next = max(self._next, int(match.group(1)) + 1)
        if self._by_image:
            logger.info("resuming: %d images already done in %s", len(self._by_image), self.folder)

    def done(self) -> set[str]:
        """str() of the ids of the images whose predictions are stored."""
        return set(self._by_image)

    def add(self, results: Iterable[tuple[Hashable, list[dict[str, Any]]]]) -> None:
        """Store (image id, its prediction records) pairs as one chunk."""
        chunk = [{"image_id": image_id, "predictions": records} for image_id, records in results]
        if not chunk:
            return
        write_json_atomic(self.folder / f"chunk-{self._next:06d}.json", chunk)
        self._next += 1
        for entry in chunk:
            self._by_image[str(entry["image_id"])] = entry["predictions"]

    def predictions(self, image_ids: Iterable[Hashable]) -> list[dict[str, Any]]:
        """The stored records of `image_ids`, in that order (images not done contribute none)."""
        return [record for image_id in image_ids for record in self._by_image.get(str(image_id), [])]
