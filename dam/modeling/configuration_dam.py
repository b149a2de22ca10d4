"""DamConfig: a SigLIP vision config, any causal-LM text config, and DAM's own switches.

A composite transformers config in the LLaVA manner, so `save_pretrained` writes one
config.json and `from_pretrained` rebuilds both sub-configs. The prompt template and the focal
geometry live here too, so a checkpoint carries everything its processor needs.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from transformers import AutoConfig, PretrainedConfig, SiglipVisionConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from dam.errors import DamInputError

ProjectorType = Literal["mlp2x_gelu", "mlp_downsample"]
GateType = Literal["tanh", "scalar"]
PromptTemplateName = Literal["chat", "vicuna_v1", "plain"]
VisionMode = Literal["focal", "full_only", "crop_only", "full_and_crop"]
ResizeBackend = Literal["torch", "pil"]
DownsampleOrder = Literal["row_major", "column_major"]
MaskEmbeddingInit = Literal["zeros", "random"]


def _check_choice(name: str, value: str, choices_type: Any) -> None:
    choices = get_args(choices_type)
    if value not in choices:
        raise DamInputError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _sub_config(value: PretrainedConfig | dict | None, default_type: str) -> PretrainedConfig:
    if isinstance(value, PretrainedConfig):
        return value
    value = dict(value or {})
    model_type = value.pop("model_type", default_type)
    if model_type not in CONFIG_MAPPING:
        raise DamInputError(f"unknown model_type {model_type!r} in a DAM sub-config")
    return CONFIG_MAPPING[model_type](**value)


class DamConfig(PretrainedConfig):
    """Configuration of a Describe Anything Model.

    Args:
        vision_config: SigLIP-style vision tower config (a SiglipVisionConfig or its dict).
        text_config: any causal-LM config (Llama, Qwen2, ...), or its dict.
        projector_type: "mlp2x_gelu" (Linear-GELU-Linear per token) or "mlp_downsample"
            (2x2 token merge as in VILA, then LayerNorm-Linear-GELU-Linear).
        gate_type: "tanh" (the paper: tanh(g)) or "scalar" (released checkpoints: g).
        vision_feature_layer: which hidden state of the tower goes to the projector and serves
            as cross-attention context (-2 as LLaVA/VILA select).
        num_video_frames: frames per video masklet, each with its own image slot.
        image_token_id: placeholder id marking visual positions in `input_ids`.
        prompt_template: "chat" (the tokenizer's chat template), "vicuna_v1" (released DAM)
            or "plain" (query then answer, for tokenizers without a chat template).
        focal_alpha, focal_min_size: focal crop expansion and box floor (DESIGN.md).
        skip_adapters_when_crop_is_full: released-checkpoint behaviour: a region whose focal
            crop is the whole image is encoded without the cross-attention adapters.
        default_query: the query used when the caller gives none.
        vision_mode: "focal" is DAM (the crop's features, with gated cross-attention to the
            full image). The ablations of the paper's two ideas: "full_only" (the full image and
            mask alone, no crop), "crop_only" (the crop alone, no global context) and
            "full_and_crop" (both encoded separately, both token sets fed to the LLM, no
            cross-attention; twice the visual tokens).
        gate_init: initial value of every adapter gate. 0 (the paper) makes a new DAM start
            exactly as its pretrained tower; a model trained from scratch has nothing to
            preserve and learns to use the global context much faster with open gates.
        mask_embedding_init: "zeros" (the paper: the mask starts invisible, so a new DAM equals
            its pretrained tower) or "random" (initialised like a patch embedding; for training
            from scratch, where a zero E_M leaves the model blind to the mask for long).
        default_video_query: the query for multi-frame (video) inputs when the caller gives
            none; None uses `default_query` with one image slot per frame. Joint image+video
            checkpoints were prompted differently for images and videos.
        resize_backend: how the processor resizes the four focal views: "torch" (antialiased
            bicubic in float, then 8-bit quantised) or "pil" (PIL's bicubic on 8-bit images,
            bit-exactly the SigLIP image processor the released checkpoints were run with;
            set by the NVlabs importer).
        downsample_order: token order of the `mlp_downsample` 2x2 merge: "row_major" blocks, or
            "column_major" as the released checkpoints' projector emits them (the channel order
            within a block is (r0,c0), (r0,c1), (r1,c0), (r1,c1) either way).
        context_layer_norm: normalise the global context z (a LayerNorm per adapter) before the
            cross-attention's key and value projections. Not in the paper nor the released
            checkpoints (False keeps them exact); an option for towers trained from scratch,
            whose raw residual states carry large offsets shared by every token.
    """

    model_type = "dam"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}

    def __init__(
        self,
        vision_config: PretrainedConfig | dict | None = None,
        text_config: PretrainedConfig | dict | None = None,
        projector_type: ProjectorType = "mlp2x_gelu",
        gate_type: GateType = "tanh",
        vision_feature_layer: int = -2,
        num_video_frames: int = 8,
        image_token_id: int | None = None,
        prompt_template: PromptTemplateName = "chat",
        focal_alpha: float = 3.0,
        focal_min_size: int = 48,
        skip_adapters_when_crop_is_full: bool = False,
        default_query: str = "Describe the masked region in detail.",
        vision_mode: VisionMode = "focal",
        gate_init: float = 0.0,
        mask_embedding_init: MaskEmbeddingInit = "zeros",
        default_video_query: str | None = None,
        resize_backend: ResizeBackend = "torch",
        downsample_order: DownsampleOrder = "row_major",
        context_layer_norm: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_choice("projector_type", projector_type, ProjectorType)
        _check_choice("gate_type", gate_type, GateType)
        _check_choice("prompt_template", prompt_template, PromptTemplateName)
        _check_choice("vision_mode", vision_mode, VisionMode)
        _check_choice("resize_backend", resize_backend, ResizeBackend)
        _check_choice("downsample_order", downsample_order, DownsampleOrder)
        _check_choice("mask_embedding_init", mask_embedding_init, MaskEmbeddingInit)
        self.vision_config = _sub_config(vision_config, "siglip_vision_model")
        self.text_config = _sub_config(text_config, "llama")
        if not isinstance(self.vision_config, SiglipVisionConfig):
            raise DamInputError(
                f"vision_config must be a SigLIP vision config, got {type(self.vision_config).__name__}"
            )
        num_layers = self.vision_config.num_hidden_layers
        if not -num_layers <= vision_feature_layer < 0:
            raise DamInputError(
                f"vision_feature_layer={vision_feature_layer} must be negative and select one of the "
                f"tower's {num_layers} layers (e.g. -2)"
            )
        self.projector_type = projector_type
        self.gate_type = gate_type
        self.vision_feature_layer = vision_feature_layer
        self.num_video_frames = num_video_frames
        self.image_token_id = image_token_id
        self.prompt_template = prompt_template
        self.focal_alpha = focal_alpha
        self.focal_min_size = focal_min_size
        self.skip_adapters_when_crop_is_full = skip_adapters_when_crop_is_full
        self.default_query = default_query
        self.vision_mode = vision_mode
        self.gate_init = gate_init
        self.default_video_query = default_video_query
        self.resize_backend = resize_backend
        self.downsample_order = downsample_order
        self.mask_embedding_init = mask_embedding_init
        self.context_layer_norm = context_layer_norm
        kwargs.setdefault("tie_word_embeddings", getattr(self.text_config, "tie_word_embeddings", False))
        super().__init__(**kwargs)

    @property
    def patch_grid(self) -> int:
        """Patches per side of the vision tower's square input."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def num_views(self) -> int:
        """Encoded views whose tokens reach the LLM per frame (2 only for "full_and_crop")."""
        return 2 if self.vision_mode == "full_and_crop" else 1

    @property
    def num_image_tokens(self) -> int:
        """LLM positions one image slot (one frame) takes after the projector."""
        if self.projector_type == "mlp_downsample":
            return self.num_views * ((self.patch_grid + 1) // 2) ** 2
        return self.num_views * self.patch_grid**2

    @property
    def num_vision_layers_run(self) -> int:
        """Tower layers whose output reaches the selected hidden state (the rest have no effect)."""
        return self.vision_config.num_hidden_layers + 1 + self.vision_feature_layer
