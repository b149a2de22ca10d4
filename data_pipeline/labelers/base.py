"""The labeler interface of stage 1 and what every labeler shares.

A labeler turns regions (``LabelRequest``: image, mask, category, seed) into cleaned captions
(``LabelResult``). It never raises for one bad region: a region it could not label gets
``LabelResult(None, reason)`` (``transient=True`` when asking again later may succeed) and the
others go on. Errors that would hit every region (an
unreachable server, a model that cannot be loaded, a bad config) raise ``DamInputError``.

``label_in_rounds`` is the loop of the batched local labelers: generate for all pending
regions, clean, and ask again (next prompt variant, next sampling seed) the regions whose answer
was rejected for a reason a new attempt may fix, up to ``rejection_retries`` times.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

import numpy as np

from data_pipeline.cleaning import RETRYABLE_REASONS, CleaningConfig, clean_caption
from data_pipeline.views import ViewConfig

logger = logging.getLogger(__name__)

__all__ = [
    "LabelRequest",
    "VideoLabelRequest",
    "LabelResult",
    "Labeler",
    "Generated",
    "VlmLabelerConfig",
    "check_request",
    "error_result",
    "finish",
    "label_in_rounds",
    "split_on_oom",
]

_MAX_ERROR_CHARS = 200


@dataclass
class LabelRequest:
    """One region to label."""

    region_id: str
    image: np.ndarray  # (H, W, 3) uint8, the full image
    mask: np.ndarray  # (H, W) bool, the region
    category: str | None
    seed: int  # per-region seed: prompt-variant choice etc. depend only on it


@dataclass
class VideoLabelRequest(LabelRequest):
    """One masklet to label: ``frames`` (uint8 (H, W, 3)) and ``masks`` (bool (H, W)), one per sampled frame
    in time order. ``image`` and ``mask`` are the middle frame's, so image checks still apply
    (``check_request``) and a labeler without video support labels that frame."""

    frames: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def from_frames(
        cls, region_id: str, frames: Sequence[np.ndarray], masks: Sequence[np.ndarray], category: str | None, seed: int,
    ) -> "VideoLabelRequest":
        if not frames or len(frames) != len(masks):
            raise ValueError(f"region {region_id!r}: {len(frames)} frames and {len(masks)} masks; give one mask per frame (>= 1)")
        middle = len(frames) // 2
        return cls(region_id, frames[middle], masks[middle], category, seed, list(frames), list(masks))


@dataclass
class LabelResult:
    """A cleaned caption, or None and why."""

    caption: str | None
    reason: str | None  # why None: "error: <short>", "timeout", "refusal", "empty", "self_reference", "repetition"
    transient: bool = False
    """The failure may not happen again (a server that errored or timed out on every attempt): the
    stage leaves the region's shard unwritten so a rerun asks again. False for final answers
    (refusals, cleaning rejections) and for errors the same request would meet again (an empty
    mask, an HTTP 400 rejection, out of memory on a single region)."""


@runtime_checkable
class Labeler(Protocol):
    """Captions regions; one result per request, in order."""

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]: ...


@dataclass(frozen=True)
class Generated:
    """A labeler's raw answer to one prompt."""

    text: str
    truncated: bool  # generation stopped at the token limit


@dataclass(kw_only=True)
class VlmLabelerConfig:
    """Settings every labeler that prompts a general VLM (openai, transformers) shares."""

    views: ViewConfig = field(default_factory=ViewConfig)
    """How the region is drawn into the two images (data_pipeline.views)."""
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    """How answers are cleaned and rejected (data_pipeline.cleaning)."""
    prompts: list[str] | None = None
    """Prompt templates with {object}, {category}, {views}; null: the built-in variants."""
    rejection_retries: int = 1
    """Times a refused / empty / self-referencing answer is asked again with the next prompt variant."""


