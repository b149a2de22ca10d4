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

DATA_CONFIGS = "configs/data/"
"""The example configs of dam-data, named when a --config file is missing."""

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
    data = read_yaml(path, DATA_CONFIGS) if path is not None else {}
    _check_stage(data, "stage1", path)
    return from_dict(Stage1Config, apply_overrides(data, list(overrides or []))).validate()


# ---- stage 2 (SA-1B self-labeling) and the video stage ------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16")


def _in_unit(value: float | None, key: str) -> None:
    if value is not None and not 0 <= value <= 1:
        raise ConfigError(f"{key} must be in [0, 1] (or null), got {value}")


def _at_least_one(value: int, key: str) -> None:
    if value < 1:
        raise ConfigError(f"{key} must be >= 1, got {value}")


@dataclass
class DetectorConfig:
    """Open-vocabulary detection with OWLv2 (data_pipeline.detection): which objects stage 2 labels."""

    path: str | None = None
    """Local folder of an OWLv2 checkpoint with its processor (e.g. google/owlv2-large-patch14-ensemble)."""
    vocabulary: list[str] | str | None = None
    """Class names to detect, or a text file with one per line (blank lines and '#' comments skipped)."""
    query_template: str = "a photo of a {}"
    """How a class name becomes a text query; {} is the name (underscores become spaces)."""
    min_score: float = 0.1
    """Boxes scoring below this are not candidates at all (the funnel starts above it)."""
    nms_iou: float = 0.3
    """Per-class non-maximum suppression: a box overlapping a higher-scoring box of its class by more is dropped."""
    max_detections: int = 32
    """Candidates per image after NMS (highest scores); the rest count as "over_max_detections"."""
    text_batch_size: int = 256
    """Text queries per text-encoder call (their embeddings are computed once per run and cached)."""

    def validate(self) -> "DetectorConfig":
        _in_unit(self.min_score, "detector.min_score")
        _in_unit(self.nms_iou, "detector.nms_iou")
        _at_least_one(self.max_detections, "detector.max_detections")
        _at_least_one(self.text_batch_size, "detector.text_batch_size")
        if "{}" not in self.query_template:
            raise ConfigError(f"detector.query_template must contain {{}} where the class name goes, got {self.query_template!r}")
        return self


@dataclass
class SamConfig:
    """Box-prompted masks with segment-anything (dam.sam)."""

    checkpoint: str | None = None
    """An official SAM checkpoint file (sam_vit_h_4b8939.pth, ...)."""
    model_type: Literal["vit_h", "vit_l", "vit_b"] = "vit_h"
    """The architecture the checkpoint was released for."""
    batch_size: int = 32
    """Boxes per mask-decoder call (each returns a full-resolution mask, so this bounds memory)."""
    multimask_output: bool = False
    """Ask for 3 masks per box and keep the one with the highest predicted IoU (SAM's advice for boxes: false)."""

    def validate(self) -> "SamConfig":
        _at_least_one(self.batch_size, "sam.batch_size")
        return self


@dataclass
class PartialConfig:
    """The partial-object filter (data_pipeline.rejection): masks matched against an instance-segmentation
    model's instances. With I the instance sharing the most pixels with mask M: M is "whole" if
    IoU(M, I) >= match_iou; else "partial" (a part of I) if |M & I| / |M| >= min_inside; else "unmatched"."""

    path: str | None = None
    """Local folder of a transformers instance/universal segmentation model and its image processor
    (e.g. facebook/mask2former-swin-large-coco-instance); null: the filter is off."""
    threshold: float = 0.5
    """Instance score threshold (post_process_instance_segmentation's threshold)."""
    mask_threshold: float = 0.5
    """Pixel threshold of instance masks."""
    overlap_mask_area_threshold: float = 0.8
    """Drop instance masks mostly hidden behind higher-scoring ones (the post-processor's option)."""
    ignore_labels: list[str] = field(default_factory=list)
    """Instance classes that are not objects (a panoptic model's stuff: "wall", "sky", ...): never matched."""
    match_iou: float = 0.5
    """IoU with the best instance from which a mask counts as the whole object."""
    min_inside: float = 0.8
    """Share of a mask inside its best instance from which a (not whole) mask is a part of it."""
    unmatched: Literal["keep", "drop"] = "keep"
    """Masks no instance explains (objects outside the instance model's classes, stuff): keep or drop."""

    def validate(self, key: str = "partial") -> "PartialConfig":
        for name in ("threshold", "mask_threshold", "overlap_mask_area_threshold", "match_iou", "min_inside"):
            _in_unit(getattr(self, name), f"{key}.{name}")
        if self.match_iou == 0:
            raise ConfigError(f"{key}.match_iou must be > 0 (0 would call every mask whole)")
        return self


