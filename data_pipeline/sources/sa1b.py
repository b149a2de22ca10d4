"""SA-1B: unlabeled SAM masks, one ``sa_N.json`` beside each ``sa_N.jpg``.

Each JSON is ``{"image": {image_id, width, height, file_name}, "annotations": [{id,
segmentation (COCO RLE), bbox, area, predicted_iou, stability_score, crop_box,
point_coords}]}``. One work unit per JSON file (every ``*.json`` under the folder, recursively,
ordered by relative path, so extracted tar folders can sit side by side); one region per
annotation, id "{name}/{image_id}/{annotation_id}", category None, with predicted_iou,
stability_score, bbox, point_coords and crop_box kept in ``Region.extra`` for the filters.

A truncated or malformed JSON, a missing image and unusable masks are counted and skipped.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.jsonio import read_json
from data_pipeline.sources.base import Region, RegionRejected, SkipLog, UnitSkipped, WorkUnit, rle_region

_EXTRA = ("predicted_iou", "stability_score", "bbox", "point_coords", "crop_box")


class Sa1bSource:
    """Work units of an SA-1B folder (see the module docstring)."""

    kind = "image"

    def __init__(self, images: str | Path, name: str = "sa1b", limit: int | None = None) -> None:
        self.name, self.root, self.log = name, Path(images), SkipLog()
        if not self.root.is_dir():
            raise ConfigError(f"source.images: {str(self.root)!r} is not a folder; set it to the folder of sa_N.jpg + sa_N.json files")
        # Relative POSIX paths sort the same on every machine (unlike os.scandir order).
        keys = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*.json") if not p.name.startswith("."))
        if not keys:
            raise ConfigError(f"source.images: {str(self.root)!r} holds no *.json annotation files (SA-1B ships sa_N.json beside sa_N.jpg)")
        self._keys = keys if limit is None else keys[:limit]

    def units(self) -> list[str]:
        return self._keys

    def load(self, key: str) -> WorkUnit:
        json_path = self.root / key
        try:
            data = read_json(json_path, "SA-1B annotation")
        except DamInputError as exc:
            raise UnitSkipped("corrupt_json", str(exc)) from None
        image = data.get("image") if isinstance(data, dict) else None
        annotations = data.get("annotations") if isinstance(data, dict) else None
        size = (image.get("height"), image.get("width")) if isinstance(image, dict) else (None, None)
        if (
            not isinstance(annotations, list) or not isinstance(image, dict) or "image_id" not in image
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
        ):
            raise UnitSkipped("corrupt_json", f"SA-1B annotation file {str(json_path)!r} lacks image {{image_id, width, height}} or annotations")
        file_name = image.get("file_name")
        path = json_path.parent / file_name if isinstance(file_name, str) and file_name else json_path.with_suffix(".jpg")
        if not path.is_file():
            raise UnitSkipped("missing_image", f"image {str(path)!r} of {str(json_path)!r} does not exist")
        unit = f"{self.name}/{image['image_id']}"
        rejected: Counter[str] = Counter()
        regions: list[Region] = []
        seen: set[str] = set()
        for ann in annotations:
            if not isinstance(ann, dict) or "id" not in ann or "segmentation" not in ann:
                rejected["bad_annotation"] += 1
                self.log.warn("bad_annotation", f"an annotation of {str(json_path)!r} lacks id or segmentation")
                continue
            region_id = f"{unit}/{ann['id']}"
            if region_id in seen:
                rejected["duplicate_id"] += 1
                self.log.warn("duplicate_id", f"annotation id {ann['id']!r} repeats in {str(json_path)!r}")
                continue
            try:
                regions.append(rle_region(region_id, ann["segmentation"], size, None, {k: ann[k] for k in _EXTRA if k in ann}))
                seen.add(region_id)
            except RegionRejected as rej:
                rejected[rej.reason] += 1
                self.log.warn(rej.reason, f"{rej} in {str(json_path)!r}")
        return WorkUnit(unit, self.name, "image", path, size, regions, rejected, {"image_id": image["image_id"], "json": str(json_path)})
