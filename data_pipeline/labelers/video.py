"""Labelers for masklets (``VideoLabelRequest``: the sampled frames and their masks), for the video stage.

    labeler = build_video_labeler({"type": "openai", "base_url": "http://localhost:8000/v1"}, num_frames=8)
    results = labeler.label([VideoLabelRequest.from_frames("sav/v1/manual/0", frames, masks, None, seed=7)])

- ``openai``: one chat request per masklet with ``num_frames`` image parts, one per frame in
  time order: the whole frame with the object highlighted (``frame_view: full``, the default,
  since a video object is often small and its surroundings say what it does) or its focal crop
  (``frame_view: crop``), then the text prompt (its own phrasings, asking for appearance and
  motion). Serve the VLM with room for them, e.g. ``vllm serve ... --limit-mm-per-prompt
  '{"image": 8}'``. Retries, cleaning and re-asking are the image labeler's (:mod:`.openai_api`).
- ``dam``: a video-capable DAM (``num_video_frames`` equal to ``num_frames``): the frames and
  masks go to ``describe_batch`` as video regions, each frame with its own focal prompt.
- ``placeholder``: a fixed caption (dry runs, timing).

The ``transformers`` labeler prompts with two images per region and has no video path.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

from dam.configio import ConfigError, from_dict

from data_pipeline.labelers.base import LabelRequest, Labeler, VideoLabelRequest
from data_pipeline.labelers.openai_api import OpenAILabeler, OpenAILabelerConfig
from data_pipeline.prompts import check_templates
from data_pipeline.views import _COLOR_NAMES, _style_phrase, render_views, to_data_url  # one definition of the wording

logger = logging.getLogger(__name__)

__all__ = ["VIDEO_PROMPT_VARIANTS", "OpenAIVideoLabelerConfig", "OpenAIVideoLabeler", "build_video_labeler", "video_labeler_config"]

VIDEO_PROMPT_VARIANTS: tuple[str, ...] = (
    "{views} Describe {object} in detail: what it is, its colors, shapes, materials and parts, and how it moves "
    "or changes over the frames. Write one fluent paragraph about the object itself, without mentioning the "
    "outline, the darkening, the frames or the images.",
    "{views} Write a detailed description of {object} through the video. Say what it is, then cover its "
    "appearance (color, shape, material, notable parts) and what it does: its motion, actions and changes of "
    "pose. Describe only the object, not the highlighting or the frames.",
    "{views} What is {object} and what does it do in this video? Give a rich, precise description of its "
    "appearance and of its movement from the first frame to the last, in a few sentences. Do not refer to "
    "the highlight, the outline or the individual images.",
)
"""The built-in video phrasings (a config's ``prompts:`` list replaces them)."""

_SUPPORTED = ("openai", "dam", "placeholder")


@dataclass(kw_only=True)
class OpenAIVideoLabelerConfig(OpenAILabelerConfig):
    """``labeler:`` section with ``type: openai`` in the video stage."""

    frame_view: Literal["full", "crop"] = "full"
    """Per frame: the whole frame with the object highlighted (views.full_style), or its focal crop (views.crop_style)."""


def describe_frames(config: OpenAIVideoLabelerConfig, num_frames: int) -> str:
    """The sentence that tells the VLM what its ``num_frames`` images show."""
    views = config.views
    style = views.full_style if config.frame_view == "full" else views.crop_style
    color = _COLOR_NAMES.get(tuple(int(c) for c in views.color), "a bright color")
    shown = "close-ups of the object" if config.frame_view == "crop" else "the whole picture"
    sentence = f"The {num_frames} images are frames of one video in time order, each showing {shown}"
    if style != "none":
        sentence += f", where the object is {_style_phrase(style, color)}"
    return sentence + "."


class OpenAIVideoLabeler(OpenAILabeler):
    """The ``openai`` labeler with one image part per frame (see the module docstring)."""

    def __init__(self, config: OpenAIVideoLabelerConfig, *, num_frames: int = 8, probe: bool = True) -> None:
        super().__init__(config, probe=probe)
        self.config: OpenAIVideoLabelerConfig = config
        self.templates = check_templates(config.prompts) if config.prompts else VIDEO_PROMPT_VARIANTS
        self.views_text = describe_frames(config, num_frames)

    def _encode(self, request: LabelRequest) -> list[str]:
        if not isinstance(request, VideoLabelRequest):
            return super()._encode(request)
        views, urls = self.config.views, []
        for frame, mask in zip(request.frames, request.masks):
            rendered = render_views(frame, mask, views)
            image = rendered.full if self.config.frame_view == "full" else rendered.crop
            urls.append(to_data_url(image, views.image_format, views.jpeg_quality))
        return urls


def _kind(section: dict[str, Any]) -> str:
    kind = section.get("type") if isinstance(section, dict) else None
    if kind not in _SUPPORTED:
        raise ConfigError(
            f"labeler.type {kind!r} cannot caption videos; use openai (a VLM server, one image per frame), dam (a "
            f"video DAM) or placeholder"
        )
    return str(kind)


def video_labeler_config(section: dict[str, Any]) -> Any:
    """The typed, checked config of a video stage's ``labeler:`` section, loading nothing."""
    from data_pipeline.labelers import labeler_config

    if _kind(section) == "openai":
        return from_dict(OpenAIVideoLabelerConfig, {k: v for k, v in section.items() if k != "type"}, key="labeler")
    return labeler_config(section)


def build_video_labeler(section: dict[str, Any], num_frames: int) -> Labeler:
    """The labeler of a video stage's ``labeler:`` section, ready to label masklets of ``num_frames`` frames."""
    from data_pipeline.labelers import build_labeler

    kind = _kind(section)
    if kind == "openai":
        return OpenAIVideoLabeler(video_labeler_config(section), num_frames=num_frames)
    labeler = build_labeler(dict(section))
    if kind == "dam":
        model_frames = getattr(labeler.describer.model.config, "num_video_frames", None)  # type: ignore[attr-defined]
        if model_frames is not None and model_frames != num_frames:
            raise ConfigError(
                f"num_frames is {num_frames} but the DAM at labeler.path takes {model_frames} frames per video; set "
                f"num_frames: {model_frames} (or use a DAM trained on {num_frames}-frame videos)"
            )
    return labeler
