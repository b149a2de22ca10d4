"""Regions of one image as the dense-captioning tools pass them around: boxes, scores, masks.

Boxes are [x0, y0, x1, y1] in the image's pixels with continuous coordinates (x1 = x0 + width,
as Visual Genome and DenseCap's evaluation use them). A mask, when a proposer segments (SAM),
is a bool (H, W) array; DAM always needs one, so `box_to_mask` turns a box into the mask of the
pixels whose centres it contains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dam.errors import DamInputError


@dataclass
class Regions:
    """Proposed regions of one image, best first."""

    boxes: np.ndarray
    """(N, 4) float64 [x0, y0, x1, y1] in original pixels."""
    scores: np.ndarray
    """(N,) the proposer's confidence (FCLN: final score; SAM: predicted IoU x stability)."""
    masks: list[np.ndarray] | None = None
    """N bool (H, W) masks when the proposer segments, else None."""
    fcln_codes: Any = None
    """(N, D) FCLN region codes when an FCLN proposed the boxes (reused to caption and score them)."""
    fcln_model: Any = field(default=None, repr=False)
    """The FclnModel the codes belong to: codes of another model are not reused."""

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        self.scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        if len(self.scores) != len(self.boxes):
            raise DamInputError(f"{len(self.boxes)} boxes but {len(self.scores)} scores; give one score per box")
        if self.masks is not None and len(self.masks) != len(self.boxes):
            raise DamInputError(f"{len(self.boxes)} boxes but {len(self.masks)} masks; give one mask per box")

    def __len__(self) -> int:
        return len(self.boxes)

    def head(self, count: int) -> "Regions":
        """The first `count` regions."""
        return self.subset(range(min(count, len(self))))

    def subset(self, indices: Sequence[int]) -> "Regions":
        """The regions at `indices`, in that order."""
        picked = list(indices)
        codes = None if self.fcln_codes is None else self.fcln_codes[picked]
        masks = None if self.masks is None else [self.masks[i] for i in picked]
        return Regions(self.boxes[picked].reshape(-1, 4), self.scores[picked], masks, codes, self.fcln_model)


def clip_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """`box` clipped to the image [0, width] x [0, height]."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([min(max(x0, 0.0), width), min(max(y0, 0.0), height),
                     min(max(x1, 0.0), width), min(max(y1, 0.0), height)])


def _pixel_span(start: float, end: float, limit: int) -> tuple[int, int]:
    """[first, last) pixel indices whose centres (i + 0.5) lie in [start, end); at least one pixel."""
    first = max(0, math.ceil(start - 0.5))
    last = min(limit, math.ceil(end - 0.5))
    if last <= first:  # a box thinner than a pixel still names the pixel it sits on
        first = min(max(int(math.floor((start + end) / 2)), 0), limit - 1)
        last = first + 1
    return first, last


def box_to_mask(box: Any, height: int, width: int) -> np.ndarray:
    """Bool (height, width) mask of the pixels whose centres lie inside `box` [x0, y0, x1, y1].

    Used where DAM needs a mask and only a box exists (FCLN proposals without SAM): the mask is
    the box's rectangle, so DAM describes what the box holds, background corners included.
    """
    x0, y0, x1, y1 = clip_box(np.asarray(box, dtype=np.float64), height, width)
    cols = _pixel_span(x0, x1, width)
    rows = _pixel_span(y0, y1, height)
    mask = np.zeros((height, width), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """[x0, y0, x1, y1] of a bool mask's pixels, x1 = last column + 1 (continuous coordinates);
    zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return np.zeros(4)
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=np.float64)
