"""The focal prompt: a mask's box, grown to at least 48 px and expanded by alpha, as DAM crops.

The geometry follows the released DAM exactly (DESIGN.md): the box of the mask's pixels is
floored to `min_size` around its centre (with Python's `int` truncation of the new corner),
then the crop spans [x0 - (alpha-1)/2*w, x0 + (alpha+1)/2*w) clipped to the image; with
alpha = 3 that is [x0 - w, x0 + 2w), the crop every released checkpoint was trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dam.errors import DamInputError


@dataclass(frozen=True)
class FocalPrompt:
    """The four views of one region: the full image and mask, and the focal crop of both."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool
    crop: np.ndarray  # (h, w, 3) uint8
    crop_mask: np.ndarray  # (h, w) bool
    box: tuple[int, int, int, int]  # crop (x0, y0, x1, y1), exclusive ends

    @property
    def crop_is_full_image(self) -> bool:
        """True when the grown box covers the whole image (the reference skips its adapters)."""
        height, width = self.mask.shape
        return self.box == (0, 0, width, height)


def _expanded_span(start: int, extent: int, alpha: float, limit: int) -> tuple[int, int]:
    low = start - (alpha - 1) / 2 * extent
    high = start + (alpha + 1) / 2 * extent
    # floor/ceil keep the whole expanded box; for integer alpha*extent/2 both are exact.
    return max(math.floor(low), 0), min(math.ceil(high), limit)


def focal_crop_box(
    mask: np.ndarray, alpha: float = 3.0, min_size: int = 48
) -> tuple[int, int, int, int]:
    """Crop box (x0, y0, x1, y1), exclusive ends in pixels, of the focal view of `mask`.

    Raises DamInputError (a ValueError) when the mask has no pixels.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DamInputError(f"focal_crop_box needs a 2-D (H, W) mask, got shape {mask.shape}")
    if alpha < 1:
        raise DamInputError(f"alpha must be >= 1 (the crop contains the box), got {alpha}")
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise DamInputError("the mask has no pixels: give a mask with at least one foreground pixel")
    x_min, y_min = int(cols[0]), int(rows[0])
    box_w, box_h = int(cols[-1]) - x_min + 1, int(rows[-1]) - y_min + 1
    x_centre, y_centre = x_min + box_w / 2, y_min + box_h / 2
    box_w, box_h = max(box_w, min_size), max(box_h, min_size)
    x0, y0 = int(x_centre - box_w / 2), int(y_centre - box_h / 2)
    height, width = mask.shape
    left, right = _expanded_span(x0, box_w, alpha, width)
    top, bottom = _expanded_span(y0, box_h, alpha, height)
    return left, top, right, bottom


def build_focal_prompt(
    image: np.ndarray, mask: np.ndarray, alpha: float = 3.0, min_size: int = 48
) -> FocalPrompt:
    """The focal prompt of one region: (full image, full mask, crop, crop mask) and the crop box.

    `image` is (H, W, 3) uint8 and `mask` (H, W) bool, as `dam.images.load_image` and
    `dam.masks.load_mask` return them; the crops are views, not copies.
    """
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.shape[:2] != mask.shape:
        raise DamInputError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image is "
            f"{image.shape[0]}x{image.shape[1]}: pass a mask of the image's size"
        )
    x0, y0, x1, y1 = focal_crop_box(mask, alpha=alpha, min_size=min_size)
    return FocalPrompt(
        image=image,
        mask=mask,
        crop=image[y0:y1, x0:x1],
        crop_mask=mask[y0:y1, x0:x1],
        box=(x0, y0, x1, y1),
    )
