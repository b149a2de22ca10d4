"""Visual Genome region descriptions: the one reader of VG's `region_descriptions.json`.

FCLN training, the DenseCap mAP benchmark and retrieval all read this format, and `train` and
`bench` may not import each other, so the reader lives here. The file is a list with one entry
per image:

    [{"id": 1, "regions": [{"region_id": 7, "image_id": 1, "phrase": "a red car",
                            "x": 10, "y": 20, "width": 30, "height": 40}, ...]}, ...]

Releases differ in where the image id sits: the entry's "id", its "image_id", or only the
regions' "image_id"; all three are accepted. Boxes become [x1, y1, x2, y2] floats with
x2 = x + width and y2 = y + height (continuous coordinates, no +1), as DenseCap evaluates them.

`normalize_caption` is DenseCap's phrase preprocessing: lowercase, punctuation deleted (so
"man's" becomes "mans", as DenseCap's `translate(None, string.punctuation)` does), whitespace
collapsed.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Hashable

from dam.errors import DamInputError
from dam.jsonio import read_json

logger = logging.getLogger(__name__)

_REGION_KEYS = ("phrase", "x", "y", "width", "height")


@dataclass(frozen=True)
class VGRegion:
    """One described region of a Visual Genome image."""

    image_id: Hashable
    """The image's id as the file gives it (an int in the official releases)."""
    box: tuple[float, float, float, float]
    """[x1, y1, x2, y2] in pixels, x2 = x + width, y2 = y + height."""
    phrase: str
    """The description, as written in the file unless the loader was asked to normalize it."""
    region_id: Hashable | None = None
    """VG's region id when the file has one."""


def normalize_caption(text: str) -> str:
    """`text` lowercased with every character that is not a letter, digit or whitespace deleted
    and whitespace runs collapsed to one space (DenseCap's phrase preprocessing)."""
    kept = "".join(ch for ch in text.lower() if ch.isalnum() or ch.isspace())
    return " ".join(kept.split())


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false as a coordinate is always a broken file.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _entry_image_id(entry: dict[str, Any], index: int, where: str) -> Hashable:
    for key in ("id", "image_id"):
        if entry.get(key) is not None:
            return entry[key]
    for region in entry["regions"]:
        if isinstance(region, dict) and region.get("image_id") is not None:
            return region["image_id"]
    raise DamInputError(
        f"{where}: entry {index} has no image id (looked for 'id' and 'image_id' in the entry and 'image_id' "
        "in its regions); give each entry the id of its image"
    )


def _parse_region(region: Any, image_id: Hashable, index: int, r_index: int, where: str, normalize: bool) -> VGRegion:
    if not isinstance(region, dict):
        raise DamInputError(
            f"{where}: entry {index}, region {r_index} is not an object; expected {{{', '.join(_REGION_KEYS)}}}"
        )
    missing = [key for key in _REGION_KEYS if key not in region]
    if missing:
        raise DamInputError(
            f"{where}: entry {index}, region {r_index} lacks {', '.join(repr(k) for k in missing)}; "
            f"every region needs {', '.join(_REGION_KEYS)}"
        )
    if not isinstance(region["phrase"], str):
        raise DamInputError(f"{where}: entry {index}, region {r_index}: 'phrase' must be a string")
    for key in ("x", "y", "width", "height"):
        if not _is_number(region[key]):
            raise DamInputError(
                f"{where}: entry {index}, region {r_index}: {key!r} must be a number, got {region[key]!r}"
            )
    x, y = float(region["x"]), float(region["y"])
    box = (x, y, x + float(region["width"]), y + float(region["height"]))
    phrase = normalize_caption(region["phrase"]) if normalize else region["phrase"]
    return VGRegion(image_id=image_id, box=box, phrase=phrase, region_id=region.get("region_id"))


def parse_region_descriptions(
    data: Any, source: str = "region descriptions", *, normalize: bool = False, max_images: int | None = None
) -> dict[Hashable, list[VGRegion]]:
    """{image_id: [regions]} from the parsed content of a `region_descriptions.json`, in file order.

    `source` names the input in errors. With `normalize`, phrases go through `normalize_caption`.
    `max_images` keeps the first N images (entries repeating an image id add to it, not to N).
    """
    where = source
    if max_images is not None and max_images < 1:
        raise DamInputError(f"max_images must be at least 1, got {max_images}")
    if not isinstance(data, list):
        raise DamInputError(
            f"{where} must be a list of {{\"id\": image_id, \"regions\": [...]}} entries (Visual Genome's "
            f"region_descriptions.json), got {type(data).__name__}"
        )
    images: dict[Hashable, list[VGRegion]] = {}
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("regions"), list):
            raise DamInputError(
                f"{where}: entry {index} has no 'regions' list; each entry is {{\"id\", \"regions\": [...]}}"
            )
        image_id = _entry_image_id(entry, index, where)
        if not isinstance(image_id, Hashable) or isinstance(image_id, (bool, float)):
            raise DamInputError(f"{where}: entry {index} has image id {image_id!r}; use an integer or a string")
        if image_id not in images:
            if max_images is not None and len(images) >= max_images:
                continue  # not break: a later entry may still add regions to a kept image
            images[image_id] = []
        images[image_id].extend(
            _parse_region(region, image_id, index, r_index, where, normalize)
            for r_index, region in enumerate(entry["regions"])
        )
    return images


def load_region_descriptions(
    path: str | os.PathLike, *, normalize: bool = False, max_images: int | None = None
) -> dict[Hashable, list[VGRegion]]:
    """{image_id: [regions]} of Visual Genome's `region_descriptions.json` at `path`, in file order
    (see `parse_region_descriptions` for the options)."""
    data = read_json(path, "region descriptions")
    images = parse_region_descriptions(
        data, f"region descriptions file {os.fspath(path)!r}", normalize=normalize, max_images=max_images
    )
    logger.info("read %d regions of %d images from %s", sum(map(len, images.values())), len(images), os.fspath(path))
    return images
