"""Image inputs: whatever a user holds (path, PIL image, numpy array, torch tensor) -> uint8 RGB.

Every entry point of the toolkit (``describe``, the server, the training datasets) calls
``load_image`` so that an image is decoded the same way everywhere: one place decides how
16-bit scans, float arrays, palette PNGs and CHW tensors map to 8-bit RGB, and one place turns
an unreadable file into a ``DamInputError`` that names it. ``image_alpha`` exposes the alpha
channel, which callers may use as a region mask (a cut-out PNG is a mask and an image at once).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dam.errors import DamInputError

__all__ = [
    "load_image", "image_alpha", "load_image_and_alpha", "open_image_file", "image_file_size", "is_torch_tensor",
    "tensor_to_numpy",
]

_ACCEPTED = (
    "a path to an image file, a PIL image, a numpy array (H, W), (H, W, 1), (H, W, 3) or "
    "(H, W, 4) of uint8, uint16, bool or floats in [0, 1], or a torch tensor (CHW or HWC)"
)

# Pillow raises a zoo of exception types for corrupt or truncated files; all of them mean
# "this file is not an image we can read", which is the user's to fix.
_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


def open_image_file(path: str | os.PathLike, what: str = "image") -> Image.Image:
    """Decode the image file at ``path`` into memory, upright (EXIF orientation applied).

    The file is closed before returning. ``what`` names the input in error messages
    ("image", "mask"). Images and masks read from files go through this one function so that
    a photo and a mask saved by the same camera app come out in the same orientation.
    """
    name = os.fspath(path)
    try:
        with Image.open(name) as img:
            img.load()
            # A new image (transposed or copied), so its pixels outlive the closed file.
            return ImageOps.exif_transpose(img)
    except FileNotFoundError:
        raise DamInputError(
            f"{what} file {name!r} could not be read as an image: no such file; "
            f"check the path"
        ) from None
    except _READ_ERRORS as exc:
        raise DamInputError(
            f"{what} file {name!r} could not be read as an image ({type(exc).__name__}: {exc}); "
            f"pass a readable image file such as PNG or JPEG"
        ) from exc


_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def image_file_size(path: str | os.PathLike, what: str = "image") -> tuple[int, int]:
    """(height, width) of the image file at ``path`` as :func:`open_image_file` returns it (EXIF
    orientation applied), from the header alone; errors as there."""
    name = os.fspath(path)
    try:
        with Image.open(name) as img:
            width, height = img.size
            orientation = img.getexif().get(0x0112, 1)
    except FileNotFoundError:
        raise DamInputError(f"{what} file {name!r} could not be read as an image: no such file; check the path") from None
    except _READ_ERRORS as exc:
        raise DamInputError(
            f"{what} file {name!r} could not be read as an image ({type(exc).__name__}: {exc}); "
            f"pass a readable image file such as PNG or JPEG"
        ) from exc
    return (width, height) if orientation in _TRANSPOSING_ORIENTATIONS else (height, width)


def load_image(image: Any) -> np.ndarray:
    """Return ``image`` as a C-contiguous uint8 RGB array of shape (H, W, 3).

    Accepts paths (EXIF orientation applied), PIL images of any mode (alpha is dropped, not
    composited; 16-bit is scaled by 1/257), numpy arrays and torch tensors (see ``_ACCEPTED``).
    A numpy input that is already uint8 (H, W, 3) and C-contiguous is returned as is, without
    a copy. A PIL image is taken as its pixels are: EXIF orientation is only applied to files
    this function opens itself.
    """
    return load_image_and_alpha(image)[0]


def image_alpha(image: Any) -> np.ndarray | None:
    """Return the alpha channel of ``image`` as uint8 (H, W), or None if it has none.

    Accepts the same inputs as ``load_image`` and gives the alpha in the same orientation as
    ``load_image``'s pixels. Palette images with a transparent index count as having alpha.
    """
    return load_image_and_alpha(image)[1]


def load_image_and_alpha(image: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``(load_image(image), image_alpha(image))`` from one decode of ``image``."""
    pixels = _decode(image)
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels), None
    return np.ascontiguousarray(pixels[:, :, :3]), np.ascontiguousarray(pixels[:, :, 3])


