"""COCO-format instance segmentation: COCO, LVIS, PACO (parts "dog:ear"), Objects365 with masks.

One work unit per image (ordered by image id), one region per annotation (ordered by
annotation id), id "{name}/{image_id}/{annotation_id}". Segmentations may be polygons,
uncompressed RLE or compressed RLE; crowd annotations (``iscrowd``) are left out, as are
annotations without a segmentation (Objects365 ships boxes only: turn them into masks first)
and unusable masks, each counted by reason. Category names are used as the file gives them
(PACO's part categories are "object:part"; a file without categories gives None);
``underscores_to_spaces`` turns LVIS's
"baseball_bat" into "baseball bat".

Image files are ``images / file_name``; LVIS image entries have no file_name, so their
``coco_url`` gives "train2017/000000391895.jpg" and ``images`` is then the folder holding
train2017/ and val2017/. The annotation file is one file: if it is unreadable the run stops
(a DamInputError naming it), since there is nothing to skip to.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from dam.configio import ConfigError
from dam.jsonio import read_json
from data_pipeline.sources.base import Region, RegionRejected, SkipLog, UnitSkipped, WorkUnit, rle_region

logger = logging.getLogger(__name__)

_PROBE_IMAGES = 8  # image files checked up front, so a wrong `images` folder stops the run at once


def _sort_key(value: Any) -> tuple[bool, Any]:
    return (isinstance(value, str), value)  # ints (the norm) before strings; never compares across types


class CocoSource:
    """Work units of a COCO-format instances JSON (see the module docstring)."""

    kind = "image"

    def __init__(
        self, annotations: str | Path, images: str | Path, name: str = "coco", underscores_to_spaces: bool = False,
        limit: int | None = None,
    ) -> None:
        self.name, self.root, self.annotations = name, Path(images), Path(annotations)
        self.log = SkipLog()
        data = read_json(self.annotations, "COCO annotation")
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
            raise ConfigError(
                f"source.annotations: {str(self.annotations)!r} is not a COCO instances file (a JSON object with "
                f"'images' and 'annotations' lists)"
            )
        self._categories = {
            c["id"]: (c["name"].replace("_", " ") if underscores_to_spaces else c["name"])
            for c in data.get("categories") or [] if isinstance(c, dict) and "id" in c and isinstance(c.get("name"), str)
        }
        self._images = {str(e["id"]): e for e in data["images"] if isinstance(e, dict) and "id" in e}
        self._annotations: dict[str, list[dict]] = defaultdict(list)
        orphans = 0
        for ann in data["annotations"]:
            key = str(ann.get("image_id")) if isinstance(ann, dict) else None
            if key in self._images:
                self._annotations[key].append(ann)
            else:
                orphans += 1
        if orphans:  # they belong to no unit, so no shard can count them; say so once
            logger.warning("%s: %d annotations have no image_id of a listed image; left out", self.annotations, orphans)
        keys = sorted(self._images, key=lambda k: _sort_key(self._images[k]["id"]))
        self._keys = keys if limit is None else keys[:limit]
        self._probe()

    def units(self) -> list[str]:
        return self._keys

    def _image_path(self, entry: dict) -> Path | None:
        name = entry.get("file_name")
        if not isinstance(name, str) and isinstance(entry.get("coco_url"), str):
            name = "/".join(entry["coco_url"].rstrip("/").split("/")[-2:])  # LVIS: "train2017/000000391895.jpg"
        return self.root / name if isinstance(name, str) and name else None

    def _probe(self) -> None:
        paths = [self._image_path(self._images[k]) for k in self._keys[:_PROBE_IMAGES]]
        paths = [p for p in paths if p is not None]
        if paths and not any(p.is_file() for p in paths):
            raise ConfigError(
                f"source.images: none of the first {len(paths)} images of {str(self.annotations)!r} exist under "
                f"{str(self.root)!r} (e.g. {str(paths[0])!r}); set source.images to the folder their file_name is relative to"
            )

    def load(self, key: str) -> WorkUnit:
        entry = self._images[key]
        where = f"image {entry['id']!r} of {str(self.annotations)!r}"
        path = self._image_path(entry)
        size = (entry.get("height"), entry.get("width"))
        if path is None or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
            raise UnitSkipped("bad_image_entry", f"{where} lacks a file_name or positive integer height/width")
        if not path.is_file():
            raise UnitSkipped("missing_image", f"{where}: file {str(path)!r} does not exist")
        rejected: Counter[str] = Counter()
        regions: list[Region] = []
        seen: set[str] = set()
        anns = sorted(self._annotations.get(key, []), key=lambda a: _sort_key(a.get("id", "")))
        for ann in anns:
            region_id = f"{self.name}/{key}/{ann.get('id')}"
            reason = self._unusable(ann, region_id in seen)
            if reason is None:
                extra = {k: v for k, v in ann.items() if k not in ("segmentation", "id", "image_id", "category_id")}
                try:
                    regions.append(rle_region(region_id, ann["segmentation"], size, self._categories.get(ann.get("category_id")), extra))
                    seen.add(region_id)
                    continue
                except RegionRejected as rej:
                    reason = rej.reason
                    self.log.warn(reason, f"{rej} in {str(self.annotations)!r}")
            elif reason not in ("iscrowd", "no_segmentation"):  # those are expected, not damage
                self.log.warn(reason, f"annotation {region_id!r} in {str(self.annotations)!r}")
            rejected[reason] += 1
        return WorkUnit(f"{self.name}/{key}", self.name, "image", path, size, regions, rejected, {"image_id": entry["id"]})

    def _unusable(self, ann: dict, duplicate: bool) -> str | None:
        """Why an annotation cannot become a region (None: it can, if its mask is good)."""
        if "id" not in ann:
            return "bad_annotation"
        if duplicate:
            return "duplicate_id"
        if ann.get("iscrowd"):
            return "iscrowd"
        if not ann.get("segmentation"):
            return "no_segmentation"
        if self._categories and ann.get("category_id") not in self._categories:  # no list at all: class-agnostic
            return "unknown_category"
        return None
