"""The ``dam`` labeler: a DAM checkpoint labels regions itself (self-training, as in the DAM paper).

Unlike a general VLM, a DAM takes the mask as input, so there are no drawn views: image and
mask go straight to :meth:`dam.describe.DescribeAnything.describe_batch` (focal prompt, batching
and padding as in inference). The query is the checkpoint's own unless ``query`` is set; a
``{category}`` in it becomes the region's category name ("object" without one), for DAMs
fine-tuned with category hints.

Greedy by default; asking a rejected region again only helps when sampling
(``temperature > 0``), so ``rejection_retries`` defaults to 0 here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from dam.errors import DamInputError

from data_pipeline.cleaning import CleaningConfig
from data_pipeline.labelers.base import (
    Generated, LabelRequest, LabelResult, VideoLabelRequest, label_in_rounds, split_on_oom,
)
from data_pipeline.devices import resolve_device
from data_pipeline.labelers.transformers_vlm import batch_seed, resolve_dtype
from data_pipeline.prompts import normalize_category

logger = logging.getLogger(__name__)

__all__ = ["DamLabelerConfig", "DamLabeler"]

_SENTENCE_END = ".!?\"”’)"


@dataclass(kw_only=True)
class DamLabelerConfig:
    """``labeler:`` section with ``type: dam``."""

    path: str
    """Folder of a DAM checkpoint (save_pretrained, or a released NVlabs layout)."""
    device: str | None = None
    """torch device; null: this process's GPU (cuda:LOCAL_RANK, data_pipeline.devices) if CUDA is available, else cpu."""
    dtype: str | None = None
    """float32, bfloat16 or float16; null: as stored."""
    batch_size: int = 32
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0: greedy."""
    top_p: float | None = None
    query: str | None = None
    """The question asked; null: the checkpoint's default. {category} is replaced by the category."""
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    rejection_retries: int = 0
    """Times a rejected answer is sampled again (only useful with temperature > 0)."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise DamInputError(f"labeler.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or self.rejection_retries < 0:
            raise DamInputError("labeler.temperature and labeler.rejection_retries must be >= 0")
        if self.dtype is not None:
            resolve_dtype(self.dtype)


class DamLabeler:
    """Labels regions with a DAM checkpoint; see the module docstring."""

    def __init__(self, config: DamLabelerConfig) -> None:
        from dam.describe import DescribeAnything

        self.config = config
        self.describer = DescribeAnything.from_pretrained(
            config.path, device=resolve_device(config.device, "labeler.device"), dtype=config.dtype
        )
        if config.rejection_retries and config.temperature == 0:
            logger.warning("dam labeler: rejection_retries without sampling (temperature 0) repeats the same answer")
        logger.info("dam labeler: %s on %s", config.path, self.describer.device)

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        """One result per request, in order."""
        return label_in_rounds(
            list(requests), self._generate_all, cleaning=self.config.cleaning,
            rejection_retries=self.config.rejection_retries,
        )

    def query_for(self, request: LabelRequest) -> str | None:
        if self.config.query is None:
            return None
        return self.config.query.replace("{category}", normalize_category(request.category) or "object")

    def region_input(self, request: LabelRequest) -> Any:
        """What ``describe_batch`` gets for one request: (image, mask, query); a video request's
        frames and masks as a video region (the DAM samples its ``num_video_frames`` of them)."""
        if isinstance(request, VideoLabelRequest):
            return {"video": request.frames, "masks": request.masks, "query": self.query_for(request)}
        return (request.image, request.mask, self.query_for(request))

    def _generate_all(self, items: list[tuple[LabelRequest, int]]) -> list[Generated | LabelResult]:
        outputs: list[Generated | LabelResult] = []
        size = self.config.batch_size
        for start in range(0, len(items), size):
            outputs.extend(split_on_oom(items[start : start + size], self._generate_batch))
        return outputs

    def _generate_batch(self, items: list[tuple[LabelRequest, int]]) -> list[Generated | LabelResult]:
        config = self.config
        kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": config.temperature > 0}
        if config.temperature > 0:
            kwargs["temperature"] = config.temperature
            if config.top_p is not None:
                kwargs["top_p"] = config.top_p
            torch.manual_seed(batch_seed(items))
        regions = [self.region_input(request) for request, _ in items]
        with torch.inference_mode():
            texts = self.describer.describe_batch(regions, batch_size=len(regions), **kwargs)
        tokenizer = self.describer.tokenizer
        results: list[Generated | LabelResult] = []
        for text in texts:
            # describe_batch returns text only; an unfinished last sentence as long as the token
            # limit is what a cut-off generation looks like.
            truncated = bool(text) and text[-1] not in _SENTENCE_END and (
                len(tokenizer.encode(text, add_special_tokens=False)) >= config.max_new_tokens - 1
            )
            results.append(Generated(text, truncated))
        return results
