"""The video stage of DLC-SDP: caption SA-V masklets from a few frames each, as DAM's video data.

    dam-data video --config configs/data/video_sav.yaml output.dir=data/sav_video [--shard I --num-shards N]
    run_video_stage(load_video_config("configs/data/video_sav.yaml", ["output.dir=data/sav_video"]))

Per video (a work unit of the ``sav`` source), its masklets go through a funnel, each step
counted in the shard report:

- ``source``: masklets with a bad or empty RLE, or longer than the video, are left out;
- the region filters of stage 1 (``filters.min_area``, ``max_area_fraction``,
  ``max_regions_per_unit``; the area is the masklet's largest frame);
- ``video``: the frames could be decoded at the annotations' size (else "corrupt_video",
  "frame_size_mismatch" for the masklets still waiting);
- ``partial`` (with ``partial.path``): the masklet is judged on ``partial.frames`` of its
  sampled frames against an instance model's instances (:func:`data_pipeline.rejection.judge_mask`,
  the same rule as stage 2); it is partial when at least ``min_partial_fraction`` of them are,
  whole when any other is whole, else unmatched (kept unless ``unmatched: drop``). A whole
  masklet takes as its category (SA-V has none) the class most of its whole frames matched
  (ties: the earliest frame's), which the labeler's prompt and the row then carry, as in stages
  1 and 2. Instances are computed once per video frame and shared by the masklets judged on it;
- ``labeler``: a caption from a video DAM or a VLM over the frames
  (:mod:`data_pipeline.labelers.video`).

Frames: ``num_frames`` (8) per masklet, spread evenly over the annotated frames where it is
visible (``dam.video.sample_masklet_frames``; visibility is read from the RLEs without decoding
them). Each caption becomes a ``dam.schema.video_row``: in path mode the video's path relative
to ``output.image_root`` (default ``source.images``) with the frame indices and their masks, in
bytes mode the decoded frames themselves as PNG. Frames are decoded ``batch_size`` masklets at
a time, so memory stays bounded however many masklets a video has.

Sharding and resuming are :func:`data_pipeline.sharding.run_sharded`'s, as in stage 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from dam.configio import ConfigError, to_dict
from dam.masks import rle_to_mask
from dam.schema import video_row
from dam.video import read_video_frames, sample_masklet_frames
from data_pipeline.config import VideoStageConfig
from data_pipeline.filters import load_filtered_unit
from data_pipeline.labelers import Labeler, OwnsLabeler, VideoLabelRequest
from data_pipeline.labelers.video import build_video_labeler, video_labeler_config
from data_pipeline.rejection import Instances, InstanceSegmenter, judge_mask
from data_pipeline.seeds import region_seed
from data_pipeline.sharding import RunSummary, UnitResult, Worker, run_sharded
from data_pipeline.sources import Region, SkipLog, Source, WorkUnit, build_source
from data_pipeline.stage1 import LABELER_FILTER, _data_defining, image_root_of, read_answer, stored_image
from data_pipeline.stage2 import partial_reason
from data_pipeline.tally import Tally

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_FILTER", "VideoStageProcessor", "run_video_stage", "video_manifest", "masklet_frames", "visible_frames"]

VIDEO_FILTER = "video"
_SEEN = np.ones((1, 1), bool)  # stands for "visible" in the per-frame list sample_masklet_frames reads


def visible_frames(region: Region) -> list[int]:
    """The video frames where a masklet's mask is non-empty, read from the RLEs' run lengths (no decoding)."""
    frames = []
    for frame, rle in sorted((region.frame_masks or {}).items()):
        counts = rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]
        if int(mask_utils.area({"size": list(rle["size"]), "counts": counts})) > 0:
            frames.append(int(frame))
    return frames


def masklet_frames(region: Region, num_video_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` video frame indices of a masklet, spread evenly over its visible annotated frames."""
    visible = [None] * num_video_frames
    for frame in visible_frames(region):
        visible[frame] = _SEEN
    return sample_masklet_frames(visible, num_frames)


