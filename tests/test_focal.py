"""Focal-crop geometry: hand cases at borders and property tests against the reference rule."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dam.errors import DamInputError
from dam.focal import build_focal_prompt, focal_crop_box


def reference_crop(mask, min_size=48):
    """The released DAM's focal_crop written out independently (alpha = 3)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = xs.min(), ys.min()
    w, h = xs.max() + 1 - x0, ys.max() + 1 - y0
    xc, yc = x0 + w / 2, y0 + h / 2
    w, h = max(w, min_size), max(h, min_size)
    x0, y0 = int(xc - w / 2), int(yc - h / 2)
    img_h, img_w = mask.shape
    return max(x0 - w, 0), max(y0 - h, 0), min(x0 + 2 * w, img_w), min(y0 + 2 * h, img_h)


def mask_with_box(height, width, x0, y0, x1, y1):
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


@pytest.mark.parametrize(
    "box, expected",
    [
        ((0, 0, 1, 1), (0, 0, 73, 73)),  # 1-px mask in the corner: floor to 48 around (0.5, 0.5)
        ((50, 50, 51, 51), (0, 0, 100, 100)),  # 1-px mask in the middle covers everything
        ((99, 99, 100, 100), (27, 27, 100, 100)),  # 1-px mask in the far corner
        ((0, 0, 100, 100), (0, 0, 100, 100)),  # touching all sides
        ((0, 40, 100, 60), (0, 0, 100, 100)),  # touching left and right
    ],
)
def test_hand_cases_100px(box, expected):
    assert focal_crop_box(mask_with_box(100, 100, *box)) == expected


def test_small_mask_far_from_borders_gets_three_times_the_floor():
    mask = mask_with_box(500, 500, 200, 200, 210, 210)  # 10x10 -> floored to 48, centre 205
    assert focal_crop_box(mask) == (133, 133, 277, 277)


def test_large_mask_expands_by_alpha():
    mask = mask_with_box(1000, 1000, 400, 300, 500, 360)  # 100 x 60, no floor
    assert focal_crop_box(mask) == (300, 240, 600, 420)
    assert focal_crop_box(mask, alpha=1.0) == (400, 300, 500, 360)
    assert focal_crop_box(mask, alpha=2.0) == (350, 270, 550, 390)


def test_min_size_is_configurable():
    mask = mask_with_box(500, 500, 200, 200, 210, 210)
    assert focal_crop_box(mask, min_size=10) == (190, 190, 220, 220)


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="no pixels"):
        focal_crop_box(np.zeros((10, 10), dtype=bool))


def test_build_focal_prompt_views_and_size_mismatch():
    image = np.random.default_rng(0).integers(0, 256, (300, 320, 3), dtype=np.uint8)
    mask = mask_with_box(300, 320, 160, 150, 170, 156)
    prompt = build_focal_prompt(image, mask)
    x0, y0, x1, y1 = prompt.box
    assert prompt.crop.shape == (y1 - y0, x1 - x0, 3)
    np.testing.assert_array_equal(prompt.crop, image[y0:y1, x0:x1])
    np.testing.assert_array_equal(prompt.crop_mask, mask[y0:y1, x0:x1])
    assert prompt.crop_mask.sum() == mask.sum()
    assert not prompt.crop_is_full_image
    assert build_focal_prompt(image, np.ones((300, 320), dtype=bool)).crop_is_full_image
    with pytest.raises(DamInputError, match="300x320"):
        build_focal_prompt(image, mask[:50])


@st.composite
def masks(draw):
    height = draw(st.integers(1, 160))
    width = draw(st.integers(1, 160))
    x0 = draw(st.integers(0, width - 1))
    y0 = draw(st.integers(0, height - 1))
    x1 = draw(st.integers(x0 + 1, width))
    y1 = draw(st.integers(y0 + 1, height))
    mask = mask_with_box(height, width, x0, y0, x1, y1)
    holes = draw(st.lists(st.tuples(st.integers(0, height - 1), st.integers(0, width - 1)), max_size=5))
    for y, x in holes:  # holes never empty the mask: its box corners stay set
        if (y, x) not in {(y0, x0), (y1 - 1, x1 - 1)}:
            mask[y, x] = False
    return mask


@settings(max_examples=300, deadline=None)
@given(masks(), st.integers(1, 64))
def test_matches_reference_and_contains_mask(mask, min_size):
    box = focal_crop_box(mask, min_size=min_size)
    assert box == reference_crop(mask, min_size)
    x0, y0, x1, y1 = box
    ys, xs = np.nonzero(mask)
    assert 0 <= x0 <= xs.min() and xs.max() < x1 <= mask.shape[1]
    assert 0 <= y0 <= ys.min() and ys.max() < y1 <= mask.shape[0]


@settings(max_examples=200, deadline=None)
@given(masks(), st.floats(1.0, 6.0))
def test_any_alpha_stays_inside_image_and_grows_with_alpha(mask, alpha):
    x0, y0, x1, y1 = focal_crop_box(mask, alpha=alpha)
    bigger = focal_crop_box(mask, alpha=alpha + 1)
    assert 0 <= x0 < x1 <= mask.shape[1] and 0 <= y0 < y1 <= mask.shape[0]
    assert bigger[0] <= x0 and bigger[1] <= y0 and bigger[2] >= x1 and bigger[3] >= y1
