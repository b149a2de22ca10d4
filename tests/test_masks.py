"""Tests for dam.masks: every accepted mask format gives the expected bool array, and every
user mistake raises DamInputError with a message that names the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from dam.errors import DamInputError
from dam.masks import load_mask, mask_bbox, mask_to_rle, rle_to_mask

H, W = 24, 32


@pytest.fixture
def expected() -> np.ndarray:
    """An irregular mask (rectangle plus a stray pixel) so that transposes and shifts show."""
    mask = np.zeros((H, W), dtype=bool)
    mask[5:12, 8:20] = True
    mask[20, 3] = True
    return mask


def assert_mask(out: np.ndarray, expected: np.ndarray) -> None:
    assert out.dtype == np.bool_
    assert out.flags.c_contiguous
    assert out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


# ---- numpy arrays and tensors -------------------------------------------------------------


def test_bool_array_is_returned_unchanged(expected):
    assert_mask(load_mask(expected), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.float64])
def test_zero_one_arrays(expected, dtype):
    assert_mask(load_mask(expected.astype(dtype)), expected)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_zero_255_arrays(expected, dtype):
    assert_mask(load_mask(expected.astype(dtype) * 255), expected)


def test_0_255_threshold_is_128(expected):
    values = np.where(expected, 128, 127).astype(np.uint8)
    assert_mask(load_mask(values), expected)


def test_soft_float_mask_thresholds_at_half(expected):
    values = np.where(expected, 0.51, 0.5).astype(np.float32)
    assert_mask(load_mask(values), expected)


def test_uint16_array_uses_16_bit_scale(expected):
    values = np.where(expected, 32768, 32767).astype(np.uint16)
    assert_mask(load_mask(values), expected)


def test_fortran_order_input_gives_c_contiguous_output(expected):
    out = load_mask(np.asfortranarray(expected.astype(np.uint8)))
    assert_mask(out, expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m[:, :, None],
        lambda m: m[None, :, :],
        lambda m: np.repeat(m[:, :, None], 3, axis=2),
    ],
    ids=["HW1", "1HW", "HW3"],
)
def test_channel_layouts(expected, make):
    assert_mask(load_mask(make(expected.astype(np.uint8) * 255)), expected)


def test_rgba_array_uses_alpha(expected):
    rgba = np.full((H, W, 4), 255, dtype=np.uint8)  # white everywhere: colour says "all"
    rgba[:, :, 3] = expected * 255
    assert_mask(load_mask(rgba), expected)


def test_rgba_array_with_uniform_alpha_uses_colour(expected):
    rgba = np.full((H, W, 4), 255, dtype=np.uint8)
    rgba[:, :, :3] = expected[:, :, None] * 255
    assert_mask(load_mask(rgba), expected)


def test_rgb_array_with_differing_channels_is_rejected(expected):
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[:, :, 0] = expected * 255
    with pytest.raises(DamInputError, match="3 colour channels that differ"):
        load_mask(rgb)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32, torch.bfloat16])
def test_torch_tensors(expected, dtype):
    tensor = torch.from_numpy(expected).to(dtype)
    assert_mask(load_mask(tensor), expected)


def test_torch_tensor_with_grad_and_batch_dim(expected):
    tensor = torch.from_numpy(expected.astype(np.float32))[None].requires_grad_(True)
    assert_mask(load_mask(tensor), expected)


# ---- PIL images and files ----------------------------------------------------------------


def test_pil_mode_1(expected):
    assert_mask(load_mask(Image.fromarray(expected)), expected)


@pytest.mark.parametrize("scale", [1, 255])
def test_pil_mode_l(expected, scale):
    image = Image.fromarray(expected.astype(np.uint8) * scale, mode="L")
    assert image.mode == "L"
    assert_mask(load_mask(image), expected)


def test_pil_16_bit(expected):
    image = Image.fromarray(np.where(expected, 40000, 30000).astype(np.uint16))
    assert image.mode.startswith("I;16")
    assert_mask(load_mask(image), expected)


def test_pil_mode_i(expected):
    image = Image.fromarray(np.where(expected, 65535, 0).astype(np.int32), mode="I")
    assert_mask(load_mask(image), expected)


def test_pil_mode_f(expected):
    image = Image.fromarray(expected.astype(np.float32), mode="F")
    assert_mask(load_mask(image), expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_pil_alpha_modes_use_alpha(expected, mode):
    base = Image.new("RGBA", (W, H), (255, 255, 255, 255))
    base.putalpha(Image.fromarray(expected.astype(np.uint8) * 255, mode="L"))
    image = base.convert(mode) if mode != "PA" else _palette_with_alpha(expected)
    assert image.mode == mode
    assert_mask(load_mask(image), expected)


def _palette_with_alpha(expected: np.ndarray) -> Image.Image:
    image = Image.fromarray(np.ones((H, W), dtype=np.uint8), mode="P").convert("PA")
    image.putalpha(Image.fromarray(expected.astype(np.uint8) * 255, mode="L"))
    return image


def test_pil_rgba_with_opaque_alpha_uses_colour(expected):
    rgb = Image.fromarray(np.repeat(expected[:, :, None].astype(np.uint8) * 255, 3, axis=2))
    assert_mask(load_mask(rgb.convert("RGBA")), expected)


def test_pil_palette_uses_index(expected):
    indices = np.where(expected, 3, 0).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (768 - 12))
    assert_mask(load_mask(image), expected)


def test_pil_palette_with_transparency_uses_alpha(expected):
    # Index 0 is opaque black and index 1 is transparent: the index rule alone would say the
    # opposite of the alpha, so this only passes if transparency wins.
    image = Image.fromarray(np.where(expected, 0, 1).astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255] + [0] * (768 - 6))
    image.info["transparency"] = 1
    assert_mask(load_mask(image), expected)


def test_pil_rgb_is_converted_to_gray(expected):
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[expected] = (255, 255, 0)  # yellow: gray ~226
    rgb[~expected] = (0, 0, 255)  # blue: gray ~29
    assert_mask(load_mask(Image.fromarray(rgb)), expected)


@pytest.mark.parametrize("as_path", [True, False], ids=["Path", "str"])
def test_png_file(tmp_path, expected, as_path):
    path = tmp_path / "mask.png"
    Image.fromarray(expected.astype(np.uint8) * 255).save(path)
    assert_mask(load_mask(path if as_path else str(path), (H, W)), expected)


def test_rgba_png_file_uses_alpha(tmp_path, expected):
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[:, :, 3] = expected * 255
    path = tmp_path / "cutout.png"
    Image.fromarray(rgba, mode="RGBA").save(path)
    assert_mask(load_mask(path), expected)


def test_16_bit_png_file(tmp_path, expected):
    path = tmp_path / "mask16.png"
    Image.fromarray(expected.astype(np.uint16) * 65535).save(path)
    assert_mask(load_mask(path), expected)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(DamInputError, match=r"nope\.png.*no such file"):
        load_mask(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(b"this is not a png at all")
    with pytest.raises(DamInputError, match=r"x\.png.*could not be read as an image"):
        load_mask(str(path))


# ---- COCO RLE, polygons, annotations -------------------------------------------------------


def _coco_rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))


def _uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.T.ravel()  # COCO runs go down columns
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    runs = np.diff(np.concatenate(([0], change, [flat.size]))).tolist()
    if flat[0]:
        runs = [0] + runs  # runs always start with background
    return {"size": list(mask.shape), "counts": runs}


def test_uncompressed_rle_helper_matches_pycocotools(expected):
    uncompressed = _uncompressed_rle(expected)
    compressed = mask_utils.frPyObjects(uncompressed, H, W)
    assert compressed["counts"] == _coco_rle(expected)["counts"]


@pytest.mark.parametrize("as_str", [False, True], ids=["bytes", "str"])
def test_compressed_rle(expected, as_str):
    rle = _coco_rle(expected)
    if as_str:
        rle = {"size": rle["size"], "counts": rle["counts"].decode()}
    assert_mask(load_mask(rle, (H, W)), expected)


def test_uncompressed_rle(expected):
    assert_mask(load_mask(_uncompressed_rle(expected)), expected)


def test_uncompressed_rle_starting_with_foreground():
    mask = np.zeros((H, W), dtype=bool)
    mask[0, 0] = mask[1, 0] = True
    rle = _uncompressed_rle(mask)
    assert rle["counts"][0] == 0
    assert_mask(load_mask(rle), mask)


def test_rle_round_trip_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = rng.integers(1, 80, size=2)
        mask = rng.random((height, width)) < rng.random()
        rle = mask_to_rle(mask)
        assert isinstance(rle["counts"], str)
        assert rle["size"] == [height, width]
        json.dumps(rle)
        assert_mask(rle_to_mask(rle), mask)
        assert rle["counts"] == _coco_rle(mask)["counts"].decode()


def test_mask_to_rle_of_empty_mask():
    empty = np.zeros((4, 5), dtype=bool)
    assert_mask(rle_to_mask(mask_to_rle(empty)), empty)


def test_rle_with_wrong_size_is_rejected(expected):
    rle = _coco_rle(expected)
    with pytest.raises(DamInputError, match=f"cover {H * W} pixels but its size 30x40"):
        load_mask({"size": [30, 40], "counts": rle["counts"]})
    with pytest.raises(DamInputError, match="cover"):
        load_mask({"size": [H, W], "counts": [5, 5, 5]})


@pytest.mark.parametrize(
    "rle, message",
    [
        ({"size": [2, 2], "counts": "\x01\x02"}, "alphabet"),
        ({"size": [2, 2], "counts": "0P"}, "truncated"),
        ({"size": [2, 2], "counts": 7}, "expected a compressed str/bytes"),
        ({"size": [2], "counts": "04"}, "size' must be"),
        ({"size": [2, 2]}, "'size' and 'counts'"),
        ({"size": [2, 2], "counts": [1.5, 2.5]}, "integer run lengths"),
        ({"size": [2, 2], "counts": [-1, 5]}, "negative run lengths"),
    ],
)
def test_malformed_rle(rle, message):
    with pytest.raises(DamInputError, match=message):
        load_mask(rle)


def test_polygons_of_a_rectangle():
    rectangle = [8, 5, 20, 5, 20, 12, 8, 12]
    want = np.zeros((H, W), dtype=bool)
    want[5:12, 8:20] = True
    assert_mask(load_mask([rectangle], (H, W)), want)
    assert_mask(load_mask(rectangle, (H, W)), want)  # a single flat polygon
    assert_mask(load_mask(tuple(float(v) for v in rectangle), (H, W)), want)


def test_several_polygons_are_merged():
    first, second = [0, 0, 4, 0, 4, 4, 0, 4], [10, 10, 14, 10, 14, 12, 10, 12]
    want = np.zeros((H, W), dtype=bool)
    want[0:4, 0:4] = True
    want[10:12, 10:14] = True
    assert_mask(load_mask([first, np.array(second)], (H, W)), want)


def test_polygons_need_image_size():
    with pytest.raises(DamInputError, match=r"polygons need the image size.*image_size"):
        load_mask([[0, 0, 4, 0, 4, 4]])


@pytest.mark.parametrize(
    "polygons, message",
    [
        ([[0, 0, 4, 0]], "polygon 0 is not a flat list"),
        ([[0, 0, 4, 0, 4, 4], [1, 2, 3, 4, 5]], "polygon 1"),
        ([[0, 0], [4, 0], [4, 4]], "polygon 0"),
        ([[0, 0, 4, 0, 4, float("nan")]], "NaN"),
        ([[0, 0, 4, 0, 4, 4], 5], "neither one flat polygon"),
        ([], "empty list"),
    ],
)
def test_malformed_polygons(polygons, message):
    with pytest.raises(DamInputError, match=message):
        load_mask(polygons, (H, W))


def test_coco_annotation_dicts(expected):
    annotation = {"id": 1, "iscrowd": 1, "segmentation": _uncompressed_rle(expected)}
    assert_mask(load_mask(annotation), expected)
    annotation = {"id": 2, "iscrowd": 0, "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}
    want = np.zeros((H, W), dtype=bool)
    want[0:4, 0:4] = True
    assert_mask(load_mask(annotation, (H, W)), want)


def test_dict_without_mask_keys():
    with pytest.raises(DamInputError, match=r"keys \['area', 'bbox'\].*segmentation"):
        load_mask({"bbox": [0, 0, 1, 1], "area": 1})


# ---- validation of size, emptiness and values ---------------------------------------------


def test_size_mismatch_names_both_sizes():
    mask = np.ones((40, 30), dtype=bool)
    with pytest.raises(
        DamInputError,
        match=r"mask is 40x30 \(HxW\) but the image is 48x64; pass a mask of the image's size",
    ):
        load_mask(mask, (48, 64))


def test_size_mismatch_hints_at_swapped_image_size():
    with pytest.raises(DamInputError, match=r"\(width, height\)"):
        load_mask(np.ones((40, 30), dtype=bool), (30, 40))


def test_matching_image_size_is_accepted(expected):
    assert_mask(load_mask(expected, (H, W)), expected)
    assert_mask(load_mask(expected, (np.int64(H), np.int64(W))), expected)


@pytest.mark.parametrize("image_size", [(H,), (0, W), (H, 2.5), "ab", (True, W)])
def test_bad_image_size(expected, image_size):
    with pytest.raises(DamInputError, match="image_size must be"):
        load_mask(expected, image_size)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((H, W), dtype=bool),
        np.full((H, W), 127, dtype=np.uint8),  # below the 0-255 threshold
        {"size": [H, W], "counts": [H * W]},
    ],
    ids=["zeros", "below-threshold", "rle"],
)
def test_empty_mask_is_rejected(mask):
    with pytest.raises(DamInputError, match="mask has no pixels.*at least one foreground pixel"):
        load_mask(mask)


def test_empty_mask_allowed_when_asked():
    out = load_mask(np.zeros((H, W), dtype=np.uint8), (H, W), allow_empty=True)
    assert_mask(out, np.zeros((H, W), dtype=bool))


@pytest.mark.parametrize(
    "mask, message",
    [
        (np.full((4, 4), 300, dtype=np.int32), "values up to 300, above 255"),
        (np.full((4, 4), 300.0), "above 255"),
        (np.full((4, 4), -2.0), r"negative values.*logits > 0"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.array([["a", "b"]]), "dtype <U1"),
        (np.zeros((0, 4), dtype=bool), "is empty"),
        (np.zeros((3, 4, 5), dtype=bool), r"shape \(3, 4, 5\).*stack of 3 masks"),
        (np.zeros((2, 3, 4, 5), dtype=bool), r"shape \(2, 3, 4, 5\)"),
    ],
    ids=["int>255", "float>255", "logits", "nan", "strings", "zero-size", "stack", "4d"],
)
def test_bad_array_values_and_shapes(mask, message):
    with pytest.raises(DamInputError, match=message):
        load_mask(mask)


def test_16_bit_values_above_range_are_rejected():
    image = Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I")
    with pytest.raises(DamInputError, match="values up to 70000"):
        load_mask(image)


@pytest.mark.parametrize("mask", [42, b"bytes", object(), None])
def test_unsupported_types_name_the_type_and_formats(mask):
    with pytest.raises(DamInputError, match=rf"unsupported mask type {type(mask).__name__}.*RLE"):
        load_mask(mask)


def test_errors_are_value_errors():
    with pytest.raises(ValueError):
        load_mask(np.zeros((2, 2), dtype=bool))


# ---- mask_bbox ----------------------------------------------------------------------------


def test_mask_bbox_is_tight_and_exclusive(expected):
    assert mask_bbox(expected) == (3, 5, 20, 21)
    x0, y0, x1, y1 = mask_bbox(expected)
    assert expected[y0:y1, x0:x1].sum() == expected.sum()
    assert all(isinstance(v, int) for v in (x0, y0, x1, y1))


def test_mask_bbox_single_pixel_and_full_mask():
    single = np.zeros((H, W), dtype=bool)
    single[H - 1, W - 1] = True
    assert mask_bbox(single) == (W - 1, H - 1, W, H)
    assert mask_bbox(np.ones((H, W), dtype=bool)) == (0, 0, W, H)


def test_mask_bbox_of_empty_mask():
    with pytest.raises(DamInputError, match="no pixels"):
        mask_bbox(np.zeros((H, W), dtype=bool))


def test_mask_bbox_accepts_other_formats(expected):
    assert mask_bbox(expected.astype(np.uint8) * 255) == (3, 5, 20, 21)
    assert mask_bbox(mask_to_rle(expected)) == (3, 5, 20, 21)
