"""DamForConditionalGeneration: localized vision backbone + projector + any causal LM.

Visual features enter the LLM the LLaVA way: the processor writes `num_image_tokens`
placeholder ids (config.image_token_id) per frame into `input_ids`, and the projected
features of each frame replace them in order, so batching, padding and the loss are plain
causal-LM business. Generation delegates to the language model's own `generate` with
`inputs_embeds` (KV cache, sampling, streaming all come from transformers), as BLIP-2 does.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    SiglipVisionModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from dam.modeling.configuration_dam import DamConfig
from dam.modeling.projector import build_projector
from dam.modeling.vision import GatedCrossAttentionAdapter, LocalizedVisionBackbone, MaskPatchEmbedding
from dam.prompts import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)


class DamPreTrainedModel(PreTrainedModel):
    config_class = DamConfig
    base_model_prefix = "dam"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SiglipEncoderLayer", "GatedCrossAttentionAdapter"]

    def _init_weights(self, module: nn.Module) -> None:
        # The tower and the LLM are PreTrainedModels that initialise themselves; this covers
        # the modules DAM adds: projector and adapters as usual, E_M at zero, gates at gate_init.
        super()._init_weights(module)
        if isinstance(module, GatedCrossAttentionAdapter):
            nn.init.constant_(module.attn_gate, self.config.gate_init)
            nn.init.constant_(module.mlp_gate, self.config.gate_init)
        elif isinstance(module, MaskPatchEmbedding):
            if self.config.mask_embedding_init == "random":  # LeCun normal, as SigLIP's patch embedding
                nn.init.normal_(module.weight, std=module.weight[0].numel() ** -0.5)
            else:
                nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


class DamForConditionalGeneration(DamPreTrainedModel, GenerationMixin):
    """The Describe Anything Model: focal prompts + text in, region descriptions out."""

    def __init__(
        self,
        config: DamConfig,
        vision_tower: SiglipVisionModel | None = None,
        language_model: PreTrainedModel | None = None,
    ) -> None:
        super().__init__(config)
        if config.image_token_id is None:
            raise ValueError("DamConfig.image_token_id must be set (the id of the <image> placeholder)")
        tower = vision_tower if vision_tower is not None else AutoModel.from_config(config.vision_config)
        self.vision = LocalizedVisionBackbone(config, tower=tower)
        self.projector = build_projector(config)
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(
        self, pixel_values: torch.Tensor, crop_is_full_image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(N, 8, S, S) focal prompts -> (N, num_image_tokens, D) LLM-space features."""
        if not self.config.skip_adapters_when_crop_is_full:
            crop_is_full_image = None
        views = self.vision(pixel_values, crop_is_full_image)  # (N, V, T, C)
        projected = self.projector(views.flatten(0, 1))  # (N*V, T', D)
        return projected.view(views.shape[0], -1, projected.shape[-1])  # (N, V*T', D)

    def freeze_unused_parameters(self) -> list[str]:
        """Set requires_grad=False on the parameters no forward reaches; returns their names.

        They would get no gradient: DDP would wait for them (or need find_unused_parameters)
        and the optimizer and ZeRO would hold state for them.
        """
        unused = {id(p) for module in self.vision.unused_modules() for p in module.parameters()}
        frozen = []
        for name, parameter in self.named_parameters():
            if id(parameter) in unused:
                parameter.requires_grad_(False)
                frozen.append(name)
        return frozen

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        crop_is_full_image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each frame's projected features written over its placeholders."""
        image_positions = input_ids == self.config.image_token_id  # (B, L)
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_positions, 0))  # (B, L, D)
        num_placeholders = int(image_positions.sum())
        if pixel_values is None:
            if num_placeholders:
                raise ValueError(f"input_ids hold {num_placeholders} image placeholders but no pixel_values were given")
            return embeds
        features = self.get_image_features(pixel_values, crop_is_full_image).to(embeds.dtype)  # (N, T, D)
        if num_placeholders != features.shape[0] * features.shape[1]:
            raise ValueError(
                f"Image features and image tokens do not match: {features.shape[0]} frames x "
                f"{features.shape[1]} tokens = {features.shape[0] * features.shape[1]} features, but "
                f"input_ids hold {num_placeholders} placeholders"
            )
        return embeds.masked_scatter(image_positions.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        crop_is_full_image: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Causal-LM forward; `labels` use -100 on every position but the answer's."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, crop_is_full_image)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        crop_is_full_image: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """KV-cached generation; returns only the new tokens (B, new_len).

        Left-pad `input_ids` for batches. Any transformers generation argument (max_new_tokens,
        do_sample, temperature, top_p, streamer, stopping_criteria, ...) passes through.
        """
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, crop_is_full_image)
        if attention_mask is None:
            attention_mask = torch.ones(input_ids.shape, dtype=torch.long, device=input_ids.device)
        generation_config = copy.deepcopy(generate_kwargs.pop("generation_config", None) or self.generation_config)
        model_kwargs = generation_config.update(**generate_kwargs)  # returns what is not a generation setting
        return self.language_model.generate(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            generation_config=generation_config,
            **model_kwargs,
        )

    @classmethod
    def from_parts(
        cls,
        vision: str | Path | SiglipVisionModel,
        llm: str | Path | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        **config_kwargs: Any,
    ) -> "DamForConditionalGeneration":
        """A new DAM from a pretrained SigLIP tower and a pretrained causal LM.

        `vision` and `llm` are local paths, hub ids or loaded models. The tokenizer (loaded
        from `llm` when not given) gains an `<image>` placeholder token if it lacks one, the
        LLM's embeddings grow to match, and the new modules (mask embedding, adapters, gates)
        start at the identity state. The tokenizer is kept on `model.tokenizer` and written
        by `save_pretrained`. `config_kwargs` set DamConfig fields (projector_type, ...).
        """
        if not isinstance(vision, PreTrainedModel):
            vision = SiglipVisionModel.from_pretrained(vision, dtype=dtype)
        if tokenizer is None:
            if isinstance(llm, PreTrainedModel):
                raise ValueError("from_parts needs `tokenizer` when `llm` is a loaded model")
            tokenizer = llm
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if not isinstance(llm, PreTrainedModel):
            llm = AutoModelForCausalLM.from_pretrained(llm, dtype=dtype)
        if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
        if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
            llm.resize_token_embeddings(len(tokenizer))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        # A composite config resets its sub-configs' attention backend: keep the loaded LLM's.
        config_kwargs.setdefault("attn_implementation", llm.config._attn_implementation or "sdpa")
        config = DamConfig(
            vision_config=vision.config,
            text_config=llm.config,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
            **config_kwargs,
        )
        model = cls(config, vision_tower=vision, language_model=llm)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        model.tokenizer = tokenizer
        return model

    def save_pretrained(self, save_directory: str | Path, **kwargs: Any) -> None:
        """transformers' save, plus the tokenizer when the model carries one (from_parts).

        transformers writes the weights through a private temporary file (mode 0600); they get
        the mode of the config file written beside them, so a model saved on a shared cluster is
        readable as its config is.
        """
        super().save_pretrained(save_directory, **kwargs)
        tokenizer = getattr(self, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(save_directory)
        mode = (Path(save_directory) / "config.json").stat().st_mode & 0o777
        for path in Path(save_directory).glob("*.safetensors"):
            path.chmod(mode)
