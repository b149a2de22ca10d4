"""Semantic segmentation (ADE20K, Cityscapes, COCO-Stuff, ...): class-id PNGs -> connected regions.

Each label map ``labels/<rel><label_suffix>`` (pixel value = class id) pairs with the image
``images/<rel><image_suffix>``; one work unit per label map, ordered by ``<rel>``. Every
connected component (8- or 4-connected) of every class id that is not ignored becomes a region
named by ``class_names[id]``, with id "{name}/{rel}/{class_id}/{k}" (k: the component's rank in
raster order of its first pixel, as ``scipy.ndimage.label`` numbers them). Small fragments go
through the pipeline's ``filters.min_area`` like every other region. A class id beyond
``class_names`` is counted as "unknown_class"; an unreadable label map skips its unit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.masks import mask_to_rle
from data_pipeline.sources.base import Region, SkipLog, UnitSkipped, WorkUnit

_LABEL_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")  # single-channel integer images


class SemanticSource:
    """Work units of a folder of class-id label maps (see the module docstring)."""

    kind = "image"

    def __init__(
        self, images: str | Path, labels: str | Path, class_names: Sequence[str], name: str = "semantic",
        ignore_ids: Sequence[int] = (255,), connectivity: int = 8, image_suffix: str = ".jpg",
        label_suffix: str = ".png", limit: int | None = None,
    ) -> None:
        try:
            import scipy.ndimage  # noqa: F401 - checked here so a missing install stops the run before any shard
        except ImportError:
            raise DamInputError("source.type semantic needs scipy (connected components): pip install 'describe-anything-toolkit[data]'") from None
        if connectivity not in (4, 8):
            raise ConfigError(f"source.connectivity must be 4 or 8, got {connectivity!r}")
        self.name, self.root, self.labels, self.log = name, Path(images), Path(labels), SkipLog()
        self.class_names, self.ignore_ids = list(class_names), set(ignore_ids)
        self.image_suffix, self.label_suffix, self.connectivity = image_suffix, label_suffix, connectivity
        if not self.labels.is_dir():
            raise ConfigError(f"source.labels: {str(self.labels)!r} is not a folder; set it to the folder of class-id PNGs")
        keys = sorted(
            p.relative_to(self.labels).as_posix()[: -len(label_suffix)]
            for p in self.labels.rglob(f"*{label_suffix}") if p.is_file() and not p.name.startswith(".")
        )
        if not keys:
            raise ConfigError(f"source.labels: {str(self.labels)!r} holds no *{label_suffix} label maps (see source.label_suffix)")
        self._keys = keys if limit is None else keys[:limit]

    def units(self) -> list[str]:
        return self._keys

    def _read_labels(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as img:
                img.load()
                if img.mode not in _LABEL_MODES:
                    raise UnitSkipped("corrupt_label", f"label map {str(path)!r} has mode {img.mode}; class ids need a single-channel (L, P, I;16) PNG")
                return np.array(img).astype(np.int64)
        except UnitSkipped:
            raise
        except Exception as exc:  # Pillow raises many types for damaged files
            raise UnitSkipped("corrupt_label", f"label map {str(path)!r} could not be read ({type(exc).__name__}: {exc})") from None

    def load(self, key: str) -> WorkUnit:
        from scipy import ndimage  # only this reader needs scipy, so it is imported here, not at module level

        image_path = self.root / f"{key}{self.image_suffix}"
        if not image_path.is_file():
            raise UnitSkipped("missing_image", f"image {str(image_path)!r} of label map {key!r} does not exist (see source.image_suffix)")
        labels = self._read_labels(self.labels / f"{key}{self.label_suffix}")
        structure = ndimage.generate_binary_structure(2, 2 if self.connectivity == 8 else 1)
        regions: list[Region] = []
        rejected: Counter[str] = Counter()
        unit = f"{self.name}/{key}"
        for class_id in (int(c) for c in np.unique(labels)):
            if class_id in self.ignore_ids:
                continue
            components, count = ndimage.label(labels == class_id, structure=structure)
            if not 0 <= class_id < len(self.class_names):
                rejected["unknown_class"] += count
                self.log.warn("unknown_class", f"class id {class_id} in {key!r} is beyond the {len(self.class_names)} class_names")
                continue
            for k, box in enumerate(ndimage.find_objects(components)):
                mask = np.zeros(labels.shape, dtype=bool)
                mask[box] = components[box] == k + 1
                region_id = f"{unit}/{class_id}/{k}"
                area = int(np.count_nonzero(mask))
                regions.append(Region(region_id, self.class_names[class_id], area, mask=mask_to_rle(mask), extra={"class_id": class_id}))
        return WorkUnit(unit, self.name, "image", image_path, labels.shape, regions, rejected, {"labels": str(self.labels / f"{key}{self.label_suffix}")})