def _decode(image: Any) -> np.ndarray:
    """Any accepted input -> uint8 (H, W, 3) or (H, W, 4) (RGB or RGBA)."""
    if isinstance(image, (str, os.PathLike)):
        return _from_pil(open_image_file(image, "image"))
    if isinstance(image, Image.Image):
        return _from_pil(image)
    if isinstance(image, np.ndarray):
        return _from_array(image, "image array")
    if is_torch_tensor(image):
        return _from_array(_tensor_to_hwc(image), "image tensor")
    raise DamInputError(f"unsupported image type {type(image).__name__}; pass {_ACCEPTED}")


def _from_pil(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("RGB", "RGBA"):
        return _check_size(np.array(img), f"PIL image of mode {mode}")
    if mode.startswith("I;16") or mode == "I":
        # np.array keeps 16-bit PIL data at full precision (uint16, >u2 or int32).
        return _from_array(np.array(img), f"{mode} PIL image", sixteen_bit=True)
    if mode == "F":
        return _from_array(np.array(img), "F (float) PIL image")
    has_alpha = "A" in img.getbands() or "a" in img.getbands()
    if mode == "P" and "transparency" in img.info:
        has_alpha = True
    try:
        converted = img.convert("RGBA" if has_alpha else "RGB")
    except ValueError:
        if mode == "La":
            # Pillow cannot go from premultiplied La to RGBA directly.
            converted = img.convert("LA").convert("RGBA")
        else:
            raise DamInputError(
                f"PIL image of mode {mode!r} cannot be converted to RGB; convert it to 'RGB' "
                f"(or 'RGBA') first"
            ) from None
    return _check_size(np.array(converted), f"PIL image of mode {mode}")


def _from_array(arr: np.ndarray, what: str, *, sixteen_bit: bool = False) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        gray = _to_uint8(arr, what, sixteen_bit=sixteen_bit)
        return _check_size(np.repeat(gray[:, :, None], 3, axis=2), what)
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        return _check_size(_to_uint8(arr, what, sixteen_bit=sixteen_bit), what)
    raise DamInputError(
        f"{what} has shape {tuple(arr.shape)}; expected (H, W), (H, W, 1), (H, W, 3) or "
        f"(H, W, 4)" + (" (remove the batch dimension)" if arr.ndim == 4 else "")
    )


def _to_uint8(arr: np.ndarray, what: str, *, sixteen_bit: bool = False) -> np.ndarray:
    """Scale pixel values to uint8; ranges that cannot be images raise instead of clipping."""
    kind = arr.dtype.kind
    if arr.dtype == np.uint8:
        return arr
    if kind == "b":
        return arr.astype(np.uint8) * np.uint8(255)
    if kind not in "iuf":
        raise DamInputError(f"{what} has dtype {arr.dtype}; pass {_ACCEPTED}")
    if arr.size == 0:
        raise DamInputError(f"{what} is empty (shape {tuple(arr.shape)}); pass a non-empty image")
    if kind == "f":
        if not np.isfinite(arr).all():
            raise DamInputError(f"{what} contains NaN or infinite values; pass finite pixels")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0 or hi > 255:
            raise DamInputError(
                f"{what} has float values in [{lo:g}, {hi:g}]; expected [0, 1] or [0, 255] "
                f"(undo any normalisation first)"
            )
        scaled = arr * 255.0 if hi <= 1 else arr
        return np.rint(scaled).astype(np.uint8)
    lo, hi = int(arr.min()), int(arr.max())
    if sixteen_bit or arr.dtype == np.uint16:
        if lo < 0 or hi > 65535:
            raise DamInputError(
                f"{what} has values in [{lo}, {hi}], outside the 16-bit range [0, 65535]"
            )
        # round(x / 257) maps 0..65535 onto 0..255 exactly (the inverse of x * 257).
        return ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)
    if lo < 0 or hi > 255:
        raise DamInputError(
            f"{what} has {arr.dtype} values in [{lo}, {hi}]; expected 0-255 "
            f"(or pass uint16 for 16-bit images)"
        )
    return arr.astype(np.uint8)


def _check_size(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise DamInputError(
            f"{what} is empty (shape {tuple(pixels.shape)}); pass a non-empty image"
        )
    return pixels


def is_torch_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a torch tensor, checked without importing torch."""
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def tensor_to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor's values as a numpy array on the CPU (bfloat16 widened to float32)."""
    cpu = tensor.detach().cpu()
    try:
        return cpu.numpy()
    except TypeError:
        # numpy has no bfloat16 (nor some other torch dtypes); float32 holds their values.
        return cpu.float().numpy()


def _tensor_to_hwc(tensor: Any) -> np.ndarray:
    arr = tensor_to_numpy(tensor)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
    return arr
