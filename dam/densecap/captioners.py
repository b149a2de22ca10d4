"""Region captioners: images and their proposed regions in, one caption per region out.

- `FclnCaptioner`: the FCLN's LSTM, greedy, from each region's code. Codes that came with FCLN
  proposals of the same model are reused; other boxes (SAM's, ground truth) are encoded by
  running the FCLN's backbone, bilinear sampler and recognition network on them.
- `DamCaptioner`: a DescribeAnything model, batched over every region of a group of images.
  DAM needs a mask per region: the proposer's mask when it has one (SAM); else SAM on the box
  when a `SamPrompter` is given; else the box itself as the mask (`box_to_mask`: the box's
  rectangle, so DAM describes everything inside the box, background corners included). Which
  of the three was used is reported as `mask_source` ("proposer", "sam" or "box"). SAM's masks
  of the boxes are attached to the regions (`attach_masks`), so that the results hold (as RLE)
  and draw the masks DAM described.

Every captioner has a `settings` dict (the model's identity and the options that change the
captions), stored with the results so that a resumed run never mixes captions of two models.

`region_masks` and `fcln_region_codes` are shared with the query scorers (dam.densecap.scoring),
so a region is scored exactly as it is captioned.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dam.densecap.regions import Regions, box_to_mask, clip_box
from dam.errors import DamInputError
from dam.fingerprint import as_json_value, model_identity

if TYPE_CHECKING:
    from dam.describe import DescribeAnything
    from dam.fcln import FclnModel
    from dam.sam import SamPrompter

logger = logging.getLogger(__name__)


class Captioner(Protocol):
    """Anything that captions regions; `name` is written into the results."""

    name: str

    @property
    def settings(self) -> dict[str, Any]:
        """What makes this captioner's captions comparable with another's (JSON values)."""
        ...

    def caption(self, images: Sequence[np.ndarray], regions: Sequence[Regions]) -> list[list[str]]:
        """One caption per region of each image, in the regions' order."""
        ...

    def mask_source(self, regions: Regions) -> str | None:
        """Where the masks this captioner reads come from (None when it reads boxes only)."""
        ...

    def attach_masks(self, image: np.ndarray, regions: Regions) -> Regions:
        """`regions` with the masks this captioner derives itself (SAM's masks of boxes) attached,
        so that they are stored and drawn; `regions` as they are when it derives none."""
        ...


# ---- FCLN ----------------------------------------------------------------------------------


@torch.no_grad()
def fcln_region_codes(model: "FclnModel", images: Sequence[np.ndarray], regions: Sequence[Regions]) -> list[torch.Tensor]:
    """(R_i, D) FCLN region codes of each image's boxes: the proposals' own codes when this model
    proposed them, else backbone -> bilinear sampling at the boxes -> recognition network (the
    codes the FCLN's LSTM captions from; the box refinement is not applied)."""
    from dam.fcln import FclnImageProcessor, bilinear_sample_boxes

    codes: list[torch.Tensor | None] = [
        r.fcln_codes if r.fcln_codes is not None and r.fcln_model is model else None for r in regions
    ]
    todo = [i for i, c in enumerate(codes) if c is None and len(regions[i])]
    parameter = next(model.parameters())
    for index in range(len(regions)):
        if codes[index] is None and not len(regions[index]):
            codes[index] = torch.zeros(0, model.config.recognition_hidden_size, device=parameter.device)
    if todo:
        processor = FclnImageProcessor.from_config(model.config)
        batch = processor([images[i] for i in todo])
        for position, index in enumerate(todo):
            pixels = batch.pixel_values[position][None].to(parameter.device, parameter.dtype)  # (1, 3, h, w)
            features = model.backbone(pixels)[0]  # (C, Hf, Wf)
            boxes = torch.as_tensor(regions[index].boxes, dtype=torch.float32, device=parameter.device)
            boxes = processor.boxes_to_input(boxes, batch, position).to(parameter.dtype)  # (R, 4) input pixels
            sampled = bilinear_sample_boxes(features, boxes, tuple(model.config.grid_size), model.backbone.stride,
                                            model.backbone.feature_offset)
            codes[index] = model.recognition(sampled)[0]  # (R, D)
    return codes  # type: ignore[return-value]


