"""Stage-1 labelers: regions of segmentation datasets -> detailed captions, by a VLM or a DAM.

    labeler = build_labeler({"type": "openai", "base_url": "http://localhost:8000/v1"})
    results = labeler.label([LabelRequest("coco-1-7", image, mask, "dog", seed=7), ...])
    # [LabelResult(caption="A brown dog ...", reason=None), LabelResult(None, "refusal"), ...]

Types (the ``type:`` key of the YAML ``labeler:`` section):

- ``openai``: a VLM behind an OpenAI-compatible endpoint such as vLLM (:mod:`.openai_api`);
- ``transformers``: a local VLM run in-process (:mod:`.transformers_vlm`);
- ``dam``: a DAM checkpoint, for self-training (:mod:`.dam_model`);
- ``placeholder``: a fixed caption, for dry runs and for timing the pipeline itself (:mod:`.placeholder`).

The video stage asks for whole masklets (``VideoLabelRequest``: frames and masks) through
:func:`data_pipeline.labelers.video.build_video_labeler`.

VLMs see the focal crop and the full image with the region highlighted (:mod:`data_pipeline.views`)
and one of several prompt phrasings with the category name (:mod:`data_pipeline.prompts`); every
answer is cleaned and possibly rejected (:mod:`data_pipeline.cleaning`). A labeler never raises
for one bad region; ``build_labeler`` raises ``DamInputError`` (a ``ConfigError`` for bad keys)
for what would fail them all, before any region is labeled.
"""

from __future__ import annotations

import importlib
from typing import Any

from dam.configio import ConfigError, from_dict

from data_pipeline.labelers.base import LabelRequest, LabelResult, Labeler, OwnsLabeler, VideoLabelRequest, check_request

__all__ = [
    "OwnsLabeler",
    "LabelRequest",
    "VideoLabelRequest",
    "LabelResult",
    "Labeler",
    "LABELER_TYPES",
    "build_labeler",
    "labeler_config",
    "check_request",
]

LABELER_TYPES: dict[str, tuple[str, str, str]] = {
    "openai": ("data_pipeline.labelers.openai_api", "OpenAILabelerConfig", "OpenAILabeler"),
    "transformers": ("data_pipeline.labelers.transformers_vlm", "TransformersLabelerConfig", "TransformersLabeler"),
    "dam": ("data_pipeline.labelers.dam_model", "DamLabelerConfig", "DamLabeler"),
    "placeholder": ("data_pipeline.labelers.placeholder", "PlaceholderLabelerConfig", "PlaceholderLabeler"),
}
"""type -> (module, config dataclass, labeler class); modules are imported only when used."""


def _parts(config: dict[str, Any]) -> tuple[Any, type, dict[str, Any]]:
    if not isinstance(config, dict):
        raise ConfigError(f"labeler must be a mapping with a 'type' key, got {config!r}")
    data = dict(config)
    kind = data.pop("type", None)
    if kind not in LABELER_TYPES:
        given = "no labeler.type" if kind is None else f"labeler.type {kind!r}"
        raise ConfigError(f"{given}: set labeler.type to one of {', '.join(LABELER_TYPES)}")
    module_name, config_name, labeler_name = LABELER_TYPES[kind]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, labeler_name), data


def labeler_config(config: dict[str, Any]) -> Any:
    """The typed, checked config of a ``labeler:`` section, without loading or probing anything
    (a runner can validate its whole config before it starts)."""
    config_cls, _, data = _parts(config)
    return from_dict(config_cls, data, key="labeler")


def build_labeler(config: dict[str, Any]) -> Labeler:
    """The labeler a ``labeler:`` section describes, ready to label (model loaded, server probed)."""
    config_cls, labeler_cls, data = _parts(config)
    return labeler_cls(from_dict(config_cls, data, key="labeler"))
