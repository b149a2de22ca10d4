"""Mask inputs: every format a user or dataset holds a region in -> one bool (H, W) array.

Users hold masks as bool or 0/255 arrays, torch tensors from SAM, PNG files (grayscale, palette
or alpha cut-outs), COCO RLE (compressed or not), polygons, or whole COCO annotations.
``load_mask`` accepts all of them so that nothing downstream (focal crop, processor, datasets)
has to guess, and it rejects what would silently give a wrong region: a mask of another size
than its image, an empty mask, logits, label maps with values above 255, colour images.

Thresholds, chosen per mask from its largest value: 0/1 (and floats in [0, 1]) -> ``> 0.5``;
0-255 -> ``>= 128``; 16-bit PNGs / uint16 with values above 255 -> ``>= 32768``. An alpha
channel is the mask when it varies; a uniform alpha carries no region, so the colour is used.

``mask_to_rle`` / ``rle_to_mask`` are the JSON-friendly storage format of the datasets, and
``mask_bbox`` is the tight box the focal prompt starts from.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dam.errors import DamInputError
from dam.images import is_torch_tensor, open_image_file, tensor_to_numpy

__all__ = ["load_mask", "mask_to_rle", "rle_to_mask", "mask_bbox"]

_ACCEPTED = (
    "a numpy array or torch tensor of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) holding "
    "bool, 0/1 or 0-255 values; a PIL image; a path to an image file (PNG, ...); a COCO RLE dict "
    "{'size': [h, w], 'counts': ...}; polygons [[x1, y1, x2, y2, ...], ...] (with image_size); "
    "or a COCO annotation dict with a 'segmentation' key"
)


def load_mask(
    mask: Any,
    image_size: tuple[int, int] | None = None,
    *,
    allow_empty: bool = False,
) -> np.ndarray:
    """Return ``mask`` as a C-contiguous bool array of shape (H, W).

    ``image_size`` is the (height, width) of the image the mask belongs to: the mask must have
    that size, and polygons (which carry no size) need it to be rasterised. Empty masks raise
    unless ``allow_empty``, because captioning "nothing" is never what the caller meant.
    A bool C-contiguous numpy input is returned as is, without a copy.
    """
    size = None if image_size is None else _check_image_size(image_size)
    out = np.ascontiguousarray(_convert(mask, size), dtype=bool)
    if size is not None and out.shape != size:
        hint = ""
        if out.shape == size[::-1]:
            hint = " (image_size is (height, width); was it given as (width, height)?)"
        raise DamInputError(
            f"mask is {out.shape[0]}x{out.shape[1]} (HxW) but the image is {size[0]}x{size[1]}; "
            f"pass a mask of the image's size{hint}"
        )
    if not allow_empty and not out.any():
        raise DamInputError(
            f"mask has no pixels (all {out.shape[0]}x{out.shape[1]} are background); give a mask "
            f"with at least one foreground pixel (True, > 0.5 on a 0-1 scale, >= 128 on 0-255)"
        )
    return out


def mask_to_rle(mask: np.ndarray) -> dict:
    """Encode a mask as compressed COCO RLE ``{"size": [h, w], "counts": str}`` (JSON-ready).

    Any input ``load_mask`` accepts works; an empty mask is encoded too.
    """
    binary = load_mask(mask, allow_empty=True)
    encoded = mask_utils.encode(np.asfortranarray(binary, dtype=np.uint8))
    height, width = binary.shape
    return {"size": [int(height), int(width)], "counts": encoded["counts"].decode("utf-8")}


def rle_to_mask(rle: dict) -> np.ndarray:
    """Decode COCO RLE (compressed str/bytes counts, or an uncompressed list) to bool (H, W).

    The counts are checked to cover exactly ``size`` pixels: pycocotools does not check, and
    decodes a mismatched RLE into garbage.
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        keys = sorted(rle) if isinstance(rle, dict) else type(rle).__name__
        raise DamInputError(f"COCO RLE must be a dict with 'size' and 'counts'; got {keys}")
    height, width = _rle_size(rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str):
        try:
            counts = counts.encode("ascii")
        except UnicodeEncodeError:
            raise DamInputError(
                "RLE 'counts' string has non-ASCII characters; it is not COCO compressed RLE"
            ) from None
    if isinstance(counts, (bytes, bytearray)):
        counts = bytes(counts)
        _check_runs(_decode_counts(counts), height, width)
        compressed = {"size": [height, width], "counts": counts}
    elif isinstance(counts, (list, tuple, np.ndarray)):
        runs = _integer_runs(counts)
        _check_runs(runs, height, width)
        compressed = mask_utils.frPyObjects(
            {"size": [height, width], "counts": runs.tolist()}, height, width
        )
    else:
        raise DamInputError(
            f"RLE 'counts' is a {type(counts).__name__}; expected a compressed str/bytes or an "
            f"uncompressed list of run lengths"
        )
    return np.ascontiguousarray(mask_utils.decode(compressed), dtype=bool)


