"""Overlays: a region drawn on its image with its caption underneath, to check a result by eye.

``draw_overlay`` tints the masked pixels lightly, outlines the mask (a 2 px band just inside
its edge, so the outline never covers pixels outside the region) and writes the caption,
word-wrapped to the image width, in a white band below the image. Pure numpy and PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dam.images import load_image
from dam.masks import load_mask

__all__ = ["draw_overlay", "mask_outline"]

TINT_ALPHA = 0.35
OUTLINE_WIDTH = 2
_MARGIN = 6  # px of white around the caption text
_LINE_SPACING = 3  # px between caption lines


def mask_outline(mask: np.ndarray, thickness: int = OUTLINE_WIDTH) -> np.ndarray:
    """Boundary band of a bool (H, W) mask: ``mask & ~eroded``, eroded by a square of side
    ``2 * thickness + 1`` (so the band is ``thickness`` px wide, inside the mask).

    Pixels outside the image count as background, so a region cut by the image border is
    outlined along that border too.
    """
    mask = np.asarray(mask, dtype=bool)
    height, width = mask.shape
    padded = np.pad(mask, thickness, constant_values=False)  # (H + 2t, W + 2t)
    eroded = np.ones_like(mask)
    for dy in range(2 * thickness + 1):
        for dx in range(2 * thickness + 1):
            eroded &= padded[dy : dy + height, dx : dx + width]
    return mask & ~eroded


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Greedy word wrap to ``max_width`` px; words wider than a line are split between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if draw.textlength(candidate, font=font) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for char in word:
                if line and draw.textlength(line + char, font=font) > max_width:
                    lines.append(line)
                    line = ""
                line += char
        lines.append(line)
    return lines


def draw_overlay(
    image: np.ndarray,
    mask: np.ndarray,
    caption: str,
    color: Sequence[int] = (255, 64, 64),
) -> Image.Image:
    """The image with ``mask`` tinted and outlined in ``color``, and ``caption`` in a band below.

    ``image`` and ``mask`` are anything :func:`dam.images.load_image` and
    :func:`dam.masks.load_mask` accept (the mask at the image's size). Returns an RGB image as
    wide as ``image`` and taller by the caption band.
    """
    pixels = load_image(image)
    region = load_mask(mask, pixels.shape[:2], allow_empty=True)
    rgb = np.asarray(color, dtype=np.float32).reshape(3)
    tinted = pixels.astype(np.float32)
    tinted[region] = (1.0 - TINT_ALPHA) * tinted[region] + TINT_ALPHA * rgb
    out = np.rint(tinted).astype(np.uint8)  # (H, W, 3)
    out[mask_outline(region)] = rgb.astype(np.uint8)

    height, width = region.shape
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = _wrap(caption, measure, font, max(width - 2 * _MARGIN, 1))
    line_height = measure.textbbox((0, 0), "Ag|", font=font)[3] + _LINE_SPACING
    band = 2 * _MARGIN + len(lines) * line_height - _LINE_SPACING

    canvas = Image.new("RGB", (width, height + band), (255, 255, 255))
    canvas.paste(Image.fromarray(out), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((_MARGIN, height + _MARGIN + index * line_height), line, fill=(0, 0, 0), font=font)
    return canvas
