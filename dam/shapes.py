"""ShapesDLC v1: a synthetic localized-captioning task with exact masks and checkable captions.

The one definition of the task, used by the data pipeline (``dam-data synthetic``), the
benchmark and the demo. A scene is a 512x512 RGB image holding 3-5 flat shapes; each object's
caption is ``"a {size} {color} {pattern} {shape} in the {position}"`` (e.g. "a small red
striped circle in the top left") and its mask is exactly its pixels, pattern included.

    from dam.shapes import scene, parse_caption
    s = scene(seed=0, index=7)          # deterministic: np.random.default_rng([seed, index])
    s.image, s.masks[0], s.objects[0].caption

Rendering, exactly (everything here is part of "ShapesDLC v1"; numpy only):

- Draws, in this order from the generator: gradient direction (``integers(2)``: 0 horizontal,
  i.e. the level changes from the left edge to the right edge; 1 vertical, top to bottom);
  levels a, b (``uniform(90, 170, 2)``); noise (``standard_normal((512, 512, 3), float32)``
  times 6: independent per pixel *and channel*); the object count (``integers(3, 6)``); then per
  object: shape, color, pattern, size class (each ``integers(len(values))``, uniform and
  independent), side (``integers(min, max + 1)``), and positions x0, y0 (``integers(0,
  512 - side + 1)`` each) until the box is >= 4 px from every earlier box on some axis. After
  200 rejected positions the size class and side are drawn again (this slightly favours small
  objects in crowded scenes).
- Background pixel = clip(rint(a + (b - a) * t / 511 + noise), 0, 255), t the column (row for
  vertical). Objects carry no noise: their pixels are exactly their RGB color or white.
- Boxes are (x0, y0, x1, y1), ends exclusive, side x side. Pixel (x, y) has centre
  (x + 0.5, y + 0.5); (cx, cy) is the box centre. circle: centre within side / 2 of (cx, cy).
  square: the whole box. triangle (isosceles, apex up, height = base = side): the pixel's centre
  column lies inside the triangle apex (cx, y0), base (x0, y1)-(x1, y1) at the height of the
  row's lower edge, i.e. |x + 0.5 - cx| <= (y + 1 - y0) / 2. Every shape touches all four sides
  of its box, so the mask's bounding box is the object's box.
- Patterns (white (255, 255, 255) inside the shape): striped: rows with (y - y0) % 6 < 2;
  dotted: pixels within 1.5 px of a grid pixel (x0 + 3 + 6i, y0 + 3 + 6j), i.e. 3x3 dots where
  (x - x0) % 6 and (y - y0) % 6 are both in {2, 3, 4}.
- Position: the 3x3 cell of the box centre, cell = min(2, int(c / (512 / 3))) per axis.

:func:`parse_caption` reads a (model's) caption back into attributes for per-attribute accuracy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dam.errors import DamInputError

SPEC = "ShapesDLC v1"
IMAGE_SIZE = 512
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220),
    "yellow": (235, 205, 40), "purple": (150, 70, 190), "orange": (240, 140, 30),
}
PATTERNS = ("solid", "striped", "dotted")
SIZES = {"small": (18, 28), "medium": (44, 64), "large": (90, 130)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
ATTRIBUTES = ("size", "color", "pattern", "shape", "position")  # in caption order
VOCABULARY = {"size": tuple(SIZES), "color": tuple(COLORS), "pattern": PATTERNS, "shape": SHAPES, "position": POSITIONS}
NUM_OBJECTS = (3, 5)
MIN_GAP = 4
BACKGROUND_LEVELS = (90.0, 170.0)
NOISE_SIGMA = 6.0
WHITE = (255, 255, 255)
_PLACEMENT_TRIES = 200
_SIZE_REDRAWS = 1000


def caption_for(*, size: str, color: str, pattern: str, shape: str, position: str) -> str:
    """The caption of an object with these attributes (unknown values raise DamInputError)."""
    values = {"size": size, "color": color, "pattern": pattern, "shape": shape, "position": position}
    for name, value in values.items():
        if value not in VOCABULARY[name]:
            raise DamInputError(f"{name} {value!r} is not one of {list(VOCABULARY[name])}")
    return f"a {size} {color} {pattern} {shape} in the {position}"


def position_of(box: tuple[int, int, int, int]) -> str:
    """The 3x3 cell name of the centre of ``box`` (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    col, row = (min(2, int(c / (IMAGE_SIZE / 3))) for c in ((x0 + x1) / 2, (y0 + y1) / 2))
    return POSITIONS[3 * row + col]


@dataclass(frozen=True)
class ShapeObject:
    """One object of a scene; ``box`` is (x0, y0, x1, y1) with exclusive ends, side x side."""

    shape: str
    color: str
    pattern: str
    size: str
    position: str
    box: tuple[int, int, int, int]
    side: int

    @property
    def attributes(self) -> dict[str, str]:
        """{attribute: value} in caption order (the keys of :data:`ATTRIBUTES`)."""
        return {name: getattr(self, name) for name in ATTRIBUTES}

    @property
    def caption(self) -> str:
        return caption_for(**self.attributes)


@dataclass
class Scene:
    """A rendered scene: uint8 (512, 512, 3) image, its objects and their bool (512, 512) masks.

    ``gradient`` is the background's (direction, a, b) before noise, for checks and analysis.
    """

    image: np.ndarray
    objects: list[ShapeObject]
    masks: list[np.ndarray]
    gradient: tuple[str, float, float] | None = None


def shape_pixels(shape: str, side: int) -> np.ndarray:
    """Bool (side, side): the pixels of ``shape`` within its box (see the module docstring)."""
    y, x = np.ogrid[:side, :side]
    half = side / 2
    if shape == "circle":
        return (x + 0.5 - half) ** 2 + (y + 0.5 - half) ** 2 <= half**2
    if shape == "square":
        return np.ones((side, side), dtype=bool)
    if shape == "triangle":
        return np.abs(x + 0.5 - half) <= (y + 1) / 2
    raise DamInputError(f"shape {shape!r} is not one of {list(SHAPES)}")


def pattern_pixels(pattern: str, side: int) -> np.ndarray:
    """Bool (side, side): the white pixels of ``pattern`` over the whole box (before the shape)."""
    y, x = np.ogrid[:side, :side]
    if pattern == "solid":
        return np.zeros((side, side), dtype=bool)
    if pattern == "striped":
        return np.broadcast_to(y % 6 < 2, (side, side))
    if pattern == "dotted":
        return (x % 6 - 3) ** 2 + (y % 6 - 3) ** 2 <= 1.5**2
    raise DamInputError(f"pattern {pattern!r} is not one of {list(PATTERNS)}")


def _separated(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return all(
        max(ox0 - x1, x0 - ox1) >= MIN_GAP or max(oy0 - y1, y0 - oy1) >= MIN_GAP
        for ox0, oy0, ox1, oy1 in others
    )


def _pick(rng: np.random.Generator, values: tuple[str, ...]) -> str:
    return values[int(rng.integers(len(values)))]


def _place_object(rng: np.random.Generator, boxes: list[tuple[int, int, int, int]]) -> ShapeObject:
    shape, color, pattern = _pick(rng, SHAPES), _pick(rng, tuple(COLORS)), _pick(rng, PATTERNS)
    for _ in range(_SIZE_REDRAWS):
        size = _pick(rng, tuple(SIZES))
        low, high = SIZES[size]
        side = int(rng.integers(low, high + 1))
        for _ in range(_PLACEMENT_TRIES):
            x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - side + 1, size=2))
            box = (x0, y0, x0 + side, y0 + side)
            if _separated(box, boxes):
                return ShapeObject(shape, color, pattern, size, position_of(box), box, side)
    raise RuntimeError(f"could not place an object among {len(boxes)} boxes")  # never seen in practice


