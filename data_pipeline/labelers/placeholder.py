"""The ``placeholder`` labeler: a fixed caption for every region, at no cost.

For dry runs of a config (are the sources, filters, detectors and output what you expect,
before a VLM server is up?) and for measuring the pipeline's own CPU cost (``dam-bench
speed-data``). The caption is ``caption`` with ``{category}`` replaced by the region's category
("object" without one), so rows stay distinguishable by class. With ``render_views`` the
labeler also renders and JPEG-encodes the views a VLM labeler would send (focal crop and full
image, or one view per frame of a video request) and throws them away: the CPU cost an
``openai`` labeler adds on top of the pipeline, without a server.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass, field

from dam.errors import DamInputError

from data_pipeline.labelers.base import LabelRequest, LabelResult, VideoLabelRequest, check_request, error_result
from data_pipeline.prompts import normalize_category
from data_pipeline.views import ViewConfig, encode_image, render_views

__all__ = ["PlaceholderLabelerConfig", "PlaceholderLabeler"]


@dataclass(kw_only=True)
class PlaceholderLabelerConfig:
    """``labeler:`` section with ``type: placeholder``."""

    caption: str = "A placeholder description of the {category}, written by no model at all."
    """The caption of every region; {category} becomes the region's category ("object" without one)."""
    render_views: bool = False
    """Render and encode the views a VLM labeler would send (to measure their CPU cost), then drop them."""
    views: ViewConfig = field(default_factory=ViewConfig)
    """The views rendered when render_views is on (data_pipeline.views)."""

    def __post_init__(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.caption) if name is not None}
        if fields - {"category"} or not self.caption.strip():
            raise DamInputError(f"labeler.caption must be non-empty text whose only field is {{category}}, got {self.caption!r}")


class PlaceholderLabeler:
    """Labels every region with the configured caption; see the module docstring."""

    def __init__(self, config: PlaceholderLabelerConfig | None = None) -> None:
        self.config = config or PlaceholderLabelerConfig()
        self.calls = 0

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        """One result per request, in order; a request with an unusable image or mask gets an error result."""
        self.calls += 1
        results = []
        for request in requests:
            problem = check_request(request)
            if problem is not None:
                results.append(error_result(problem))
                continue
            if self.config.render_views:
                self._render(request)
            category = normalize_category(request.category) or "object"
            results.append(LabelResult(self.config.caption.replace("{category}", category), None))
        return results

    def _render(self, request: LabelRequest) -> None:
        views = self.config.views
        if isinstance(request, VideoLabelRequest):
            for frame, mask in zip(request.frames, request.masks):
                encode_image(render_views(frame, mask, views).full, views.image_format, views.jpeg_quality)
            return
        rendered = render_views(request.image, request.mask, views)
        encode_image(rendered.crop, views.image_format, views.jpeg_quality)
        encode_image(rendered.full, views.image_format, views.jpeg_quality)