def error_result(detail: str, transient: bool = False) -> LabelResult:
    """``LabelResult(None, "error: <detail>", transient)`` with the detail on one short line."""
    text = " ".join(str(detail).split())
    if len(text) > _MAX_ERROR_CHARS:
        text = text[: _MAX_ERROR_CHARS - 3] + "..."
    return LabelResult(None, f"error: {text}", transient)


def check_request(request: LabelRequest) -> str | None:
    """Why ``request`` cannot be labeled (a short phrase), or None when it can."""
    image, mask = request.image, request.mask
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        shape = getattr(image, "shape", None)
        return f"image must be a (H, W, 3) uint8 array, got {type(image).__name__} {getattr(image, 'dtype', '')} {shape}"
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape[:2]:
        return f"mask shape {getattr(mask, 'shape', None)} does not match the image's {image.shape[:2]}"
    if not mask.any():
        return "empty mask"
    return None


def finish(generated: Generated, request: LabelRequest, cleaning: CleaningConfig) -> LabelResult:
    """The cleaned result of one raw answer."""
    cleaned = clean_caption(generated.text, cleaning, category=request.category, truncated=generated.truncated)
    if cleaned.caption is None:
        logger.debug("region %s: answer rejected (%s): %.120r", request.region_id, cleaned.reason, generated.text)
    return LabelResult(cleaned.caption, cleaned.reason)


def label_in_rounds(
    requests: Sequence[LabelRequest],
    generate: Callable[[list[tuple[LabelRequest, int]]], list[Generated | LabelResult]],
    *,
    cleaning: CleaningConfig,
    rejection_retries: int,
) -> list[LabelResult]:
    """Label ``requests`` with ``generate`` ((request, attempt) pairs -> answers or failures),
    asking again the rejected ones up to ``rejection_retries`` times."""
    results: list[LabelResult | None] = [None] * len(requests)
    pending: list[int] = []
    for index, request in enumerate(requests):
        problem = check_request(request)
        if problem is None:
            pending.append(index)
        else:
            logger.warning("region %s cannot be labeled: %s", request.region_id, problem)
            results[index] = error_result(problem)
    for attempt in range(rejection_retries + 1):
        if not pending:
            break
        outputs = generate([(requests[index], attempt) for index in pending])
        again: list[int] = []
        for index, output in zip(pending, outputs, strict=True):
            result = output if isinstance(output, LabelResult) else finish(output, requests[index], cleaning)
            results[index] = result
            if not isinstance(output, LabelResult) and result.caption is None and result.reason in RETRYABLE_REASONS:
                again.append(index)
        pending = again
    return results  # type: ignore[return-value]


T = TypeVar("T")


def split_on_oom(items: list[T], run: Callable[[list[T]], list[Generated | LabelResult]]) -> list[Generated | LabelResult]:
    """``run(items)``, halving the batch on a GPU out-of-memory error (one long prompt or a large
    image should cost its batch a split, not the whole job); a single item that still does not
    fit becomes ``error: out of memory``."""
    import torch

    oom_error = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    try:
        return run(items)
    except oom_error:
        pass  # handled below, outside the except block: its traceback pins the batch's GPU tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if len(items) == 1:
        return [error_result("out of memory")]
    half = len(items) // 2
    logger.warning("out of memory on a batch of %d; splitting it", len(items))
    return split_on_oom(items[:half], run) + split_on_oom(items[half:], run)


class OwnsLabeler:
    """Mixin of the stage processors: the labeler is built by ``_labeler_factory`` on first use (a
    rerun whose shards are all complete loads no model and opens no connection) and closed by close()."""

    _labeler_factory: Callable[[], Labeler]
    _labeler: Labeler | None = None

    @property
    def labeler(self) -> Labeler:
        if self._labeler is None:
            self._labeler = self._labeler_factory()
        return self._labeler

    def close(self) -> None:
        """Close the labeler this processor built (HTTP connections, event loop), if it has close()."""
        close = getattr(self._labeler, "close", None)
        if callable(close):
            close()
        self._labeler = None
