"""Box geometry of the FCLN: formats, the anchor grid, and the paper's offset parameterisation.

All boxes are in continuous pixel coordinates of the network input: x runs over [0, W] and a
pixel (i, j) covers [j, j + 1) x [i, i + 1). "xyxy" is (x0, y0, x1, y1); "cxcywh" is
(centre x, centre y, width, height). Offsets (tx, ty, tw, th) relate a box to a reference box
(an anchor or a proposal) as in the paper:

    x = xa + tx * wa,   y = ya + ty * ha,   w = wa * exp(tw),   h = ha * exp(th)
"""

from __future__ import annotations

import math

import torch

# exp(tw) is clamped so that an untrained head cannot produce inf boxes: no box grows more
# than 1000/16 times its reference in one step (the same guard torchvision's detectors use).
MAX_LOG_SCALE = math.log(1000.0 / 16.0)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) corner boxes -> (..., 4) centre/size boxes."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) centre/size boxes -> (..., 4) corner boxes."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def encode_boxes(boxes: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Offsets (tx, ty, tw, th) that move `references` onto `boxes`; both (N, 4) xyxy."""
    x, y, w, h = xyxy_to_cxcywh(boxes).unbind(-1)
    xa, ya, wa, ha = xyxy_to_cxcywh(references).unbind(-1)
    return torch.stack(((x - xa) / wa, (y - ya) / ha, torch.log(w / wa), torch.log(h / ha)), dim=-1)


def decode_boxes(offsets: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Boxes (N, 4) xyxy obtained by applying offsets (N, 4) to `references` (N, 4) xyxy."""
    tx, ty, tw, th = offsets.unbind(-1)
    xa, ya, wa, ha = xyxy_to_cxcywh(references).unbind(-1)
    centre_size = torch.stack(
        (
            xa + tx * wa,
            ya + ty * ha,
            wa * torch.exp(tw.clamp(max=MAX_LOG_SCALE)),
            ha * torch.exp(th.clamp(max=MAX_LOG_SCALE)),
        ),
        dim=-1,
    )
    return cxcywh_to_xyxy(centre_size)


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip (N, 4) xyxy boxes to the image [0, width] x [0, height]."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(
        (x0.clamp(0, width), y0.clamp(0, height), x1.clamp(0, width), y1.clamp(0, height)), dim=-1
    )


def boxes_inside(boxes: torch.Tensor, height: int, width: int, tolerance: float = 0.0) -> torch.Tensor:
    """(N,) bool: the box lies within the image, allowing `tolerance` pixels beyond each edge."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return (
        (x0 >= -tolerance) & (y0 >= -tolerance) & (x1 <= width + tolerance) & (y1 <= height + tolerance)
    )


def make_anchors(
    feature_height: int,
    feature_width: int,
    stride: int,
    sizes: torch.Tensor,
    offset: float,
) -> torch.Tensor:
    """All anchors of a feature map, (Hf * Wf * k, 4) xyxy, ordered (row, column, anchor).

    Anchor centres sit where the feature positions look, (j * stride + offset, i * stride +
    offset): `offset` is the backbone's receptive-field centre of cell 0 (FclnBackbone.
    feature_offset; stride / 2 for VGG-16, the centres of the image cells). `sizes` is (k, 2) of
    (width, height) in pixels. The order matches the localization head's output after
    `(Hf, Wf, k)` flattening.
    """
    device, dtype = sizes.device, sizes.dtype
    ys = torch.arange(feature_height, device=device, dtype=dtype) * stride + offset  # (Hf,)
    xs = torch.arange(feature_width, device=device, dtype=dtype) * stride + offset  # (Wf,)
    cy, cx = torch.meshgrid(ys, xs, indexing="ij")  # (Hf, Wf) each
    k = sizes.shape[0]
    centres = torch.stack((cx, cy), dim=-1)[:, :, None, :].expand(-1, -1, k, -1)  # (Hf, Wf, k, 2)
    wh = sizes[None, None].expand(feature_height, feature_width, -1, -1)  # (Hf, Wf, k, 2)
    return cxcywh_to_xyxy(torch.cat((centres, wh), dim=-1)).reshape(-1, 4)  # (Hf*Wf*k, 4)
