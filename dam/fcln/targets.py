"""Checking and normalising the FCLN's training targets.

A target is one mapping per image: "boxes", (G, 4) xyxy in network-input pixels, and
"captions", either G strings (encoded with the model's vocabulary) or a (G, L) tensor of word
ids padded with <pad> (no <start>; an <end> may close a caption early).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dam.errors import DamInputError
from dam.fcln.vocabulary import START_ID, FclnVocabulary


@dataclass
class ImageTarget:
    boxes: torch.Tensor  # (G, 4) float xyxy
    captions: torch.Tensor  # (G, L) long word ids, right-padded


def prepare_targets(targets: Sequence[Mapping[str, Any]], num_images: int, vocabulary: FclnVocabulary,
                    max_words: int, device: torch.device, dtype: torch.dtype) -> list[ImageTarget]:
    """Validated targets on `device`; errors name the image and the field at fault."""
    if isinstance(targets, Mapping) or len(targets) != num_images:
        given = "a single mapping" if isinstance(targets, Mapping) else f"{len(targets)} targets"
        raise DamInputError(f"targets: got {given} for {num_images} images; pass one dict per image")
    prepared = []
    for index, target in enumerate(targets):
        if not isinstance(target, Mapping) or "boxes" not in target or "captions" not in target:
            raise DamInputError(f"targets[{index}] must be a dict with 'boxes' (G, 4) and 'captions'")
        boxes = torch.as_tensor(target["boxes"], dtype=dtype, device=device)
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)  # an image without regions trains on negatives only
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise DamInputError(f"targets[{index}]['boxes'] has shape {tuple(boxes.shape)}; expected (G, 4) xyxy")
        if bool(((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any()):
            raise DamInputError(
                f"targets[{index}]['boxes'] holds an empty box (x1 <= x0 or y1 <= y0); boxes are xyxy in pixels"
            )
        captions = target["captions"]
        if isinstance(captions, (list, tuple)) and all(isinstance(c, str) for c in captions):
            captions = vocabulary.encode_batch(captions, max_words).to(device)
        else:
            captions = torch.as_tensor(captions, device=device)
            if captions.ndim != 2 or captions.is_floating_point():
                raise DamInputError(
                    f"targets[{index}]['captions'] must be a list of strings or a (G, L) integer tensor of word ids"
                )
            captions = captions.long()
            if captions.numel() and (int(captions.min()) < 0 or int(captions.max()) >= len(vocabulary)):
                raise DamInputError(
                    f"targets[{index}]['captions'] holds ids outside the vocabulary [0, {len(vocabulary)})"
                )
            if bool((captions == START_ID).any()):
                raise DamInputError(
                    f"targets[{index}]['captions'] contains <start>; give the words only, "
                    "the model adds <start>/<end>"
                )
        if captions.shape[0] != boxes.shape[0]:
            raise DamInputError(
                f"targets[{index}] has {boxes.shape[0]} boxes but {captions.shape[0]} captions; "
                "give one caption per box"
            )
        prepared.append(ImageTarget(boxes, captions))
    return prepared
