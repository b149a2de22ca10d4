"""The fully convolutional localization layer: anchor scores/offsets, training samples, proposals.

Per feature position a 3x3 conv (256) + ReLU + 1x1 conv predicts, for each of the k anchors,
one objectness logit and four box offsets. At training time B boxes are sampled against the
ground truth (`sample_anchors`); at test time boxes are score-sorted, clipped, NMS'd and cut to
the best `test_num_proposals` (`select_proposals`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.ops import box_iou, nms

from dam.fcln.boxes import clip_boxes, decode_boxes, make_anchors

logger = logging.getLogger(__name__)


@dataclass
class LocalizationOutput:
    """Everything the head predicts for one image, flattened in (row, column, anchor) order."""

    anchors: torch.Tensor  # (N, 4) xyxy input pixels
    scores: torch.Tensor  # (N,) objectness logits
    offsets: torch.Tensor  # (N, 4) (tx, ty, tw, th) relative to the anchors

    def boxes(self) -> torch.Tensor:
        """(N, 4) xyxy boxes the offsets make of the anchors."""
        return decode_boxes(self.offsets, self.anchors)


class LocalizationHead(nn.Module):
    """3x3 conv + ReLU + 1x1 conv to 5k channels (per anchor: 1 score, 4 offsets)."""

    def __init__(self, in_channels: int, hidden_channels: int, anchor_sizes: list[list[float]], stride: int,
                 feature_offset: float) -> None:
        super().__init__()
        self.num_anchors = len(anchor_sizes)
        self.stride = stride
        self.feature_offset = feature_offset  # anchors centre on the cells' receptive fields (make_anchors)
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.score = nn.Conv2d(hidden_channels, self.num_anchors, 1)
        self.offset = nn.Conv2d(hidden_channels, 4 * self.num_anchors, 1)
        # Anchor sizes belong to the config, not the state: a plain list stays out of checkpoints
        # and, unlike a tensor attribute, survives models built on the meta device.
        self.anchor_sizes = [(float(w), float(h)) for w, h in anchor_sizes]

    def reset_parameters(self) -> None:
        # Small offsets at the start keep the first proposals at the anchors, as Faster R-CNN.
        nn.init.normal_(self.conv.weight, std=0.01)
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.normal_(self.offset.weight, std=0.001)
        for conv in (self.conv, self.score, self.offset):
            nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> list[LocalizationOutput]:
        """Features (B, C, Hf, Wf) -> one LocalizationOutput per image."""
        hidden = torch.relu(self.conv(features))  # (B, 256, Hf, Wf)
        batch, _, height, width = hidden.shape
        k = self.num_anchors
        scores = self.score(hidden).permute(0, 2, 3, 1).reshape(batch, -1)  # (B, Hf*Wf*k)
        offsets = self.offset(hidden).view(batch, k, 4, height, width)
        offsets = offsets.permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)  # (B, Hf*Wf*k, 4)
        sizes = torch.tensor(self.anchor_sizes, device=features.device, dtype=offsets.dtype)  # (k, 2)
        anchors = make_anchors(height, width, self.stride, sizes, self.feature_offset)  # (Hf*Wf*k, 4)
        return [LocalizationOutput(anchors, scores[i], offsets[i]) for i in range(batch)]


@dataclass
class AnchorSample:
    """The B boxes drawn for one training image."""

    positive: torch.Tensor  # (P,) anchor indices
    negative: torch.Tensor  # (Q,) anchor indices, P + Q <= B
    matched_gt: torch.Tensor  # (P,) index of each positive's ground-truth box (and caption)


def _random_subset(indices: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    if indices.numel() <= count:
        return indices
    order = torch.randperm(indices.numel(), generator=generator, device="cpu").to(indices.device)
    return indices[order[:count]]


def sample_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    batch_size: int = 256,
    positive_fraction: float = 0.5,
    positive_iou: float = 0.7,
    negative_iou: float = 0.3,
    valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> AnchorSample:
    """Draw the training boxes of one image, the paper's rules.

    Positives: anchors with IoU >= `positive_iou` to some ground-truth box, and for each ground
    truth its best-overlapping anchor whatever the IoU (so every caption gets trained). At most
    `batch_size * positive_fraction` positives; the best anchors of the ground truths go first,
    the rest are drawn at random. Negatives: IoU < `negative_iou` to every ground truth, drawn
    at random to fill the batch to `batch_size`. Anchors with `valid` False take no part.
    A positive's ground truth is the one it overlaps most, or the one it is the best anchor of.
    """
    device = anchors.device
    num_anchors = anchors.shape[0]
    valid = torch.ones(num_anchors, dtype=torch.bool, device=device) if valid is None else valid
    max_positives = int(batch_size * positive_fraction)
    if gt_boxes.shape[0] == 0:
        negative = _random_subset(valid.nonzero().flatten(), batch_size, generator)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return AnchorSample(empty, negative, empty)

    iou = box_iou(anchors, gt_boxes)  # (N, G)
    iou = iou.masked_fill(~valid[:, None], -1.0)
    best_iou, matched = iou.max(dim=1)  # (N,), (N,)
    is_positive = best_iou >= positive_iou

    # The best anchor of each ground truth, kept even below the positive threshold; a ground
    # truth that touches no valid anchor at all (IoU 0) has nothing to learn from and is skipped.
    gt_best_iou, gt_best_anchor = iou.max(dim=0)  # (G,), (G,)
    reachable = gt_best_iou > 0
    forced_anchor = gt_best_anchor[reachable]
    matched = matched.clone()
    matched[forced_anchor] = reachable.nonzero().flatten()
    is_forced = torch.zeros(num_anchors, dtype=torch.bool, device=device)
    is_forced[forced_anchor] = True
    is_positive |= is_forced

    forced = _random_subset(is_forced.nonzero().flatten(), max_positives, generator)
    others = (is_positive & ~is_forced).nonzero().flatten()
    positive = torch.cat((forced, _random_subset(others, max_positives - forced.numel(), generator)))

    is_negative = valid & (best_iou < negative_iou) & ~is_positive
    negative = _random_subset(is_negative.nonzero().flatten(), batch_size - positive.numel(), generator)
    return AnchorSample(positive, negative, matched[positive])


def select_proposals(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    height: int,
    width: int,
    nms_iou: float,
    max_proposals: int,
    pre_nms_top_n: int | None = None,
) -> torch.Tensor:
    """Indices of the test-time proposals: clip, drop empty boxes, NMS, best `max_proposals`.

    `boxes` (N, 4) xyxy and `scores` (N,) come from one image; the returned indices (R,) are
    sorted by decreasing score, R <= max_proposals. Callers clip `boxes` themselves with the
    same `clip_boxes` before using the selection.
    """
    clipped = clip_boxes(boxes, height, width)
    keep = ((clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])).nonzero().flatten()
    if pre_nms_top_n is not None and keep.numel() > pre_nms_top_n:
        keep = keep[scores[keep].topk(pre_nms_top_n).indices]
    survivors = nms(clipped[keep].float(), scores[keep].float(), nms_iou)  # sorted by score
    return keep[survivors[:max_proposals]]
