"""What a VLM labeler sees of one region: the focal crop and the full image, region highlighted.

A general VLM has no mask input, so the region is drawn into the pixels, in two views:

- the **focal crop**: the same box as DAM's focal prompt (:func:`dam.focal.focal_crop_box`,
  one definition of the geometry), so the labeler sees the detail the model will later be
  trained to describe; by default (``crop_style: outline``) with the region's outline drawn and
  the surroundings left as they are, because the context in a crop is what tells a VLM what the
  object is, and dimming it would hide that;
- the **full (masked) image**: the whole picture with everything outside the region darkened
  and the outline drawn (``full_style: both``), so that even a small region is easy to find.

The outline is a band of ``outline_width`` pixels just *outside* the region (a dilation of the
mask minus the mask): the region's own pixels keep their colours, which matters for thin
objects (a pole, a strap) that an inside band would paint over entirely. Views larger than
``max_side`` are downscaled before drawing, so the outline is ``outline_width`` pixels wide in
the image the labeler receives, and a region is never lost by the downscale (any coverage of a
downscaled pixel counts as the region).

``to_data_url`` encodes a view as the ``data:`` URL an OpenAI-compatible chat request carries.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from PIL import Image

from dam.errors import DamInputError
from dam.focal import focal_crop_box

__all__ = ["ViewConfig", "RegionViews", "render_views", "highlight", "to_data_url", "describe_views"]

Style = Literal["outline", "dim", "both", "none"]

_COLOR_NAMES = {
    (255, 0, 0): "red",
    (0, 255, 0): "green",
    (0, 0, 255): "blue",
    (255, 255, 0): "yellow",
    (255, 0, 255): "magenta",
    (0, 255, 255): "cyan",
    (255, 255, 255): "white",
}


@dataclass
class ViewConfig:
    """How a region is shown to a VLM labeler (the ``views:`` section of a labeler config)."""

    alpha: float = 3.0
    """Focal crop expansion, as the DAM focal prompt (dam.focal)."""
    min_size: int = 48
    """Floor of the region's box side before expansion, in pixels (dam.focal)."""
    crop_style: Style = "outline"
    """Focal crop: outline the region, dim its surroundings, both, or none."""
    full_style: Style = "both"
    """Full image: outline, dim, both, or none (a full image without a highlight is ambiguous)."""
    color: list[int] = field(default_factory=lambda: [255, 0, 0])
    """RGB colour of the outline."""
    outline_width: int = 3
    """Outline width in pixels of the image sent (after any downscale)."""
    dim: float = 0.6
    """Share of brightness taken from pixels outside the region when dimming (0: none, 1: black)."""
    max_side: int | None = 1024
    """Views whose longer side exceeds this are downscaled (saves bandwidth and VLM tokens); null: never."""
    image_format: Literal["jpeg", "png"] = "jpeg"
    """Encoding of the views sent over HTTP."""
    jpeg_quality: int = 90
    """JPEG quality (1-95)."""

    def __post_init__(self) -> None:
        if len(self.color) != 3 or not all(0 <= int(c) <= 255 for c in self.color):
            raise DamInputError(f"views.color must be three 0-255 values [r, g, b], got {self.color}")
        if self.outline_width < 1:
            raise DamInputError(f"views.outline_width must be >= 1 pixel, got {self.outline_width}")
        if not 0.0 <= self.dim <= 1.0:
            raise DamInputError(f"views.dim must be in [0, 1], got {self.dim}")
        if self.max_side is not None and self.max_side < 16:
            raise DamInputError(f"views.max_side must be >= 16 pixels (or null), got {self.max_side}")
        if not 1 <= self.jpeg_quality <= 95:
            raise DamInputError(f"views.jpeg_quality must be in 1..95, got {self.jpeg_quality}")
        if self.alpha < 1:
            raise DamInputError(f"views.alpha must be >= 1 (the crop contains the region), got {self.alpha}")
        if self.min_size < 1:
            raise DamInputError(f"views.min_size must be >= 1, got {self.min_size}")


