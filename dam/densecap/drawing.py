"""Dense captions baked into a picture, as DenseCap's demo drew them: numbered boxes (and masks,
when the regions have them: SAM's) in distinct colours, each caption on a coloured label at its box.

The best region is drawn last, so it stays on top where regions overlap. Pure numpy and PIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dam.overlay import mask_outline

# Twelve well-separated colours (Tableau-like); region i gets PALETTE[i % 12].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (255, 187, 120), (152, 223, 138),
)
MASK_ALPHA = 0.35


def region_color(index: int) -> tuple[int, int, int]:
    """The colour of the index-th region (the viewer uses the same palette)."""
    return PALETTE[index % len(PALETTE)]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 scales its built-in font
    except TypeError:
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
         max_width: float) -> str:
    """`text`, cut with an ellipsis where it would be wider than `max_width` px (long DAM captions)."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    low, high = 0, len(text)  # the longest prefix that fits with the ellipsis: binary search
    while low < high:
        middle = (low + high + 1) // 2
        if draw.textlength(text[:middle] + "...", font=font) <= max_width:
            low = middle
        else:
            high = middle - 1
    return text[:low] + "..."


def draw_dense_captions(image: np.ndarray, boxes: np.ndarray, captions: Sequence[str],
                        masks: Sequence[np.ndarray] | None = None) -> Image.Image:
    """`image` (uint8 (H, W, 3)) with every region drawn: mask tint and outline when `masks` are
    given, box, and "i. caption" on a label in the region's colour at the box's top-left corner."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float32)
    outlines = []
    if masks is not None:
        for index in reversed(range(len(masks))):
            color = np.asarray(region_color(index), dtype=np.float32)
            pixels[masks[index]] = (1 - MASK_ALPHA) * pixels[masks[index]] + MASK_ALPHA * color
            outlines.append((mask_outline(masks[index]), region_color(index)))
    out = np.rint(pixels).astype(np.uint8)
    for outline, color in outlines:
        out[outline] = color
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    scale = max(height, width)
    line = max(1, round(scale / 300))
    font = _font(max(10, round(scale / 45)))
    for index in reversed(range(len(boxes))):
        x0, y0, x1, y1 = (float(v) for v in boxes[index])
        color = region_color(index)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=color, width=line)
        pad = max(1, line)
        label = _fit(draw, f"{index + 1}. {captions[index]}" if index < len(captions) else f"{index + 1}.",
                     font, width - 2 * pad)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        # Keep the label inside the picture: above the box when there is room, else inside it.
        lx = min(max(0.0, x0), max(0.0, width - label_w))
        ly = y0 - label_h if y0 - label_h >= 0 else min(max(0.0, y0), max(0.0, height - label_h))
        draw.rectangle([lx, ly, lx + label_w, ly + label_h], fill=color)
        text_color = (0, 0, 0) if sum(color) > 450 else (255, 255, 255)
        draw.text((lx + pad - left, ly + pad - top), label, fill=text_color, font=font)
    return canvas
