"""Bilinear region sampling: a fixed Y x X grid of conv features per box, via grid_sample.

This replaces RoI pooling, as the paper does, so the region features are differentiable with
respect to the box coordinates as well as the features: the localization layer's boxes learn
from the recognition and caption losses.

Coordinates: feature cell j looks at input position stride * j + offset, the centre of its
receptive field (FclnBackbone.feature_offset: stride / 2 for VGG-16, 0.5 for ResNet-50 and the
tiny backbone), so input x is feature position (x - offset) / stride. With
`align_corners=False`, grid_sample reads cell j at (2j + 1) / Wf - 1, so x maps to
2 * (x - offset + stride / 2) / (stride * Wf) - 1. Each box is split into Y x X equal bins and
each bin is read at its centre (one bilinear sample per bin, as RoIAlign with a single sample).
Points beyond the feature map read zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def box_sampling_grid(boxes: torch.Tensor, grid_size: tuple[int, int], stride: int,
                      feature_height: int, feature_width: int, offset: float) -> torch.Tensor:
    """grid_sample coordinates (R, Y, X, 2) of the bin centres of boxes (R, 4) xyxy pixels, for
    features whose cell j looks at input position stride * j + `offset`."""
    grid_y, grid_x = grid_size
    steps_y = (torch.arange(grid_y, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_y  # (Y,)
    steps_x = (torch.arange(grid_x, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid_x  # (X,)
    x0, y0, x1, y1 = boxes.unbind(-1)  # (R,) each
    xs = x0[:, None] + steps_x[None] * (x1 - x0)[:, None]  # (R, X) pixels
    ys = y0[:, None] + steps_y[None] * (y1 - y0)[:, None]  # (R, Y) pixels
    shift = stride / 2 - offset  # 0 for VGG-16, whose cells look at their own centres
    u = (xs + shift) * (2.0 / (stride * feature_width)) - 1.0  # (R, X) normalised
    v = (ys + shift) * (2.0 / (stride * feature_height)) - 1.0  # (R, Y) normalised
    num_boxes = boxes.shape[0]
    return torch.stack(
        (u[:, None, :].expand(num_boxes, grid_y, grid_x), v[:, :, None].expand(num_boxes, grid_y, grid_x)),
        dim=-1,
    )  # (R, Y, X, 2)


def bilinear_sample_boxes(features: torch.Tensor, boxes: torch.Tensor, grid_size: tuple[int, int],
                          stride: int, offset: float) -> torch.Tensor:
    """Region features (R, C, Y, X) of boxes (R, 4) xyxy in input pixels from features (C, Hf, Wf).

    `offset` is the backbone's `feature_offset`: the input pixel that feature cell 0 is centred on
    (it differs between backbones, so it has no default).
    All boxes of an image are read in one grid_sample call: the R grids are stacked along the
    output height, so the feature map is never copied per box.
    """
    channels, feature_height, feature_width = features.shape
    grid_y, grid_x = grid_size
    num_boxes = boxes.shape[0]
    grid = box_sampling_grid(boxes.to(features.dtype), grid_size, stride, feature_height, feature_width, offset)
    stacked = grid.reshape(1, num_boxes * grid_y, grid_x, 2)  # (1, R*Y, X, 2)
    sampled = F.grid_sample(features[None], stacked, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.view(channels, num_boxes, grid_y, grid_x).permute(1, 0, 2, 3)  # (R, C, Y, X)