def mask_bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Return ``(x_min, y_min, x_max, y_max)`` of the foreground, max exclusive (slice-ready).

    Any input ``load_mask`` accepts works; an empty mask raises ``DamInputError``.
    """
    binary = load_mask(mask)
    rows = np.flatnonzero(binary.any(axis=1))
    cols = np.flatnonzero(binary.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _convert(mask: Any, size: tuple[int, int] | None) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        return _from_array(mask, "mask array")
    if is_torch_tensor(mask):
        return _from_array(tensor_to_numpy(mask), "mask tensor")
    if isinstance(mask, Image.Image):
        return _from_pil(mask, f"PIL mask of mode {mask.mode}")
    if isinstance(mask, (str, os.PathLike)):
        name = os.fspath(mask)
        return _from_pil(open_image_file(name, "mask"), f"mask file {name!r}")
    if isinstance(mask, dict):
        if "counts" in mask or "size" in mask:
            return rle_to_mask(mask)
        if "segmentation" in mask:
            return _convert(mask["segmentation"], size)
        raise DamInputError(
            f"mask dict has keys {sorted(map(str, mask))}, which is neither COCO RLE "
            f"('size', 'counts') nor a COCO annotation ('segmentation'); pass {_ACCEPTED}"
        )
    if isinstance(mask, (list, tuple)):
        return _from_polygons(mask, size)
    raise DamInputError(f"unsupported mask type {type(mask).__name__}; pass {_ACCEPTED}")


def _from_pil(img: Image.Image, what: str) -> np.ndarray:
    mode = img.mode
    if mode == "1":
        return np.array(img)
    if mode in ("L", "F"):
        return _threshold(np.array(img), what)
    if mode == "I" or mode.startswith("I;16"):
        return _threshold(np.array(img), what, sixteen_bit=True)
    if mode == "P" and "transparency" in img.info:
        alpha = np.array(img.convert("RGBA").getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha >= 128
    if mode == "P":
        # Palette PNG masks (VOC, DAVIS) store the object as a non-zero palette index.
        return np.array(img) > 0
    if mode in ("LA", "PA", "RGBA"):
        alpha = np.array(img.getchannel("A"))
        if alpha.min() != alpha.max():
            return alpha >= 128
        if mode == "PA":
            return np.array(img.getchannel("P")) > 0
        if mode == "LA":
            return _threshold(np.array(img.getchannel("L")), what)
        return _threshold(np.array(img.convert("RGB").convert("L")), what)
    try:
        gray = img.convert("L")
    except ValueError:
        raise DamInputError(
            f"{what} cannot be read as a mask; save it as a grayscale (L), 1-bit, palette or "
            f"RGBA image"
        ) from None
    return _threshold(np.array(gray), what)


def _from_array(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.size == 0:
        raise DamInputError(f"{what} is empty (shape {tuple(arr.shape)}); pass a non-empty mask")
    if arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[2] not in (1, 3, 4):
        arr = arr[0]  # (1, H, W), as SAM and most torch code return a single mask
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        alpha = arr[:, :, 3]
        arr = alpha if alpha.min() != alpha.max() else arr[:, :, :3]
    if arr.ndim == 3 and arr.shape[2] == 3:
        first = arr[:, :, 0]
        if not ((first == arr[:, :, 1]).all() and (first == arr[:, :, 2]).all()):
            raise DamInputError(
                f"{what} has 3 colour channels that differ, so which pixels form the region is "
                f"ambiguous; pass a single-channel mask (H, W)"
            )
        arr = first
    if arr.ndim != 2:
        hint = ""
        if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4):
            hint = f"; it looks like a stack of {arr.shape[0]} masks: pass one at a time"
        raise DamInputError(
            f"{what} has shape {tuple(arr.shape)}; expected (H, W), (1, H, W), (H, W, 1), "
            f"(H, W, 3) with equal channels or (H, W, 4) with alpha{hint}"
        )
    return _threshold(arr, what)


def _threshold(values: np.ndarray, what: str, *, sixteen_bit: bool = False) -> np.ndarray:
    """Binarise on the scale the values use (0-1, 0-255 or 16-bit), rejecting non-masks."""
    kind = values.dtype.kind
    if kind == "b":
        return values
    if kind not in "iuf":
        raise DamInputError(f"{what} has dtype {values.dtype}; pass bool, integer or float values")
    if kind == "f" and not np.isfinite(values).all():
        raise DamInputError(f"{what} contains NaN or infinite values; pass finite 0/1 values")
    low, high = values.min(), values.max()
    if low < 0:
        raise DamInputError(
            f"{what} has negative values (min {low:g}); a mask holds bool, 0/1 or 0-255 values. "
            f"If these are logits or scores, threshold them first (e.g. logits > 0)"
        )
    if high <= 1:
        return values > 0.5
    if high <= 255:
        return values >= 128
    if (sixteen_bit or values.dtype == np.uint16) and high <= 65535:
        return values >= 32768
    raise DamInputError(
        f"{what} has values up to {high:g}, above 255; a mask holds bool, 0/1 or 0-255 values "
        f"(0-65535 for 16-bit images). If it is a label map, select one label (labels == k)"
    )


def _from_polygons(polygons: list | tuple, size: tuple[int, int] | None) -> np.ndarray:
    if len(polygons) == 0:
        raise DamInputError("mask is an empty list; pass polygons [[x1, y1, x2, y2, ...], ...]")
    if all(_is_number(v) for v in polygons):
        polygons = [polygons]
    elif not all(isinstance(p, (list, tuple, np.ndarray)) for p in polygons):
        raise DamInputError(
            "mask list is neither one flat polygon [x1, y1, x2, y2, ...] nor a list of them; "
            "pass polygons as [[x1, y1, x2, y2, ...], ...]"
        )
    if size is None:
        raise DamInputError(
            "polygons need the image size to be rasterised; pass image_size=(height, width)"
        )
    flat = []
    for index, polygon in enumerate(polygons):
        try:
            coords = np.asarray(polygon, dtype=np.float64)
        except (TypeError, ValueError):
            coords = None
        if coords is None or coords.ndim != 1 or coords.size < 6 or coords.size % 2:
            count = "" if coords is None else f" (got shape {tuple(coords.shape)})"
            raise DamInputError(
                f"polygon {index} is not a flat list of an even number >= 6 of coordinates "
                f"[x1, y1, x2, y2, x3, y3, ...]{count}"
            )
        if not np.isfinite(coords).all():
            raise DamInputError(f"polygon {index} contains NaN or infinite coordinates")
        flat.append(coords.tolist())
    height, width = size
    rles = mask_utils.frPyObjects(flat, height, width)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _check_image_size(image_size: Any) -> tuple[int, int]:
    try:
        height, width = image_size
        ok = all(_is_number(v) and int(v) == v and v > 0 for v in (height, width))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DamInputError(
            f"image_size must be (height, width) positive integers; got {image_size!r}"
        )
    return int(height), int(width)


def _rle_size(size: Any) -> tuple[int, int]:
    try:
        height, width = size
        ok = all(_is_number(v) and int(v) == v and v >= 0 for v in (height, width))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise DamInputError(f"RLE 'size' must be [height, width] integers; got {size!r}")
    return int(height), int(width)


def _integer_runs(counts: Any) -> np.ndarray:
    runs = np.asarray(counts)
    if runs.ndim != 1 or (runs.size and runs.dtype.kind not in "iu"):
        raise DamInputError("uncompressed RLE 'counts' must be a flat list of integer run lengths")
    return runs.astype(np.int64)


def _decode_counts(counts: bytes) -> np.ndarray:
    """Run lengths of a COCO compressed RLE string (pycocotools' rleFrString, vectorised).

    Each run is a little-endian group of 5-bit chunks offset by 48 ('0'); bit 0x20 says another
    chunk follows, bit 0x10 of the last chunk is the sign; from the third run on, each run is
    stored as the difference to the run two places before.
    """
    chunks = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if chunks.size == 0:
        return chunks
    if (chunks < 0).any() or (chunks > 63).any():
        raise DamInputError("RLE 'counts' has characters outside COCO compressed RLE's alphabet")
    more = (chunks & 0x20) != 0
    if more[-1]:
        raise DamInputError("RLE 'counts' string is truncated (it ends inside a run length)")
    ends = np.flatnonzero(~more)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if lengths.max() > 11:
        raise DamInputError("RLE 'counts' has a run length too large to be a mask")
    position = np.arange(chunks.size) - np.repeat(starts, lengths)
    values = np.add.reduceat((chunks & 0x1F) << (5 * position), starts)
    negative = (chunks[ends] & 0x10) != 0
    values = np.where(negative, values | (np.int64(-1) << (5 * lengths)), values)
    runs = values.copy()
    runs[1::2] = np.cumsum(values[1::2])
    runs[2::2] = np.cumsum(values[2::2])
    return runs


def _check_runs(runs: np.ndarray, height: int, width: int) -> None:
    if runs.size and runs.min() < 0:
        raise DamInputError("RLE 'counts' has negative run lengths; the RLE is corrupt")
    total = int(runs.sum())
    if total != height * width:
        raise DamInputError(
            f"RLE 'counts' cover {total} pixels but its size {height}x{width} has "
            f"{height * width}; the RLE is corrupt or belongs to another size"
        )