def render_scene(rng: np.random.Generator) -> Scene:
    """Render one scene from ``rng`` (draw order in the module docstring)."""
    n = IMAGE_SIZE
    direction = ("horizontal", "vertical")[int(rng.integers(2))]
    a, b = (float(v) for v in rng.uniform(*BACKGROUND_LEVELS, size=2))
    ramp = (a + (b - a) * np.arange(n) / (n - 1)).astype(np.float32)
    gradient = ramp[None, :, None] if direction == "horizontal" else ramp[:, None, None]
    pixels = rng.standard_normal((n, n, 3), dtype=np.float32)  # (H, W, 3); in place from here
    pixels *= np.float32(NOISE_SIGMA)
    pixels += gradient
    image = np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels).astype(np.uint8)
    objects: list[ShapeObject] = []
    masks: list[np.ndarray] = []
    for _ in range(int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))):
        obj = _place_object(rng, [o.box for o in objects])
        x0, y0, x1, y1 = obj.box
        inside = shape_pixels(obj.shape, obj.side)
        white = inside & pattern_pixels(obj.pattern, obj.side)
        patch = image[y0:y1, x0:x1]  # a view: painting it paints the image
        patch[inside] = COLORS[obj.color]
        patch[white] = WHITE
        mask = np.zeros((n, n), dtype=bool)
        mask[y0:y1, x0:x1] = inside
        objects.append(obj)
        masks.append(mask)
    return Scene(image, objects, masks, (direction, a, b))


def scene(seed: int, index: int) -> Scene:
    """Scene ``index`` of the dataset with ``seed``: ``render_scene(default_rng([seed, index]))``."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DamInputError(f"{name} must be a non-negative integer, got {value!r}")
    return render_scene(np.random.default_rng([int(seed), int(index)]))


_ALIASES = {"centre": "center"}
_PHRASES = sorted(
    ((tuple(value.split()), name, value) for name, values in VOCABULARY.items() for value in values),
    key=lambda phrase: -len(phrase[0]),  # longest first: "top left" before "top"
)


def _words(text: str) -> list[str]:
    return [_ALIASES.get(w, w) for w in re.sub(r"[^a-z]+", " ", text.lower()).split()]


def parse_caption(text: str, strict: bool = False) -> dict[str, str | None] | None:
    """The attributes named in a caption: {attribute: value or None}, keys :data:`ATTRIBUTES`.

    Tolerant by design, so per-attribute accuracy can be scored on free-form model output: the
    text is lowercased, punctuation becomes spaces ("Top-left." reads as "top left"), "centre"
    reads as "center"; words are scanned left to right, longest vocabulary phrase first, and
    each attribute takes the first value found for it (later mentions, e.g. of another object,
    are ignored). Attributes not mentioned are None. With ``strict``, returns None unless the
    normalised text is exactly the template caption of the attributes found.
    """
    if not isinstance(text, str):
        raise DamInputError(f"caption must be a string, got {type(text).__name__}")
    words = _words(text)
    found: dict[str, str | None] = dict.fromkeys(ATTRIBUTES)
    i = 0
    while i < len(words):
        for phrase, name, value in _PHRASES:
            if tuple(words[i:i + len(phrase)]) == phrase:
                found[name] = found[name] or value
                i += len(phrase)
                break
        else:
            i += 1
    if strict and (None in found.values() or " ".join(words) != caption_for(**found)):
        return None
    return found
