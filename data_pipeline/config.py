"""The data-pipeline config: dataclasses that are the YAML schema, the CLI and the Python API.

    dam-data stage1 --config configs/data/stage1_coco.yaml output.dir=data/coco_s1 filters.min_area=2048

Sections: ``source`` (which reader and its paths, :mod:`data_pipeline.sources`), ``filters``
(region filters before labeling, :mod:`data_pipeline.filters`), ``labeler`` (passed as is to
``data_pipeline.labelers.build_labeler``, which checks it), ``output`` (folder, shard size, how
images are stored), ``seed``. Loaded strictly by ``dam.configio``: an unknown key, a wrong type,
an option the chosen source type does not use, or a missing required path stops with a
one-line ``ConfigError`` naming the dotted key. Relative paths are relative to the directory
the command runs in. Every YAML under configs/data/ is loaded against these classes by a test.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dam.configio import ConfigError, apply_overrides, from_dict, read_yaml

SourceType = Literal["coco", "semantic", "sa1b", "sav"]

# Which SourceConfig fields each source type reads (besides type, name, limit).
_SOURCE_FIELDS: dict[str, tuple[str, ...]] = {
    "coco": ("images", "annotations", "underscores_to_spaces"),
    "semantic": ("images", "labels", "class_names", "ignore_ids", "connectivity", "image_suffix", "label_suffix"),
    "sa1b": ("images",),
    "sav": ("images", "masklet_types"),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "coco": ("images", "annotations"), "semantic": ("images", "labels", "class_names"), "sa1b": ("images",), "sav": ("images",),
}
_PATH_FIELDS = ("images", "annotations", "labels")


@dataclass
class SourceConfig:
    """Where the regions come from; the fields a type does not read must stay unset."""

    type: SourceType | None = None
    """coco (COCO/LVIS/PACO/Objects365 instances JSON), semantic (class-id PNGs), sa1b, or sav (videos)."""
    name: str | None = None
    """Rows' `source` column and their ids' prefix ("lvis", "paco", ...); default: the type."""
    images: str | None = None
    """coco: folder the file_names are relative to; semantic: image folder; sa1b: folder of sa_N.jpg +
    sa_N.json; sav: folder of {video_id}.mp4 + {video_id}_manual.json / _auto.json."""
    annotations: str | None = None
    """coco: the instances JSON."""
    underscores_to_spaces: bool = False
    """coco: category "baseball_bat" -> "baseball bat" (LVIS names)."""
    labels: str | None = None
    """semantic: folder of label maps (pixel value = class id), mirroring `images`."""
    class_names: list[str] | str | None = None
    """semantic: name of each class id (index = id), or a text file with one name per line."""
    ignore_ids: list[int] = field(default_factory=lambda: [255])
    """semantic: class ids that are not regions (void, unlabeled; e.g. [0, 255] for ADE20K)."""
    connectivity: int = 8
    """semantic: 8- or 4-connected components."""
    image_suffix: str = ".jpg"
    """semantic: image of label map <rel><label_suffix> is <rel><image_suffix> under `images`."""
    label_suffix: str = ".png"
    """semantic: the label maps' file name ending."""
    masklet_types: list[str] = field(default_factory=lambda: ["manual", "auto"])
    """sav: which masklet files to read."""
    limit: int | None = None
    """Only the first N work units (a quick trial run)."""

    def validate(self) -> "SourceConfig":
        if self.type is None:
            raise ConfigError("source.type is required: one of coco, semantic, sa1b, sav")
        defaults = SourceConfig()
        for f in dataclasses.fields(self):
            if f.name in ("type", "name", "limit") or f.name in _SOURCE_FIELDS[self.type]:
                continue
            if getattr(self, f.name) != getattr(defaults, f.name):
                users = [t for t, names in _SOURCE_FIELDS.items() if f.name in names]
                raise ConfigError(f"source.{f.name} is not used by source.type {self.type!r} (only by {', '.join(users)}); remove it")
        for name in _REQUIRED[self.type]:
            if getattr(self, name) in (None, "", []):
                raise ConfigError(f"source.{name} is required for source.type {self.type!r}: {_doc(SourceConfig, name)}")
        if self.name is not None and (not self.name.strip() or "/" in self.name):
            raise ConfigError(f"source.name must be a non-empty name without '/' (it prefixes region ids), got {self.name!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"source.limit must be >= 1 or null, got {self.limit}")
        return self

    @property
    def source_name(self) -> str:
        return self.name or str(self.type)

    def resolved(self) -> "SourceConfig":
        """A copy with path fields absolute (what the manifest records, so a rerun from elsewhere still matches)."""
        # abspath, not resolve: the same folder the rows' relative image paths are computed against
        paths = {name: os.path.abspath(getattr(self, name)) for name in _PATH_FIELDS if getattr(self, name)}
        if isinstance(self.class_names, str):
            paths["class_names"] = os.path.abspath(self.class_names)
        return dataclasses.replace(self, **paths)


@dataclass
class FilterConfig:
    """Region filters applied before labeling, in this order; null turns a filter off."""

    min_area: int = 1
    """Smallest region in pixels (video: in the frame where it is largest)."""
    max_area_fraction: float | None = None
    """Largest region as a fraction of the image (SA-1B has whole-image background masks)."""
    min_predicted_iou: float | None = None
    """SA-1B: smallest SAM predicted IoU (regions without one pass)."""
    min_stability_score: float | None = None
    """SA-1B: smallest SAM stability score (regions without one pass)."""
    max_regions_per_unit: int | None = None
    """At most this many regions per image/video, a seeded choice stable across runs."""

    def validate(self) -> "FilterConfig":
        if self.min_area < 1:
            raise ConfigError(f"filters.min_area must be >= 1 pixel, got {self.min_area}")
        if self.max_area_fraction is not None and not 0 < self.max_area_fraction <= 1:
            raise ConfigError(f"filters.max_area_fraction must be in (0, 1] or null, got {self.max_area_fraction}")
        if self.max_regions_per_unit is not None and self.max_regions_per_unit < 1:
            raise ConfigError(f"filters.max_regions_per_unit must be >= 1 or null, got {self.max_regions_per_unit}")
        return self


@dataclass
class OutputConfig:
    """Where and how rows are written."""

    dir: str | None = None
    """Output folder: parquet shards + per-shard reports + run.json (required)."""
    shard_size: int = 100
    """Work units (images, videos) per shard: the unit of resuming and of splitting over workers."""
    image_storage: Literal["path", "bytes"] = "path"
    """path: rows hold the image's path relative to `image_root` (set dam-train's dataset `root` to that
    folder); bytes: rows hold the image file's bytes (self-contained, one copy per region)."""
    image_root: str | None = None
    """path mode: folder the stored paths are relative to; default: source.images."""

    def validate(self) -> "OutputConfig":
        if not self.dir:
            raise ConfigError("output.dir is required: the folder to write the shards to (e.g. output.dir=data/coco_stage1)")
        if self.shard_size < 1:
            raise ConfigError(f"output.shard_size must be >= 1, got {self.shard_size}")
        if self.image_root is not None and self.image_storage == "bytes":
            raise ConfigError("output.image_root only applies to output.image_storage=path; remove it or store paths")
        return self


@dataclass
class Stage1Config:
    """Stage 1 of DLC-SDP: caption each region of a segmentation dataset with a labeler."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """The regions to caption."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Which regions are worth captioning."""
    labeler: dict[str, Any] = field(default_factory=dict)
    """The labeler section, given as is to data_pipeline.labelers.build_labeler."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the rows go."""
    seed: int = 0
    """Run seed: each region's seed (prompt variants, sampling) derives from (seed, region id)."""
    batch_size: int = 16
    """Regions per labeler call (each request holds a full-size image mask, so this bounds memory)."""

    def validate(self) -> "Stage1Config":
        self.source.validate()
        self.filters.validate()
        self.output.validate()
        if self.source.type == "sav":
            raise ConfigError("source.type 'sav' is a video source; stage1 captions image regions (coco, semantic, sa1b)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        return self


def _doc(cls: type, name: str) -> str:
    """The one-line docstring of a field, for messages (read from the source like litgpt does)."""
    import ast
    import inspect

    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (frozen install): the key alone still says what is missing
        return name
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                return " ".join(str(following.value.value).split())
    return name


def load_stage1_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage1Config:
    """The stage-1 config from a YAML file (or none) with `key.sub=value` overrides, validated."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(Stage1Config, apply_overrides(data, list(overrides or []))).validate()
