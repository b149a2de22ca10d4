"""Region proposers: an image in, its candidate regions out (boxes, scores and maybe masks).

- `FclnProposer`: the DenseCap FCLN's final boxes (localization layer, recognition network,
  final NMS), best first; their region codes ride along so an FCLN captioner or scorer reuses
  them instead of running the network again.
- `SamProposer`: segment-anything's `SamAutomaticMaskGenerator` (a grid of point prompts,
  filtered by predicted IoU and stability, NMS'd); each mask's tight box is its box, and regions
  are ranked by predicted IoU x stability score.
- `FixedProposer`: boxes (and masks) known in advance, e.g. ground-truth regions, by image key.

All share one call: `propose(images, max_regions, keys=None) -> list[Regions]`, images as uint8
(H, W, 3), and a `settings` dict: what makes two proposers' regions the same (the model's
identity and the options that change the regions), stored with the results so that a resumed
run or a query search never mixes regions of different proposers.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dam.densecap.regions import Regions, mask_to_box
from dam.errors import DamInputError
from dam.fingerprint import as_json_value, model_identity

if TYPE_CHECKING:
    from dam.fcln import FclnModel

logger = logging.getLogger(__name__)


class Proposer(Protocol):
    """Anything that proposes regions; `name` is written into the results."""

    name: str

    @property
    def settings(self) -> dict[str, Any]:
        """What makes this proposer's regions comparable with another's (JSON values)."""
        ...

    def propose(self, images: Sequence[np.ndarray], max_regions: int,
                keys: Sequence[str] | None = None) -> list[Regions]:
        """Regions of each image, best first, at most `max_regions` each; `keys` name the images
        (only proposers that look regions up by image need them)."""
        ...


def _check_max_regions(max_regions: int) -> None:
    if max_regions < 1:
        raise DamInputError(f"max_regions={max_regions} must be at least 1")


class FclnProposer:
    """Boxes from a DenseCap FCLN (see the module docstring); `model` is put in eval mode."""

    name = "fcln"

    def __init__(self, model: "FclnModel") -> None:
        from dam.fcln import FclnImageProcessor

        self.model = model.eval()
        self.processor = FclnImageProcessor.from_config(model.config)

    @property
    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": model_identity(self.model)}

    @torch.no_grad()
    def propose(self, images: Sequence[np.ndarray], max_regions: int,
                keys: Sequence[str] | None = None) -> list[Regions]:
        _check_max_regions(max_regions)
        if not images:
            return []
        parameter = next(self.model.parameters())
        batch = self.processor(list(images))
        pixels = batch.stacked()  # one backbone pass when the images share a size
        pixels = (pixels.to(parameter.device, parameter.dtype) if isinstance(pixels, torch.Tensor)
                  else [p.to(parameter.device, parameter.dtype) for p in pixels])
        output = self.model(pixels)
        proposals = []
        for index, (boxes, scores, codes) in enumerate(zip(output.boxes, output.scores, output.region_codes)):
            boxes = self.processor.boxes_to_original(boxes[:max_regions], batch, index)  # (R, 4)
            proposals.append(Regions(
                boxes.float().cpu().numpy(), scores[:max_regions].float().cpu().numpy(),
                fcln_codes=codes[:max_regions], fcln_model=self.model,
            ))
        return proposals


def _import_automatic_mask_generator() -> Any:
    try:
        from segment_anything import SamAutomaticMaskGenerator
    except ImportError as error:
        raise ImportError(
            "SAM proposals need the segment-anything package: pip install 'describe-anything-toolkit[sam]'"
        ) from error
    return SamAutomaticMaskGenerator


class SamProposer:
    """Masks from segment-anything's automatic mask generator (see the module docstring).

    `model` is a built segment-anything `Sam` (e.g. `SamPrompter.from_checkpoint(...).predictor.model`);
    the keyword arguments go to `SamAutomaticMaskGenerator` (its defaults suit ViT-H; tiny random
    models need the thresholds at 0).
    """

    name = "sam"

    def __init__(self, model: Any, *, points_per_side: int = 32, points_per_batch: int = 64,
                 pred_iou_thresh: float = 0.88, stability_score_thresh: float = 0.95,
                 box_nms_thresh: float = 0.7, **generator_kwargs: Any) -> None:
        generator = _import_automatic_mask_generator()
        if points_per_side < 1:
            raise DamInputError(f"points_per_side={points_per_side} must be at least 1 (SAM's default is 32)")
        self.model = model
        # points_per_batch only trades memory for speed, so it is not part of the settings.
        self.options = as_json_value({
            "points_per_side": points_per_side, "pred_iou_thresh": pred_iou_thresh,
            "stability_score_thresh": stability_score_thresh, "box_nms_thresh": box_nms_thresh, **generator_kwargs,
        })
        self.generator = generator(
            model, points_per_side=points_per_side, points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh, stability_score_thresh=stability_score_thresh,
            box_nms_thresh=box_nms_thresh, output_mode="binary_mask", **generator_kwargs,
        )

    @property
    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": model_identity(self.model), **self.options}

    def propose(self, images: Sequence[np.ndarray], max_regions: int,
                keys: Sequence[str] | None = None) -> list[Regions]:
        _check_max_regions(max_regions)
        # The generator takes one image at a time; its point prompts are batched inside.
        return [self._propose_one(image, max_regions) for image in images]

    def _propose_one(self, image: np.ndarray, max_regions: int) -> Regions:
        records = [r for r in self.generator.generate(image) if r["segmentation"].any()]
        records.sort(key=lambda r: -float(r["predicted_iou"]) * float(r["stability_score"]))
        records = records[:max_regions]
        masks = [np.ascontiguousarray(r["segmentation"], dtype=bool) for r in records]
        boxes = np.array([mask_to_box(mask) for mask in masks]).reshape(-1, 4)
        scores = np.array([float(r["predicted_iou"]) * float(r["stability_score"]) for r in records])
        if not records:
            logger.info("SAM found no region that passes its thresholds in a %dx%d image", *image.shape[:2])
        return Regions(boxes, scores, masks)


def _regions_fingerprint(regions: Mapping[str, Regions]) -> str:
    """A short hash of every image key and its boxes: other fixed regions, another fingerprint."""
    hasher = hashlib.sha256()
    for key in sorted(regions):
        hasher.update(key.encode() + b"\0" + np.ascontiguousarray(regions[key].boxes, dtype=np.float64).tobytes())
    return hasher.hexdigest()[:16]


class FixedProposer:
    """Regions known in advance (e.g. the ground truth), looked up by each image's key."""

    def __init__(self, regions: Mapping[str, Regions], name: str = "fixed") -> None:
        self.regions = dict(regions)
        self.name = name

    @property
    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "regions": _regions_fingerprint(self.regions)}

    def propose(self, images: Sequence[np.ndarray], max_regions: int,
                keys: Sequence[str] | None = None) -> list[Regions]:
        _check_max_regions(max_regions)
        if keys is None or len(keys) != len(images):
            raise DamInputError("FixedProposer needs one key per image to look its regions up")
        missing = [key for key in keys if key not in self.regions]
        if missing:
            raise DamInputError(f"no fixed regions for image {missing[0]!r}; give regions for every image")
        return [self.regions[key].head(max_regions) for key in keys]
