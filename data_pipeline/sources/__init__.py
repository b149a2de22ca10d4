"""Data sources of the pipeline: work units (images, videos) with their regions.

    source = build_source(SourceConfig(type="coco", annotations="instances.json", images="train2017"))
    for key in source.units():            # deterministic order, cheap
        unit = source.load(key)           # WorkUnit: path, size, regions (RLE masks), rejected counts

Readers: ``coco`` (:mod:`.coco`), ``semantic`` (:mod:`.semantic`), ``sa1b`` (:mod:`.sa1b`),
``sav`` (:mod:`.sav`). The types they share are in :mod:`.base`.
"""

from __future__ import annotations

from pathlib import Path

from dam.configio import ConfigError
from data_pipeline.config import SourceConfig
from data_pipeline.sources.base import (
    SOURCE_FILTER, Region, RegionRejected, SkipLog, Source, UnitSkipped, WorkUnit, load_unit, rle_region,
)

__all__ = [
    "SOURCE_FILTER", "Region", "RegionRejected", "SkipLog", "Source", "UnitSkipped", "WorkUnit", "build_source",
    "load_unit", "rle_region",
]

_WHAT = {
    "images": "the image (or video) folder",
    "annotations": "the COCO-format instances JSON",
    "labels": "the folder of class-id label maps",
}


def _class_names(value: list[str] | str) -> list[str]:
    if isinstance(value, list):
        return value
    path = Path(value)
    if not path.is_file():
        raise ConfigError(f"source.class_names: {value!r} is neither a list nor an existing text file (one class name per line)")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def build_source(config: SourceConfig) -> Source:
    """The source a (validated) ``SourceConfig`` describes; missing paths raise ConfigError."""
    config.validate()
    for name, what in _WHAT.items():
        value = getattr(config, name)
        if value and not Path(value).exists():
            raise ConfigError(f"source.{name}: {value!r} does not exist; set it to {what}")
    name, limit = config.source_name, config.limit
    if config.type == "coco":
        from data_pipeline.sources.coco import CocoSource

        return CocoSource(config.annotations, config.images, name, config.underscores_to_spaces, limit)
    if config.type == "semantic":
        from data_pipeline.sources.semantic import SemanticSource

        return SemanticSource(
            config.images, config.labels, _class_names(config.class_names), name, config.ignore_ids,
            config.connectivity, config.image_suffix, config.label_suffix, limit,
        )
    if config.type == "sa1b":
        from data_pipeline.sources.sa1b import Sa1bSource

        return Sa1bSource(config.images, name, limit)
    from data_pipeline.sources.sav import SavSource

    return SavSource(config.images, name, config.masklet_types, limit)