@dataclass
class VideoPartialConfig(PartialConfig):
    """The partial-object filter of the video stage: a masklet is judged on some of its sampled frames."""

    frames: int = 3
    """Frames per masklet judged (evenly spread over its sampled frames; instances are cached per frame)."""
    min_partial_fraction: float = 0.5
    """A masklet is partial when at least this share of its judged frames is partial."""

    def validate(self, key: str = "partial") -> "VideoPartialConfig":
        super().validate(key)
        _at_least_one(self.frames, f"{key}.frames")
        _in_unit(self.min_partial_fraction, f"{key}.min_partial_fraction")
        if self.min_partial_fraction == 0:
            raise ConfigError(f"{key}.min_partial_fraction must be > 0 (0 would call every masklet partial)")
        return self


@dataclass
class SiglipConfig:
    """Image-text agreement of a caption with its region (data_pipeline.rejection): SigLIP on the focal crop."""

    path: str | None = None
    """Local folder of a SigLIP checkpoint with its processor (e.g. google/siglip-so400m-patch14-384); null: off."""
    batch_size: int = 32
    """Crop-caption pairs per forward."""
    max_text_length: int | None = None
    """Caption tokens kept (SigLIP reads 64; longer captions are truncated); null: the model's maximum."""
    alpha: float = 3.0
    """Focal crop expansion (dam.focal), the crop DAM itself sees."""
    min_size: int = 48
    """Focal crop's floor of the region's box side, in pixels (dam.focal)."""

    def validate(self) -> "SiglipConfig":
        _at_least_one(self.batch_size, "siglip.batch_size")
        if self.max_text_length is not None:
            _at_least_one(self.max_text_length, "siglip.max_text_length")
        if self.alpha < 1 or self.min_size < 1:
            raise ConfigError("siglip.alpha and siglip.min_size must be >= 1")
        return self


@dataclass
class RejectionConfig:
    """Rejection sampling of stage-2 candidates: a candidate below any threshold is dropped (null: off)."""

    min_detector_score: float | None = 0.3
    """OWLv2 score (sigmoid of the best class logit)."""
    min_sam_iou: float | None = 0.88
    """SAM's predicted IoU of the mask."""
    min_mask_area: int = 1024
    """Smallest mask in pixels (32x32: smaller objects are too small to describe in detail)."""
    max_mask_fraction: float | None = 0.8
    """Largest mask as a share of the image."""
    min_siglip_score: float | None = 0.05
    """SigLIP's match probability of focal crop and caption, sigmoid(scale * cos + bias); needs siglip.path."""

    def validate(self) -> "RejectionConfig":
        _in_unit(self.min_detector_score, "rejection.min_detector_score")
        _in_unit(self.min_siglip_score, "rejection.min_siglip_score")
        _in_unit(self.max_mask_fraction, "rejection.max_mask_fraction")
        _at_least_one(self.min_mask_area, "rejection.min_mask_area")
        return self


@dataclass
class SelectionConfig:
    """Which surviving candidates of an image become rows (see data_pipeline.stage2 for the rule)."""

    max_per_image: int = 2
    """Rows per image at most: the best by detector score x SAM IoU x SigLIP score."""
    distinct_classes: bool = True
    """At most one instance per detected class in an image."""
    max_mask_overlap: float = 0.5
    """A candidate whose mask overlaps a better one's by a larger IoU is the same object under another name (1: off)."""
    shortlist: int = 4
    """Candidates per image sent to the labeler (best first); spares replace those the labeler or SigLIP reject."""

    def validate(self) -> "SelectionConfig":
        _at_least_one(self.max_per_image, "selection.max_per_image")
        _in_unit(self.max_mask_overlap, "selection.max_mask_overlap")
        if self.shortlist < self.max_per_image:
            raise ConfigError(f"selection.shortlist ({self.shortlist}) must be >= selection.max_per_image ({self.max_per_image})")
        return self


def _check_runtime(device: str | None, dtype: str) -> None:
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    if device is not None and not (device == "cpu" or device == "cuda" or device.startswith("cuda:")):
        raise ConfigError(f"device must be cpu, cuda or cuda:N (or null: this process's GPU when CUDA is available), got {device!r}")


@dataclass
class Stage2Config:
    """Stage 2 of DLC-SDP: detect, segment, filter and caption objects of unlabeled images (SA-1B)."""

    stage: Literal["stage2"] = "stage2"
    """Marks the file as a stage-2 config (dam-data stage2)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """The images (type sa1b; coco and semantic images work too, their annotations unused)."""
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    """Candidate objects: OWLv2 boxes and class names."""
    sam: SamConfig = field(default_factory=SamConfig)
    """A mask per box."""
    partial: PartialConfig = field(default_factory=PartialConfig)
    """Dropping masks of object parts."""
    siglip: SiglipConfig = field(default_factory=SiglipConfig)
    """Caption-crop agreement."""
    rejection: RejectionConfig = field(default_factory=RejectionConfig)
    """Thresholds."""
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    """Rows per image."""
    labeler: dict[str, Any] = field(default_factory=dict)
    """The labeler section (data_pipeline.labelers): the stage-1 DAM (type dam) or a VLM."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the rows go."""
    seed: int = 0
    """Run seed: each candidate's labeler seed derives from (seed, candidate id)."""
    batch_size: int = 16
    """Regions per labeler call."""
    device: str | None = None
    """Device of the detector, SAM, instance and SigLIP models: cpu, cuda, cuda:N; null: this process's GPU
    (cuda:LOCAL_RANK under torchrun, data_pipeline.devices) if CUDA is available, else cpu."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of those models (SAM runs under autocast in a half dtype)."""

    def validate(self) -> "Stage2Config":
        self.source.validate()
        if self.source.type == "sav":
            raise ConfigError("source.type 'sav' is a video source; stage2 labels images (use dam-data video for SA-V)")
        for section in (self.detector, self.sam, self.partial, self.siglip, self.rejection, self.selection, self.output):
            section.validate()
        if self.rejection.min_siglip_score is not None and self.siglip.path is None:
            raise ConfigError("rejection.min_siglip_score needs siglip.path (a SigLIP model folder); set it, or set the threshold to null")
        _at_least_one(self.batch_size, "batch_size")
        _check_runtime(self.device, self.dtype)
        return self


