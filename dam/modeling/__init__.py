"""The DAM model: config, localized vision backbone, projector and the causal-LM wrapper."""

from transformers import AutoConfig, AutoModel

from dam.modeling.configuration_dam import DamConfig
from dam.modeling.modeling_dam import DamForConditionalGeneration, DamPreTrainedModel
from dam.modeling.nvlabs import convert_nvlabs_checkpoint, is_nvlabs_layout
from dam.modeling.projector import TokenDownsample2x2, build_projector
from dam.modeling.vision import GatedCrossAttentionAdapter, LocalizedVisionBackbone

# Auto classes then resolve "model_type": "dam" in config.json (AutoTokenizer reads it too).
AutoConfig.register(DamConfig.model_type, DamConfig, exist_ok=True)
AutoModel.register(DamConfig, DamForConditionalGeneration, exist_ok=True)

__all__ = [
    "DamConfig",
    "DamForConditionalGeneration",
    "DamPreTrainedModel",
    "GatedCrossAttentionAdapter",
    "LocalizedVisionBackbone",
    "TokenDownsample2x2",
    "build_projector",
    "convert_nvlabs_checkpoint",
    "is_nvlabs_layout",
]