@dataclass(frozen=True)
class RegionViews:
    """The two views of one region, as uint8 RGB arrays."""

    crop: np.ndarray  # (h, w, 3) the focal crop, highlighted per crop_style
    full: np.ndarray  # (H', W', 3) the whole image, highlighted per full_style ("masked image")
    box: tuple[int, int, int, int]  # focal crop (x0, y0, x1, y1) in the original image, exclusive ends


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilation by a (2r+1)-square, separably (2r shifts per axis instead of (2r+1)^2)."""
    out = mask.copy()
    for axis in (0, 1):
        grown = out.copy()
        length = out.shape[axis]
        for step in range(1, min(radius, length - 1) + 1):
            if axis == 0:
                grown[step:] |= out[:-step]
                grown[:-step] |= out[step:]
            else:
                grown[:, step:] |= out[:, :-step]
                grown[:, :-step] |= out[:, step:]
        out = grown
    return out


def highlight(
    image: np.ndarray,
    mask: np.ndarray,
    style: Style,
    *,
    color: tuple[int, int, int] | list[int] = (255, 0, 0),
    outline_width: int = 3,
    dim: float = 0.6,
) -> np.ndarray:
    """A copy of ``image`` (H, W, 3) uint8 with the region ``mask`` (H, W) bool highlighted."""
    out = np.array(image, dtype=np.uint8, copy=True)
    if style in ("dim", "both") and dim > 0:
        outside = ~mask
        out[outside] = np.rint(out[outside].astype(np.float32) * (1.0 - dim)).astype(np.uint8)
    if style in ("outline", "both"):
        band = _dilate(mask, outline_width) & ~mask  # just outside the region
        out[band] = np.asarray(color, dtype=np.uint8)
    return out


def _downscale(image: np.ndarray, mask: np.ndarray, max_side: int | None) -> tuple[np.ndarray, np.ndarray]:
    height, width = mask.shape
    longer = max(height, width)
    if max_side is None or longer <= max_side:
        return image, mask
    scale = max_side / longer
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # PIL (width, height)
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0))
    # Box-filtered coverage > 0 keeps every region visible, however small, after the downscale.
    coverage = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(size, Image.Resampling.BOX))
    return small, coverage > 0


def render_views(image: np.ndarray, mask: np.ndarray, config: ViewConfig | None = None) -> RegionViews:
    """The focal crop and the full image of region ``mask`` with the highlight ``config`` asks for.

    ``image`` is (H, W, 3) uint8 and ``mask`` (H, W) bool with at least one pixel; anything else
    raises DamInputError (from dam.focal) naming the problem.
    """
    config = config or ViewConfig()
    image = np.asarray(image)
    mask = np.asarray(mask, dtype=bool)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise DamInputError(f"image must be a (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    if image.shape[:2] != mask.shape:
        raise DamInputError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but the image is {image.shape[0]}x{image.shape[1]}"
        )
    x0, y0, x1, y1 = focal_crop_box(mask, alpha=config.alpha, min_size=config.min_size)
    style = dict(color=config.color, outline_width=config.outline_width, dim=config.dim)
    crop, crop_mask = _downscale(image[y0:y1, x0:x1], mask[y0:y1, x0:x1], config.max_side)
    full, full_mask = _downscale(image, mask, config.max_side)
    return RegionViews(
        crop=highlight(crop, crop_mask, config.crop_style, **style),
        full=highlight(full, full_mask, config.full_style, **style),
        box=(x0, y0, x1, y1),
    )


def encode_image(array: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> bytes:
    """``array`` (H, W, 3) uint8 as JPEG or PNG bytes."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    elif image_format == "png":
        Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # speed over size
    else:
        raise DamInputError(f"image_format must be 'jpeg' or 'png', got {image_format!r}")
    return buffer.getvalue()


def to_data_url(array: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> str:
    """``array`` as a ``data:image/...;base64,...`` URL, the form OpenAI-compatible servers accept."""
    payload = base64.b64encode(encode_image(array, image_format, quality)).decode("ascii")
    return f"data:image/{image_format};base64,{payload}"


def _style_phrase(style: Style, color: str) -> str:
    return {
        "outline": f"outlined in {color}",
        "dim": "shown with everything around it darkened",
        "both": f"outlined in {color} with everything around it darkened",
    }[style]


def describe_views(config: ViewConfig | None = None) -> str:
    """The prompt sentence that tells the labeler what its two images show, matching ``config``."""
    config = config or ViewConfig()
    color = _COLOR_NAMES.get(tuple(int(c) for c in config.color), "a bright color")
    crop = "The first image is a close-up of the object"
    if config.crop_style != "none":
        crop += ", " + _style_phrase(config.crop_style, color)
    full = "the second image is the whole picture"
    if config.full_style != "none":
        full += ", where the object is " + _style_phrase(config.full_style, color)
    return f"{crop}; {full}."