@dataclass
class VideoStageConfig:
    """The video stage of DLC-SDP: caption SA-V masklets from 8 frames each."""

    stage: Literal["video"] = "video"
    """Marks the file as a video-stage config (dam-data video)."""
    source: SourceConfig = field(default_factory=SourceConfig)
    """The videos and masklets (type sav)."""
    filters: FilterConfig = field(default_factory=FilterConfig)
    """Masklet filters before anything is decoded (area in the frame where the object is largest)."""
    partial: VideoPartialConfig = field(default_factory=VideoPartialConfig)
    """Dropping masklets of object parts (null path: off)."""
    num_frames: int = 8
    """Frames per masklet, spread evenly over the frames where it is visible (dam.video.sample_masklet_frames)."""
    labeler: dict[str, Any] = field(default_factory=dict)
    """The labeler section: dam (a video DAM), openai (a VLM, num_frames image parts) or placeholder."""
    output: OutputConfig = field(default_factory=OutputConfig)
    """Where the rows go; path mode stores the video path + frame indices, bytes mode the frames as PNG."""
    seed: int = 0
    """Run seed: each masklet's labeler seed derives from (seed, masklet id)."""
    batch_size: int = 8
    """Masklets per labeler call (their frames are decoded together)."""
    device: str | None = None
    """Device of the instance model: cpu, cuda, cuda:N; null: this process's GPU (cuda:LOCAL_RANK under
    torchrun, data_pipeline.devices) if CUDA is available, else cpu."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights dtype of the instance model."""

    def validate(self) -> "VideoStageConfig":
        self.source.validate()
        if self.source.type != "sav":
            raise ConfigError(f"source.type must be 'sav' for the video stage (SA-V videos + masklets), got {self.source.type!r}")
        self.filters.validate()
        self.partial.validate()
        self.output.validate()
        _at_least_one(self.num_frames, "num_frames")
        _at_least_one(self.batch_size, "batch_size")
        _check_runtime(self.device, self.dtype)
        return self


def load_stage2_config(path: str | Path | None, overrides: list[str] | None = None) -> Stage2Config:
    """The stage-2 config from a YAML file (or none) with `key.sub=value` overrides, validated."""
    data = read_yaml(path, DATA_CONFIGS) if path is not None else {}
    _check_stage(data, "stage2", path)
    return from_dict(Stage2Config, apply_overrides(data, list(overrides or []))).validate()


def load_video_config(path: str | Path | None, overrides: list[str] | None = None) -> VideoStageConfig:
    """The video-stage config from a YAML file (or none) with `key.sub=value` overrides, validated."""
    data = read_yaml(path, DATA_CONFIGS) if path is not None else {}
    _check_stage(data, "video", path)
    return from_dict(VideoStageConfig, apply_overrides(data, list(overrides or []))).validate()


DATA_STAGES = ("stage1", "stage2", "video")


def _check_stage(data: dict[str, Any], expected: str, path: str | Path | None) -> None:
    """A config file written for another stage (its ``stage`` key) names the command that runs it."""
    stage = data.get("stage")
    if stage is None or stage == expected or stage not in DATA_STAGES:
        return  # no key: stage 1 (or the loader's own default); an unknown value is the Literal check's to report
    raise ConfigError(f"config file {str(path)!r} is a {stage} config (stage: {stage}); run it with `dam-data {stage}`")


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> "Stage1Config | Stage2Config | VideoStageConfig":
    """Any data-pipeline config, by its top-level ``stage`` key (absent: stage1), validated."""
    stage = read_yaml(path, DATA_CONFIGS).get("stage")
    if stage is None:
        return load_stage1_config(path, overrides)
    if stage == "stage2":
        return load_stage2_config(path, overrides)
    if stage == "video":
        return load_video_config(path, overrides)
    raise ConfigError(f"stage: {stage!r} in {str(path)!r} is not a data-pipeline stage; use {', '.join(DATA_STAGES[1:])}, or no stage key for a stage-1 config")
