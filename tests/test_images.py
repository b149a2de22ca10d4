"""Tests for dam.images: every accepted image input becomes the expected uint8 RGB array, the
alpha channel is exposed where there is one, and bad inputs raise DamInputError."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dam.errors import DamInputError
from dam.images import image_alpha, image_file_size, load_image

H, W = 6, 10


@pytest.fixture
def rgb() -> np.ndarray:
    """Distinct values per pixel and channel, so channel swaps and transposes show."""
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


@pytest.fixture
def gray() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, size=(H, W), dtype=np.uint8)


@pytest.fixture
def alpha() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, size=(H, W), dtype=np.uint8)


def assert_image(out: np.ndarray, expected: np.ndarray) -> None:
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def as_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


# ---- PIL images ---------------------------------------------------------------------------


def test_pil_rgb(rgb):
    assert_image(load_image(Image.fromarray(rgb)), rgb)
    assert image_alpha(Image.fromarray(rgb)) is None


def test_pil_rgba_drops_alpha_without_compositing(rgb, alpha):
    rgba = np.dstack([rgb, alpha])
    image = Image.fromarray(rgba, mode="RGBA")
    assert_image(load_image(image), rgb)
    assert_image(image_alpha(image), alpha)


def test_pil_la(gray, alpha):
    image = Image.fromarray(np.dstack([gray, alpha]), mode="LA")
    assert_image(load_image(image), as_rgb(gray))
    assert_image(image_alpha(image), alpha)


def test_pil_pa(alpha):
    indices = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 4
    palette = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette + [0] * (768 - len(palette)))
    image = image.convert("PA")
    image.putalpha(Image.fromarray(alpha, mode="L"))
    assert image.mode == "PA"
    colours = np.array(palette, dtype=np.uint8).reshape(4, 3)
    assert_image(load_image(image), colours[indices])
    assert_image(image_alpha(image), alpha)


def test_pil_l(gray):
    image = Image.fromarray(gray, mode="L")
    assert_image(load_image(image), as_rgb(gray))
    assert image_alpha(image) is None


def test_pil_mode_1():
    bits = np.zeros((H, W), dtype=bool)
    bits[1:3, 2:7] = True
    image = Image.fromarray(bits)
    assert image.mode == "1"
    assert_image(load_image(image), as_rgb(bits.astype(np.uint8) * 255))


def test_pil_palette():
    indices = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 3
    palette = [255, 0, 0, 0, 255, 0, 0, 0, 255]
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette + [0] * (768 - len(palette)))
    colours = np.array(palette, dtype=np.uint8).reshape(3, 3)
    assert_image(load_image(image), colours[indices])
    assert image_alpha(image) is None


def test_pil_palette_with_transparency_has_alpha():
    indices = np.arange(H * W, dtype=np.uint8).reshape(H, W) % 2
    image = Image.fromarray(indices, mode="P")
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (768 - 6))
    image.info["transparency"] = 1
    assert_image(image_alpha(image), np.where(indices == 1, 0, 255).astype(np.uint8))
    assert_image(load_image(image), np.array([[255, 0, 0], [0, 0, 255]], np.uint8)[indices])


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_pil_16_bit_is_scaled_by_257(mode):
    values = np.array([0, 128, 129, 257, 385, 386, 32768, 65278, 65535, 1000], dtype=np.uint16)
    want = np.array([0, 0, 1, 1, 1, 2, 128, 254, 255, 4], dtype=np.uint8)
    image = Image.fromarray(values.reshape(1, -1).astype(np.int32), mode="I").convert(mode)
    assert image.mode == mode
    assert_image(load_image(image), as_rgb(want.reshape(1, -1)))


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_pil_float(scale):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32) * scale
    want = np.rint(np.array([[0.0, 0.25, 0.5, 1.0]]) * 255).astype(np.uint8)
    assert_image(load_image(Image.fromarray(values, mode="F")), as_rgb(want))


def test_pil_cmyk_is_converted(rgb):
    image = Image.fromarray(rgb).convert("CMYK")
    assert_image(load_image(image), np.array(image.convert("RGB")))


# ---- files --------------------------------------------------------------------------------


@pytest.mark.parametrize("as_str", [False, True], ids=["Path", "str"])
def test_png_path(tmp_path, rgb, as_str):
    path = tmp_path / "image.png"
    Image.fromarray(rgb).save(path)
    assert_image(load_image(str(path) if as_str else path), rgb)


def test_rgba_png_path_alpha(tmp_path, rgb, alpha):
    path = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA").save(path)
    assert_image(load_image(path), rgb)
    assert_image(image_alpha(path), alpha)


def test_16_bit_png_path(tmp_path):
    values = np.array([[0, 257, 65535, 32768]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert_image(load_image(path), as_rgb(np.array([[0, 1, 255, 128]], dtype=np.uint8)))


def test_exif_orientation_is_applied(tmp_path, rgb):
    path = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    Image.fromarray(rgb).save(path, exif=exif)
    out = load_image(path)
    assert out.shape == (W, H, 3)
    assert_image(out, np.rot90(rgb, k=-1))


def test_file_size_from_the_header_matches_the_loaded_image(tmp_path, rgb):
    plain, rotated = tmp_path / "plain.png", tmp_path / "rotated.png"
    Image.fromarray(rgb).save(plain)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rgb).save(rotated, exif=exif)
    for path in (plain, rotated):
        assert image_file_size(path) == load_image(path).shape[:2]
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DamInputError, match=r"broken\.png.*could not be read as an image"):
        image_file_size(tmp_path / "broken.png")


def test_missing_file(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(DamInputError, match=r"missing\.jpg.*could not be read as an image"):
        load_image(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"\x00garbage bytes, not an image\xff" * 4)
    with pytest.raises(DamInputError, match=r"x\.png.*could not be read as an image"):
        load_image(str(path))
    with pytest.raises(DamInputError, match=r"x\.png"):
        image_alpha(path)


def test_truncated_png(tmp_path, rgb):
    path = tmp_path / "cut.png"
    Image.fromarray(rgb).save(path)
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DamInputError, match=r"cut\.png.*could not be read"):
        load_image(path)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(DamInputError, match="could not be read as an image"):
        load_image(tmp_path)


# ---- numpy arrays -------------------------------------------------------------------------


def test_uint8_rgb_array(rgb):
    assert_image(load_image(rgb), rgb)
    assert image_alpha(rgb) is None


def test_non_contiguous_array_is_made_contiguous(rgb):
    view = np.asfortranarray(rgb)
    assert not view.flags.c_contiguous
    assert_image(load_image(view), rgb)


@pytest.mark.parametrize("make", [lambda g: g, lambda g: g[:, :, None]], ids=["HW", "HW1"])
def test_gray_arrays(gray, make):
    assert_image(load_image(make(gray)), as_rgb(gray))


def test_rgba_array(rgb, alpha):
    rgba = np.dstack([rgb, alpha])
    assert_image(load_image(rgba), rgb)
    assert_image(image_alpha(rgba), alpha)


def test_uint16_array_is_scaled(rgb):
    deep = rgb.astype(np.uint16) * 257
    assert_image(load_image(deep), rgb)


def test_float_array_in_unit_range(rgb):
    assert_image(load_image(rgb.astype(np.float32) / 255), rgb)
    values = np.array([[0.0, 0.5, 1.0, 0.499]], dtype=np.float64)
    assert_image(load_image(values), as_rgb(np.array([[0, 128, 255, 127]], dtype=np.uint8)))


def test_float_array_in_255_range(rgb):
    assert_image(load_image(rgb.astype(np.float64)), rgb)


def test_bool_array():
    bits = np.eye(H, W, dtype=bool)
    assert_image(load_image(bits), as_rgb(bits.astype(np.uint8) * 255))


def test_int_array_in_8_bit_range(rgb):
    assert_image(load_image(rgb.astype(np.int64)), rgb)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((H, W, 2), dtype=np.uint8), r"shape \(6, 10, 2\)"),
        (np.zeros((1, H, W, 3), dtype=np.uint8), r"shape \(1, 6, 10, 3\).*batch dimension"),
        (np.zeros((W,), dtype=np.uint8), r"shape \(10,\)"),
        (np.zeros((0, W, 3), dtype=np.float32), "is empty"),
        (np.full((H, W), -0.5), r"float values in \[-0.5"),
        (np.full((H, W), 300.0), "undo any normalisation"),
        (np.full((H, W), np.inf), "NaN or infinite"),
        (np.full((H, W), 300, dtype=np.int32), r"values in \[300, 300\]"),
        (np.full((H, W), "x"), "dtype <U1"),
    ],
    ids=["2ch", "batched", "1d", "empty", "negative", "float>255", "inf", "int>255", "str"],
)
def test_bad_arrays(array, message):
    with pytest.raises(DamInputError, match=message):
        load_image(array)


# ---- torch tensors ------------------------------------------------------------------------


def test_chw_float_tensor(rgb):
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert tuple(tensor.shape) == (3, H, W)
    assert_image(load_image(tensor), rgb)


def test_hwc_uint8_tensor(rgb):
    assert_image(load_image(torch.from_numpy(rgb)), rgb)


def test_chw_rgba_tensor_alpha(rgb, alpha):
    tensor = torch.from_numpy(np.dstack([rgb, alpha])).permute(2, 0, 1)
    assert_image(load_image(tensor), rgb)
    assert_image(image_alpha(tensor), alpha)


def test_single_channel_chw_tensor(gray):
    assert_image(load_image(torch.from_numpy(gray)[None]), as_rgb(gray))


def test_bfloat16_tensor_with_grad():
    values = torch.tensor([[0.0, 1.0], [0.5, 1.0]], dtype=torch.bfloat16, requires_grad=True)
    out = load_image(values)
    assert_image(out, as_rgb(np.array([[0, 255], [128, 255]], dtype=np.uint8)))


def test_normalised_tensor_is_rejected(rgb):
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1
    with pytest.raises(DamInputError, match="image tensor has float values"):
        load_image(tensor)


# ---- other types --------------------------------------------------------------------------


@pytest.mark.parametrize("image", [None, 3, b"\x89PNG", [[0, 1], [2, 3]]])
def test_unsupported_types(image):
    with pytest.raises(DamInputError, match=rf"unsupported image type {type(image).__name__}"):
        load_image(image)
    with pytest.raises(DamInputError, match="unsupported image type"):
        image_alpha(image)
