"""What every data source gives the pipeline: work units (an image or a video) and their regions.

A source lists its work units cheaply and in a deterministic order (``Source.units()``: keys,
the same on every worker and every run), and loads one unit on demand (``Source.load(key)``):
its file, frame size and regions. Region ids are stable across runs ("coco/397133/1234"), so
reruns, shards and merges can be checked by id.

Problems in the input never stop a run: a region whose annotation is unusable (bad RLE,
crowd, empty) is left out and counted in ``WorkUnit.rejected`` by reason; a unit that cannot
be used at all (truncated JSON, missing or undecodable image) raises :class:`UnitSkipped`
with a reason, which the caller counts (:func:`load_unit`). Warnings name the file; after a
few per reason they are logged at debug level only, so a bad dataset does not flood the log.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from dam.errors import DamInputError
from dam.images import load_image
from dam.masks import load_mask, mask_to_rle
from data_pipeline.tally import Tally

logger = logging.getLogger(__name__)

SOURCE_FILTER = "source"  # the tally filter name for regions a source leaves out
_WARNINGS_PER_REASON = 5


@dataclass
class Region:
    """One object to caption: a mask in an image, or a masklet through a video."""

    id: str
    """Stable across runs: "{source}/{unit}/{annotation}" (e.g. "coco/397133/1234")."""
    category: str | None
    """Class name when the source has one ("dog", PACO parts "dog:ear"), else None."""
    area: int
    """Foreground pixels (video: of the frame where the object is largest)."""
    mask: dict | None = None
    """Image regions: the mask as COCO compressed RLE (``dam.masks.mask_to_rle``), image-sized."""
    frame_masks: dict[int, dict] | None = None
    """Video regions: {video frame index: RLE} for the annotated frames (empty RLE = not visible)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Source-specific fields (SA-1B: predicted_iou, stability_score, bbox, ...)."""

    def decode_mask(self) -> np.ndarray:
        """The image region's mask as bool (H, W)."""
        if self.mask is None:
            raise DamInputError(f"region {self.id!r} is a video masklet; it has frame_masks, not a mask")
        return load_mask(self.mask, allow_empty=True)


@dataclass
class WorkUnit:
    """One image or one video with its regions, as a source loads it."""

    id: str
    """"{source}/{key}" (e.g. "coco/397133")."""
    source: str
    """The source's name: the rows' ``source`` column and the ids' prefix."""
    kind: Literal["image", "video"]
    path: Path
    """The image or video file."""
    size: tuple[int, int]
    """(H, W) the annotations were made at; the file must decode to this size."""
    regions: list[Region]
    rejected: Counter[str] = field(default_factory=Counter)
    """Regions the source left out, by reason ("iscrowd", "bad_mask", ...)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Source-specific unit fields (SA-V: fps, num_frames, video_* fields)."""

    def load_image(self) -> np.ndarray:
        """The image as uint8 (H, W, 3), decoded as ``dam.schema.decode_row`` will decode it.

        Raises :class:`UnitSkipped` when the file cannot be decoded or has another size than
        its annotations (e.g. an EXIF rotation the annotators did not see).
        """
        try:
            pixels = load_image(self.path)
        except DamInputError as exc:
            raise UnitSkipped("corrupt_image", str(exc)) from None
        if pixels.shape[:2] != tuple(self.size):
            raise UnitSkipped(
                "image_size_mismatch",
                f"image {str(self.path)!r} decodes to {pixels.shape[0]}x{pixels.shape[1]} (HxW) but its annotations "
                f"are {self.size[0]}x{self.size[1]}",
            )
        return pixels


class UnitSkipped(Exception):
    """A work unit cannot be used; ``reason`` is its short tally key ("corrupt_json", ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Source(Protocol):
    """A dataset of work units. Implementations live beside this module (coco, sa1b, ...)."""

    name: str
    """Rows' ``source`` column and the ids' prefix ("coco", "lvis", "sa1b", ...)."""
    kind: Literal["image", "video"]
    root: Path
    """Folder the unit files live under (the default image root of path-mode rows)."""

    def units(self) -> Sequence[str]:
        """Keys of all work units, in a deterministic order (cheap: no file is parsed per unit)."""
        ...

    def load(self, key: str) -> WorkUnit:
        """The unit ``key`` with its regions; raises UnitSkipped when it is unusable."""
        ...


class SkipLog:
    """Warnings about skipped inputs: the first few per reason, then debug level only."""

    def __init__(self) -> None:
        self._seen: Counter[str] = Counter()

    def warn(self, reason: str, message: str) -> None:
        self._seen[reason] += 1
        count = self._seen[reason]
        if count <= _WARNINGS_PER_REASON:
            suffix = f" (further {reason!r} warnings are logged at debug level)" if count == _WARNINGS_PER_REASON else ""
            logger.warning("skipped (%s): %s%s", reason, message, suffix)
        else:
            logger.debug("skipped (%s): %s", reason, message)


def load_unit(source: Source, key: str, tally: Tally, log: SkipLog) -> WorkUnit | None:
    """``source.load(key)`` with the outcome counted in ``tally``: None when the unit is unusable.

    Counts the unit as seen, and the source's rejected and kept regions under filter "source".
    """
    tally.units_seen += 1
    try:
        unit = source.load(key)
    except UnitSkipped as skip:
        tally.skip_unit(skip.reason)
        log.warn(skip.reason, str(skip))
        return None
    for reason, count in unit.rejected.items():
        tally.reject(SOURCE_FILTER, reason, count)
    tally.keep(SOURCE_FILTER, len(unit.regions))
    return unit


class RegionRejected(Exception):
    """An annotation cannot become a region; ``reason`` is its short tally key ("bad_mask", ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def rle_region(
    region_id: str, segmentation: Any, size: tuple[int, int], category: str | None, extra: dict[str, Any] | None = None,
) -> Region:
    """A Region from an annotation's segmentation (polygons, RLE); raises RegionRejected if unusable.

    The mask is checked (sizes, RLE run lengths, polygon shapes: ``dam.masks.load_mask``) and
    re-encoded as canonical compressed RLE; its pixel count is the region's area.
    """
    try:
        mask = load_mask(segmentation, size, allow_empty=True)
    except DamInputError as exc:
        raise RegionRejected("bad_mask", f"region {region_id!r}: {exc}") from None
    area = int(np.count_nonzero(mask))
    if area == 0:
        raise RegionRejected("empty_mask", f"region {region_id!r} has an empty mask")
    return Region(region_id, category, area, mask=mask_to_rle(mask), extra=dict(extra or {}))
