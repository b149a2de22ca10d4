"""The FCLN's loss terms for one image: logistic losses on scores, smooth L1 on box offsets.

Box terms are summed over the four offsets and averaged over the positive boxes (Fast R-CNN's
normalisation); every term of an image without positives is a zero that still belongs to the
autograd graph, so a batch's total loss can always be backpropagated.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from dam.fcln.vocabulary import PAD_ID


@dataclass
class FclnLossParts:
    """The five loss terms, unweighted."""

    objectness: torch.Tensor
    anchor_box: torch.Tensor
    final_score: torch.Tensor
    final_box: torch.Tensor
    caption: torch.Tensor

    @staticmethod
    def mean(parts: list["FclnLossParts"]) -> "FclnLossParts":
        """Term-wise mean over images."""
        return FclnLossParts(
            **{f.name: torch.stack([getattr(p, f.name) for p in parts]).mean() for f in fields(FclnLossParts)}
        )


def graph_zero(tensor: torch.Tensor) -> torch.Tensor:
    """A scalar 0 connected to `tensor`'s graph (for terms with nothing to average)."""
    return tensor.sum() * 0.0


def logistic_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean binary logistic loss of logits (S,) against 0/1 labels (S,)."""
    if logits.numel() == 0:
        return graph_zero(logits)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def box_offset_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Smooth L1 (beta 1) of offsets (P, 4), summed per box, averaged over boxes."""
    if predicted.shape[0] == 0:
        return graph_zero(predicted)
    return F.smooth_l1_loss(predicted, target, beta=1.0, reduction="sum") / predicted.shape[0]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits (P, T, V) against targets (P, T), <pad> ignored, token mean."""
    if targets.numel() == 0 or not bool((targets != PAD_ID).any()):
        return graph_zero(logits)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=PAD_ID)
