"""SA-V: videos (``{video_id}.mp4``, 24 fps) with SAM 2 masklets (``{video_id}_manual.json`` / ``_auto.json``).

A masklet JSON holds ``"masklet"``: a list over annotated frames t of a list over objects k of
COCO RLE, annotated frame t being video frame 4 t (``dam.video.sav_masklet_to_frame_masks``),
plus per-video ``video_*`` fields and per-object ``masklet_*`` lists (``masklet_id``,
``masklet_size_bucket``, ``masklet_stability_score``...). One work unit per mp4 (every
``*.mp4`` under the folder, ordered by relative path); one region per object of each wanted
masklet type, id "{name}/{video_id}/{type}/{masklet_id}", category None (SA-V has no classes;
the video stage's partial filter names whole masklets), with ``frame_masks`` {video frame: RLE}
and the object's ``masklet_*`` values in ``extra``.

Unusable inputs are counted and skipped: a video that cannot be opened or a truncated JSON
skips the unit; a masklet with a bad RLE, or longer than the video, skips that object.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.jsonio import read_json
from dam.masks import load_mask, mask_to_rle
from dam.video import sav_masklet_to_frame_masks, video_num_frames
from data_pipeline.sources.base import Region, SkipLog, UnitSkipped, WorkUnit

SAV_FPS = 24
SAV_STRIDE = 4  # SA-V annotated every 4th video frame
MASKLET_TYPES = ("manual", "auto")


class SavSource:
    """Work units of an SA-V folder (see the module docstring)."""

    kind = "video"

    def __init__(
        self, videos: str | Path, name: str = "sav", masklet_types: Sequence[str] = MASKLET_TYPES, limit: int | None = None,
    ) -> None:
        self.name, self.root, self.log = name, Path(videos), SkipLog()
        unknown = [t for t in masklet_types if t not in MASKLET_TYPES]
        if unknown or not masklet_types:
            raise ConfigError(f"source.masklet_types must be a non-empty list of {list(MASKLET_TYPES)}, got {list(masklet_types)!r}")
        self.masklet_types = list(masklet_types)
        if not self.root.is_dir():
            raise ConfigError(f"source.images: {str(self.root)!r} is not a folder; set it to the SA-V folder of {{video_id}}.mp4 files")
        keys = sorted(p.relative_to(self.root).as_posix()[:-4] for p in self.root.rglob("*.mp4") if not p.name.startswith("."))
        if not keys:
            raise ConfigError(f"source.images: {str(self.root)!r} holds no *.mp4 videos")
        self._keys = keys if limit is None else keys[:limit]

    def units(self) -> list[str]:
        return self._keys

    def load(self, key: str) -> WorkUnit:
        path = self.root / f"{key}.mp4"
        video_id = path.stem
        annotations: list[tuple[str, Path, dict]] = []
        for masklet_type in self.masklet_types:
            json_path = path.with_name(f"{video_id}_{masklet_type}.json")
            if not json_path.is_file():
                continue
            try:
                data = read_json(json_path, "SA-V masklet")
            except DamInputError as exc:
                raise UnitSkipped("corrupt_json", str(exc)) from None
            if not isinstance(data, dict) or not isinstance(data.get("masklet"), list):
                raise UnitSkipped("corrupt_json", f"SA-V masklet file {str(json_path)!r} has no 'masklet' list")
            annotations.append((masklet_type, json_path, data))
        if not annotations:
            wanted = " or ".join(f"{video_id}_{t}.json" for t in self.masklet_types)
            raise UnitSkipped("missing_annotations", f"video {str(path)!r} has no {wanted} beside it")
        try:
            num_frames = video_num_frames(path)
        except DamInputError as exc:
            raise UnitSkipped("corrupt_video", str(exc)) from None
        unit = f"{self.name}/{video_id}"
        first = annotations[0][2]
        size = _frame_size(first)
        if size is None:
            raise UnitSkipped("corrupt_json", f"SA-V masklets of {str(path)!r} give no frame size (video_height/width or RLE size)")
        regions: list[Region] = []
        rejected: Counter[str] = Counter()
        for masklet_type, json_path, data in annotations:
            masklet = data["masklet"]
            ids = data.get("masklet_id")
            if not isinstance(ids, list):
                ids = list(range(len(masklet[0]) if masklet and isinstance(masklet[0], list) else 0))
            for k, masklet_id in enumerate(ids):
                region_id = f"{unit}/{masklet_type}/{masklet_id}"
                try:
                    region = self._region(region_id, masklet, k, num_frames, size)
                except (DamInputError, TypeError) as exc:  # TypeError: a ragged or non-list masklet
                    rejected["bad_mask"] += 1
                    self.log.warn("bad_mask", f"masklet {region_id!r} in {str(json_path)!r}: {exc}")
                    continue
                if region.area == 0:
                    rejected["empty_mask"] += 1
                    continue
                region.extra = {
                    "masklet_type": masklet_type,
                    **{f: v[k] for f, v in data.items() if f.startswith("masklet_") and isinstance(v, list) and len(v) == len(ids)},
                }
                regions.append(region)
        meta: dict[str, Any] = {f: v for f, v in first.items() if f.startswith("video_")}
        meta.update(fps=first.get("video_fps", SAV_FPS), num_frames=num_frames, stride=SAV_STRIDE)
        return WorkUnit(unit, self.name, "video", path, size, regions, rejected, meta)

    def _region(self, region_id: str, masklet: list, k: int, num_frames: int, size: tuple[int, int] | None) -> Region:
        frames = sav_masklet_to_frame_masks(masklet, k, num_frames, stride=SAV_STRIDE)
        frame_masks, area = {}, 0
        for frame, rle in frames.items():
            mask = load_mask(rle, size, allow_empty=True)
            frame_masks[frame] = mask_to_rle(mask)
            area = max(area, int(np.count_nonzero(mask)))
        return Region(region_id, None, area, frame_masks=frame_masks)


def _frame_size(data: dict) -> tuple[int, int] | None:
    """(H, W) from the JSON's video_height / video_width (floats in SA-V), else from the first RLE's size."""
    rle_sizes = (rle.get("size") for objects in data["masklet"] if isinstance(objects, list) for rle in objects if isinstance(rle, dict))
    candidates = itertools.chain([(data.get("video_height"), data.get("video_width"))], rle_sizes)
    for candidate in candidates:
        try:
            height, width = (int(v) for v in candidate)
        except (TypeError, ValueError):
            continue
        if height > 0 and width > 0:
            return height, width
    return None
