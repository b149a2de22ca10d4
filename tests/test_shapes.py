"""ShapesDLC (dam.shapes): spec compliance over many rendered scenes, determinism, caption parsing."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from dam.errors import DamInputError
from dam.shapes import (
    ATTRIBUTES,
    COLORS,
    IMAGE_SIZE,
    PATTERNS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeObject,
    caption_for,
    parse_caption,
    scene,
)

NUM_SCENES = 200  # about 800 objects; the fixture holds them all (~1.8 MB each)


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return [scene(seed, index) for seed, index in itertools.product(range(2), range(NUM_SCENES // 2))]


def _objects(scenes: list[Scene]):
    for s in scenes:
        for obj, mask in zip(s.objects, s.masks):
            yield s, obj, mask


def test_image_and_object_count(scenes):
    for s in scenes:
        assert s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        assert 3 <= len(s.objects) == len(s.masks) <= 5
        assert all(isinstance(o, ShapeObject) for o in s.objects)
        assert all(m.shape == (IMAGE_SIZE, IMAGE_SIZE) and m.dtype == bool for m in s.masks)


def test_boxes_inside_sized_and_separated(scenes):
    for s in scenes:
        for obj in s.objects:
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            assert x1 - x0 == y1 - y0 == obj.side
            low, high = SIZES[obj.size]
            assert low <= obj.side <= high
        for a, b in itertools.combinations([o.box for o in s.objects], 2):
            gap_x = max(b[0] - a[2], a[0] - b[2])
            gap_y = max(b[1] - a[3], a[1] - b[3])
            assert max(gap_x, gap_y) >= 4, (a, b)


def test_masks_are_the_shapes_exact_pixels(scenes):
    for s, obj, mask in _objects(scenes):
        x0, y0, x1, y1 = obj.box
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        # Every shape touches all four sides of its box (circle and triangle: top and bottom rows too).
        assert (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1) == obj.box
        inside = mask[y0:y1, x0:x1]
        if obj.shape == "square":
            assert inside.all()
        elif obj.shape == "circle":
            assert 0.70 < inside.mean() < 0.85  # pi / 4 = 0.785
            assert inside[obj.side // 2].all() and inside[:, obj.side // 2].all()
        else:
            assert 0.45 < inside.mean() < 0.62  # half the box, plus the pixel-row staircase
            assert inside[-1].all() and inside[0].sum() <= 2
            widths = inside.sum(axis=1)
            assert (np.diff(widths) >= 0).all()  # widens downwards
            centre = obj.side / 2
            for row in inside:  # centred runs
                xs = np.flatnonzero(row) + 0.5
                assert abs(xs.mean() - centre) < 1e-9 and len(xs) == xs[-1] - xs[0] + 1
    for s in scenes:
        assert not any((a & b).any() for a, b in itertools.combinations(s.masks, 2))


def test_object_pixels_are_color_or_pattern_white(scenes):
    white = np.array([255, 255, 255], dtype=np.uint8)
    for s, obj, mask in _objects(scenes):
        x0, y0 = obj.box[:2]
        ys, xs = np.nonzero(mask)
        pixels = s.image[ys, xs]
        is_white = (pixels == white).all(axis=1)
        assert ((pixels == np.array(COLORS[obj.color], dtype=np.uint8)).all(axis=1) | is_white).all()
        dy, dx = (ys - y0) % 6, (xs - x0) % 6
        if obj.pattern == "solid":
            assert not is_white.any()
        elif obj.pattern == "striped":
            np.testing.assert_array_equal(is_white, dy < 2)
        else:
            np.testing.assert_array_equal(is_white, np.isin(dx, [2, 3, 4]) & np.isin(dy, [2, 3, 4]))
        if obj.pattern != "solid" and obj.shape == "square":
            assert is_white.any()


def test_background_is_a_noisy_gradient(scenes):
    residuals, directions = [], Counter()
    for s in scenes[:60]:
        direction, a, b = s.gradient
        directions[direction] += 1
        assert 90 <= a <= 170 and 90 <= b <= 170
        background = ~np.logical_or.reduce(s.masks)
        values = s.image.astype(np.float32)
        assert values[background].min() >= 90 - 6 * 7 and values[background].max() <= 170 + 6 * 7
        ramp = a + (b - a) * np.arange(IMAGE_SIZE) / (IMAGE_SIZE - 1)
        expected = ramp[None, :, None] if direction == "horizontal" else ramp[:, None, None]
        residuals.append((values - expected)[background][::7].ravel())
        # monotone along its direction on average: per-line background means follow the levels
        axis = 0 if direction == "horizontal" else 1
        count = background.sum(axis=axis)
        line = (values.sum(axis=2) * background).sum(axis=axis)[count > 0] / (3 * count[count > 0])
        if abs(b - a) > 20:
            assert np.sign(np.polyfit(np.arange(len(line)), line, 1)[0]) == np.sign(b - a)
    residuals = np.concatenate(residuals)
    assert abs(residuals.mean()) < 0.05 and 5.9 < residuals.std() < 6.1
    assert min(directions.values()) > 15


def test_noise_is_independent_per_channel():
    s = scene(5, 0)
    direction, a, b = s.gradient
    ramp = a + (b - a) * np.arange(IMAGE_SIZE) / (IMAGE_SIZE - 1)
    expected = np.broadcast_to(ramp[None, :] if direction == "horizontal" else ramp[:, None], s.image.shape[:2])
    background = ~np.logical_or.reduce(s.masks)
    residual = s.image[background].astype(np.float64) - expected[background][:, None]  # (N, 3)
    correlation = np.corrcoef(residual.T)
    assert np.abs(correlation[np.triu_indices(3, 1)]).max() < 0.02


def test_position_is_the_cell_of_the_box_centre(scenes):
    for s, obj, _ in _objects(scenes):
        x0, y0, x1, y1 = obj.box
        col = min(2, int((x0 + x1) / 2 / (IMAGE_SIZE / 3)))
        row = min(2, int((y0 + y1) / 2 / (IMAGE_SIZE / 3)))
        assert obj.position == POSITIONS[3 * row + col]


def test_caption_format(scenes):
    for _, obj, _ in _objects(scenes):
        assert obj.caption == f"a {obj.size} {obj.color} {obj.pattern} {obj.shape} in the {obj.position}"
        assert obj.attributes == {name: getattr(obj, name) for name in ATTRIBUTES}
        assert list(obj.attributes) == ["size", "color", "pattern", "shape", "position"]
    assert caption_for(size="small", color="red", pattern="striped", shape="circle", position="top left") == (
        "a small red striped circle in the top left"
    )
    with pytest.raises(DamInputError, match="color 'pink'"):
        caption_for(size="small", color="pink", pattern="striped", shape="circle", position="top left")


def test_determinism():
    first, again, other = scene(3, 17), scene(3, 17), scene(3, 18)
    np.testing.assert_array_equal(first.image, again.image)
    assert first.objects == again.objects
    for a, b in zip(first.masks, again.masks):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first.image, other.image)
    with pytest.raises(DamInputError, match="seed"):
        scene(-1, 0)


def test_attribute_marginals_roughly_uniform(scenes):
    objects = [o for s in scenes for o in s.objects] + [o for i in range(300) for o in scene(2, i).objects]
    assert len(objects) > 1500
    for name, values in (("shape", SHAPES), ("color", tuple(COLORS)), ("pattern", PATTERNS), ("size", tuple(SIZES))):
        counts = Counter(getattr(o, name) for o in objects)
        assert set(counts) == set(values)
        expected = len(objects) / len(values)
        assert all(0.8 * expected < counts[v] < 1.2 * expected for v in values), (name, counts)
    positions = Counter(o.position for o in objects)
    assert set(positions) == set(POSITIONS)
    assert all(0.5 < positions[p] / (len(objects) / 9) < 1.6 for p in POSITIONS), positions


def test_parse_caption_round_trips(scenes):
    for _, obj, _ in _objects(scenes):
        assert parse_caption(obj.caption) == obj.attributes
        assert parse_caption(obj.caption, strict=True) == obj.attributes


def test_parse_caption_is_tolerant():
    expected = {"size": "small", "color": "red", "pattern": "striped", "shape": "circle", "position": "top left"}
    for text in (
        "A Small Red Striped Circle in the Top Left.",
        "  a small   red striped circle in the top-left!  ",
        "a small red striped circle in the top left, next to a large blue square in the bottom",
        "In the top left there is a small, red, striped circle.",
    ):
        assert parse_caption(text) == expected, text
    assert parse_caption("A Small Red Striped Circle in the Top Left.", strict=True) == expected
    assert parse_caption("a large blue dotted square in the centre") == {
        "size": "large", "color": "blue", "pattern": "dotted", "shape": "square", "position": "center",
    }


def test_parse_caption_partial_and_malformed():
    assert parse_caption("a blue square") == {
        "size": None, "color": "blue", "pattern": None, "shape": "square", "position": None,
    }
    assert parse_caption("something at the top") == dict.fromkeys(ATTRIBUTES) | {"position": "top"}
    assert parse_caption("") == dict.fromkeys(ATTRIBUTES)
    assert parse_caption("a blue square", strict=True) is None
    assert parse_caption("in the top left a small red striped circle", strict=True) is None
    assert parse_caption("a small red striped circle in the top left", strict=True) is not None
    with pytest.raises(DamInputError):
        parse_caption(None)  # type: ignore[arg-type]