class VideoStageProcessor(OwnsLabeler):
    """One SA-V video -> its captioned masklet rows and tally; plugged into ``run_sharded``."""

    def __init__(
        self, source: Source, config: VideoStageConfig, labeler_factory: Callable[[], Labeler],
        instances_factory: Callable[[], InstanceSegmenter | None],
    ) -> None:
        self.source, self.config = source, config
        self.image_root = image_root_of(config)  # type: ignore[arg-type]  # reads output and source only
        self._labeler_factory, self._instances_factory = labeler_factory, instances_factory
        self._instances: InstanceSegmenter | None = None
        self._instances_built = False
        self.log = SkipLog()

    @property
    def instances(self) -> InstanceSegmenter | None:
        if not self._instances_built:
            self._instances, self._instances_built = self._instances_factory(), True
        return self._instances

    def __call__(self, key: str) -> UnitResult:
        result = UnitResult()
        tally = result.tally
        loaded = load_filtered_unit(self.source, key, self.config.filters, self.config.seed, result, self.log)
        if loaded is None:
            return result
        unit, regions = loaded
        stored: str | None = None
        if self.image_root is not None:
            stored = stored_image(unit.path, self.image_root)  # type: ignore[assignment]
        plans = [(region, masklet_frames(region, unit.meta["num_frames"], self.config.num_frames)) for region in regions]
        instance_cache: dict[int, Instances] = {}
        size = self.config.batch_size
        for start in range(0, len(plans), size):
            batch = plans[start:start + size]
            frames = self._decode(unit, sorted({i for _, indices in batch for i in indices}))
            if isinstance(frames, str):  # the video cannot be read: this batch and the rest are lost
                tally.reject(VIDEO_FILTER, frames, len(plans) - start)
                tally.skip_unit(frames)
                break
            tally.keep(VIDEO_FILTER, len(batch))
            items = []
            for region, indices in batch:
                rles = [region.frame_masks[i] for i in indices]  # type: ignore[index]
                items.append((region, indices, rles, [rle_to_mask(rle) for rle in rles]))
            if self.config.partial.path is not None:
                items = self._drop_partial(items, frames, instance_cache, tally)
            result.rows.extend(self._caption(unit, items, frames, stored, result))
        return result

    def _decode(self, unit: WorkUnit, indices: list[int]) -> dict[int, np.ndarray] | str:
        """Frames by index, or the reason they cannot be had."""
        try:
            frames = read_video_frames(unit.path, indices)
        except Exception as exc:  # noqa: BLE001 - decoders raise their own types (decord.DECORDError, av errors)
            self.log.warn("corrupt_video", f"video {str(unit.path)!r}: {type(exc).__name__}: {exc}")
            return "corrupt_video"
        for frame in frames:
            if frame.shape[:2] != tuple(unit.size):
                self.log.warn(
                    "frame_size_mismatch",
                    f"video {str(unit.path)!r} decodes to {frame.shape[0]}x{frame.shape[1]} (HxW) frames but its masklets are "
                    f"{unit.size[0]}x{unit.size[1]}",
                )
                return "frame_size_mismatch"
        return dict(zip(indices, frames))

    def _drop_partial(
        self, items: list[tuple[Region, list[int], list[dict], list[np.ndarray]]], frames: dict[int, np.ndarray],
        cache: dict[int, Instances], tally: Tally,
    ) -> list[tuple[Region, list[int], list[dict], list[np.ndarray]]]:
        """The items that are not partial objects (see the module docstring); whole ones named by their class."""
        model, config = self.instances, self.config.partial
        if model is None:
            return items
        kept = []
        for region, indices, rles, masks in items:
            positions = sorted(set(np.rint(np.linspace(0, len(indices) - 1, config.frames)).astype(int).tolist()))
            verdicts, classes = [], []
            for position in positions:
                frame = indices[position]
                if frame not in cache:
                    cache[frame] = model.instances(frames[frame])
                judgement = judge_mask(masks[position], cache[frame].masks, match_iou=config.match_iou, min_inside=config.min_inside)
                verdicts.append(judgement.verdict)
                if judgement.verdict == "whole":
                    classes.append(cache[frame].labels[judgement.instance])  # type: ignore[index]
            if verdicts.count("partial") >= config.min_partial_fraction * len(verdicts):
                verdict = "partial"
            else:
                verdict = "whole" if "whole" in verdicts else "unmatched"
            reason = partial_reason(verdict, config)
            if reason is not None:
                tally.reject("partial", reason)
                continue
            if verdict == "whole" and region.category is None:
                region = dataclasses.replace(region, category=Counter(classes).most_common(1)[0][0])
            kept.append((region, indices, rles, masks))
        tally.keep("partial", len(kept))
        return kept

    def _caption(
        self, unit: WorkUnit, items: list[tuple[Region, list[int], list[dict], list[np.ndarray]]],
        frames: dict[int, np.ndarray], stored: str | None, result: UnitResult,
    ) -> list[dict]:
        tally = result.tally
        if not items:
            tally.keep(LABELER_FILTER, 0)
            return []
        requests = [
            VideoLabelRequest.from_frames(
                region.id, [frames[i] for i in indices], masks, region.category, region_seed(self.config.seed, region.id),
            )
            for region, indices, _, masks in items
        ]
        answers = self.labeler.label(requests)
        if len(answers) != len(requests):
            raise RuntimeError(f"the labeler returned {len(answers)} results for {len(requests)} requests; it must return one per request")
        rows = []
        for (region, indices, rles, _), answer in zip(items, answers):
            caption, reason = read_answer(answer, f"masklet {region.id!r}", result, self.log)
            if caption is None:
                tally.reject(LABELER_FILTER, reason)
                continue
            tally.keep(LABELER_FILTER)
            if stored is None:
                rows.append(video_row(region.id, rles, caption, unit.source, region.category, frames=[frames[i] for i in indices]))
            else:
                rows.append(video_row(region.id, rles, caption, unit.source, region.category, video=stored, frame_indices=indices))
        return rows