class FclnCaptioner:
    """Greedy LSTM captions of an FCLN (see the module docstring)."""

    name = "fcln"

    def __init__(self, model: "FclnModel") -> None:
        self.model = model.eval()

    @property
    def settings(self) -> dict[str, Any]:
        return {"name": self.name, "model": model_identity(self.model)}

    def mask_source(self, regions: Regions) -> str | None:
        return None

    def attach_masks(self, image: np.ndarray, regions: Regions) -> Regions:
        return regions

    @torch.no_grad()
    def caption(self, images: Sequence[np.ndarray], regions: Sequence[Regions]) -> list[list[str]]:
        captions = []
        for codes in fcln_region_codes(self.model, images, regions):
            if codes.shape[0] == 0:
                captions.append([])
                continue
            token_ids = self.model.language_model.generate(codes, self.model.config.max_caption_length)
            captions.append(self.model.vocabulary.decode_batch(token_ids))
        return captions


# ---- DAM -----------------------------------------------------------------------------------


def region_masks(image: np.ndarray, regions: Regions, sam: "SamPrompter | None" = None) -> tuple[list[np.ndarray], str]:
    """The mask DAM reads for each region and where the masks came from (see the module docstring)."""
    height, width = image.shape[:2]
    if regions.masks is not None:
        return list(regions.masks), "proposer"
    masks = []
    for box in regions.boxes:
        fallback = box_to_mask(box, height, width)
        if sam is None:
            masks.append(fallback)
            continue
        clipped = clip_box(box, height, width)
        if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
            masks.append(fallback)  # SAM rejects empty boxes; the pixel the box sits on stands in
            continue
        mask = sam.mask_from_box(image, clipped)
        # An empty SAM mask would make DAM raise; the box is the honest stand-in.
        masks.append(mask if mask.any() else fallback)
    return masks, "box" if sam is None else "sam"


class DamCaptioner:
    """Captions from a DescribeAnything model (see the module docstring).

    `batch_size` regions are described together (`describe_batch`); `generate_kwargs` go to
    generation (e.g. max_new_tokens).
    """

    name = "dam"

    def __init__(self, describer: "DescribeAnything", sam: "SamPrompter | None" = None, batch_size: int = 32,
                 query: str | None = None, **generate_kwargs: Any) -> None:
        if batch_size < 1:
            raise DamInputError(f"batch_size={batch_size} must be at least 1")
        self.describer = describer
        self.sam = sam
        self.batch_size = batch_size
        self.query = query
        self.generate_kwargs = generate_kwargs

    @property
    def settings(self) -> dict[str, Any]:
        # batch_size only trades memory for speed, so it is not part of the settings.
        return {
            "name": self.name, "model": model_identity(self.describer.model), "query": self.query,
            "generate": as_json_value(self.generate_kwargs),
            "box_masks": None if self.sam is None else model_identity(self.sam.predictor.model),
        }

    def mask_source(self, regions: Regions) -> str | None:
        if regions.masks is not None:
            return "proposer"
        return "box" if self.sam is None else "sam"

    def attach_masks(self, image: np.ndarray, regions: Regions) -> Regions:
        # Box masks are not attached: the box already says what they hold.
        if regions.masks is not None or self.sam is None:
            return regions
        return dataclasses.replace(regions, masks=region_masks(image, regions, self.sam)[0])

    def caption(self, images: Sequence[np.ndarray], regions: Sequence[Regions]) -> list[list[str]]:
        items = []
        for image, image_regions in zip(images, regions):
            masks, _ = region_masks(image, image_regions, self.sam)
            items.extend((image, mask) for mask in masks)
        if not items:
            return [[] for _ in regions]
        # Every region of the group in one call: describe_batch sorts and batches them itself.
        texts = self.describer.describe_batch(items, batch_size=self.batch_size, query=self.query,
                                              **self.generate_kwargs)
        captions, start = [], 0
        for image_regions in regions:
            captions.append(texts[start : start + len(image_regions)])
            start += len(image_regions)
        return captions
