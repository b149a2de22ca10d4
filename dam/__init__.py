"""Describe Anything: detailed localized captioning of image regions and video masklets.

    from dam import DescribeAnything
    model = DescribeAnything.from_pretrained("path/to/dam")
    text = model.describe(image, mask)
"""

from dam.densecap import (
    DamCaptioner,
    DamQueryScorer,
    DenseCaptioner,
    FclnCaptioner,
    FclnProposer,
    FclnQueryScorer,
    SamProposer,
    run_folder,
    score_queries,
    search_folder,
)
from dam.describe import DescribeAnything
from dam.errors import DamInputError
from dam.focal import FocalPrompt, build_focal_prompt, focal_crop_box
from dam.images import load_image
from dam.masks import load_mask
from dam.modeling import DamConfig, DamForConditionalGeneration
from dam.processing import DamProcessor

__all__ = [
    "DamCaptioner",
    "DamConfig",
    "DamForConditionalGeneration",
    "DamInputError",
    "DamProcessor",
    "DamQueryScorer",
    "DenseCaptioner",
    "DescribeAnything",
    "FclnCaptioner",
    "FclnProposer",
    "FclnQueryScorer",
    "FocalPrompt",
    "SamProposer",
    "build_focal_prompt",
    "focal_crop_box",
    "load_image",
    "load_mask",
    "run_folder",
    "score_queries",
    "search_folder",
]