def video_manifest(config: VideoStageConfig, source: Source) -> dict[str, Any]:
    """What defines a video-stage output (recorded in run.json; a rerun must match it)."""
    root = image_root_of(config)  # type: ignore[arg-type]
    partial = None
    if config.partial.path is not None:
        partial = dict(to_dict(config.partial), path=os.path.abspath(os.path.expanduser(config.partial.path)))
    return {
        "stage": "video", "source": source.name, "kind": source.kind,
        "image_storage": config.output.image_storage, "image_root": None if root is None else str(root),
        "config": {
            "source": to_dict(config.source.resolved()), "filters": to_dict(config.filters), "partial": partial,
            "num_frames": config.num_frames, "labeler": _data_defining(config.labeler), "seed": config.seed,
            "dtype": config.dtype,
        },
    }


def run_video_stage(
    config: VideoStageConfig, *, worker: Worker | None = None, labeler: Labeler | None = None,
    instances: InstanceSegmenter | None = None, progress: bool = True,
) -> RunSummary:
    """Run (or resume) this worker's share of the video stage.

    ``labeler`` overrides the ``labeler:`` section and ``instances`` the model at ``partial.path``
    (which must then be set, so the manifest names the filter); what is built from the config is
    checked before any shard starts and loaded on first use.
    """
    config.validate()
    if labeler is None:
        video_labeler_config(config.labeler)  # bad labeler keys (or a type without video) stop the run at once
    if instances is not None and config.partial.path is None:
        raise ConfigError("an instance model was given but partial.path is null; set partial.path to the model's folder")
    if instances is None and config.partial.path is not None and not (Path(config.partial.path).expanduser() / "config.json").is_file():
        raise ConfigError(f"partial.path: {config.partial.path!r} is not a local transformers model folder (no config.json)")
    source = build_source(config.source)
    if source.kind != "video":
        raise ConfigError(f"source.type {config.source.type!r} gives images; the video stage reads SA-V videos (type sav)")

    def build_instances() -> InstanceSegmenter | None:
        if instances is not None:
            return instances
        if config.partial.path is None:
            return None
        return InstanceSegmenter.from_config(config.partial, config.device, config.dtype)

    processor = VideoStageProcessor(
        source, config, (lambda: labeler) if labeler is not None else (lambda: build_video_labeler(config.labeler, config.num_frames)),
        build_instances,
    )
    try:
        return run_sharded(
            source.units(), processor, config.output.dir, video_manifest(config, source),
            shard_size=config.output.shard_size, worker=worker, progress=progress, desc=f"video {source.name}",
        )
    finally:
        if labeler is None:
            processor.close()

