"""Images in, network input out, and boxes back: the FCLN's image processor.

As in the paper, every image is resized so its longer side is `longer_side` pixels (720) and
normalised with the ImageNet mean and std. The per-image scale factors are kept, so boxes can go
into the network's coordinates (training targets) and back to the original pixels (detections).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dam.errors import DamInputError
from dam.fcln.configuration_fcln import IMAGENET_MEAN, IMAGENET_STD, FclnConfig
from dam.images import load_image


@dataclass
class FclnImageBatch:
    """Preprocessed images and what is needed to map boxes back to the originals."""

    pixel_values: list[torch.Tensor]  # each (3, h, w), normalised
    original_sizes: list[tuple[int, int]]  # (H, W) of each input image
    scales: list[tuple[float, float]]  # (sx, sy): resized / original, per axis

    def stacked(self) -> torch.Tensor | list[torch.Tensor]:
        """One (B, 3, h, w) tensor when all images share a size, else the list as is."""
        if len({tuple(p.shape) for p in self.pixel_values}) == 1:
            return torch.stack(self.pixel_values)
        return self.pixel_values


class FclnImageProcessor:
    """Resizes (longer side = `longer_side`) and normalises images; maps boxes both ways."""

    def __init__(self, longer_side: int = 720, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD) -> None:
        if longer_side < 1:
            raise DamInputError(f"longer_side={longer_side} must be a positive number of pixels, e.g. 720")
        self.longer_side = longer_side
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    @classmethod
    def from_config(cls, config: FclnConfig) -> "FclnImageProcessor":
        return cls(config.image_longer_side, config.image_mean, config.image_std)

    def __call__(self, images: Any | Sequence[Any]) -> FclnImageBatch:
        """Preprocess one image or a list (paths, PIL images, uint8 arrays (H, W, 3), tensors)."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise DamInputError("no images given to the FCLN image processor; pass at least one")
        pixel_values, sizes, scales = [], [], []
        for image in images:
            array = load_image(image)  # (H, W, 3) uint8
            height, width = array.shape[:2]
            factor = self.longer_side / max(height, width)
            new_height, new_width = max(1, round(height * factor)), max(1, round(width * factor))
            tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
            if (new_height, new_width) != (height, width):
                tensor = F.interpolate(tensor[None], size=(new_height, new_width), mode="bilinear",
                                       align_corners=False, antialias=True)[0].clamp(0, 1)  # (3, h, w)
            pixel_values.append((tensor - self.mean) / self.std)
            sizes.append((height, width))
            scales.append((new_width / width, new_height / height))
        return FclnImageBatch(pixel_values, sizes, scales)

    @staticmethod
    def boxes_to_input(boxes: torch.Tensor, batch: FclnImageBatch, index: int) -> torch.Tensor:
        """(N, 4) xyxy boxes in original pixels of image `index` -> network-input pixels."""
        sx, sy = batch.scales[index]
        return boxes * boxes.new_tensor([sx, sy, sx, sy])

    @staticmethod
    def boxes_to_original(boxes: torch.Tensor, batch: FclnImageBatch, index: int) -> torch.Tensor:
        """(N, 4) xyxy boxes in network-input pixels of image `index` -> original pixels, clipped."""
        sx, sy = batch.scales[index]
        height, width = batch.original_sizes[index]
        scaled = boxes / boxes.new_tensor([sx, sy, sx, sy])
        limits = boxes.new_tensor([width, height, width, height])
        return torch.minimum(scaled.clamp(min=0), limits)
