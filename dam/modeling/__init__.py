"""The DAM model: config, localized vision backbone, projector and the causal-LM wrapper."""

from dam.modeling.configuration_dam import DamConfig
from dam.modeling.modeling_dam import DamForConditionalGeneration, DamPreTrainedModel
from dam.modeling.projector import TokenDownsample2x2, build_projector
from dam.modeling.vision import GatedCrossAttentionAdapter, LocalizedVisionBackbone

__all__ = [
    "DamConfig",
    "DamForConditionalGeneration",
    "DamPreTrainedModel",
    "GatedCrossAttentionAdapter",
    "LocalizedVisionBackbone",
    "TokenDownsample2x2",
    "build_projector",
]
