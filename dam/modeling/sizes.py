"""Named model sizes (builders of configs), separate from the model code, as torchtune does.

`dam_3b_config()` is the released DAM-3B as the NVlabs importer converts it (SigLIP
so400m-patch14-384 tower, a 2.7B Llama-shaped LLM, mlp_downsample projector, scalar gates and
the rest of `dam.modeling.nvlabs.released_dam_config`); it is used with random weights for
speed benchmarks. `tiny_config()` is for tests and CPU smoke runs.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig, SiglipVisionConfig

from dam.modeling.configuration_dam import DamConfig
from dam.modeling.nvlabs import released_dam_config


def siglip_so400m_384_config(**overrides: Any) -> SiglipVisionConfig:
    values: dict[str, Any] = dict(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
        image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    )
    values.update(overrides)
    return SiglipVisionConfig(**values)


def llama_2_7b_shape_config(vocab_size: int = 32000, **overrides: Any) -> LlamaConfig:
    """The Sheared-LLaMA-2.7B shape behind DAM-3B (VILA1.5-3B's LLM)."""
    values: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=2560, intermediate_size=6912, num_hidden_layers=32,
        num_attention_heads=20, num_key_value_heads=20, max_position_embeddings=4096,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def dam_3b_config(image_token_id: int, vocab_size: int = 32000, **overrides: Any) -> DamConfig:
    """DAM-3B's shapes with the architecture `dam convert --from-nvlabs` gives the released
    checkpoint (the converter's own `released_dam_config`), so a benchmark of this config
    measures the converted model. `overrides` replace DamConfig fields."""
    return released_dam_config(
        siglip_so400m_384_config(), llama_2_7b_shape_config(vocab_size), image_token_id, **overrides
    )


def tiny_siglip_config(**overrides: Any) -> SiglipVisionConfig:
    """transformers ModelTester sizes: image 16, patch 4, hidden 32, 3 layers."""
    values: dict[str, Any] = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4,
        image_size=16, patch_size=4, attn_implementation="sdpa",
    )
    values.update(overrides)
    return SiglipVisionConfig(**values)


def tiny_llama_config(vocab_size: int = 99, **overrides: Any) -> LlamaConfig:
    values: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa",
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_config(image_token_id: int, vocab_size: int, **overrides: Any) -> DamConfig:
    values: dict[str, Any] = dict(
        vision_config=tiny_siglip_config(),
        text_config=tiny_llama_config(vocab_size),
        prompt_template="vicuna_v1",
        image_token_id=image_token_id,
        focal_min_size=8,
        attn_implementation="sdpa",
    )
    values.update(overrides)
    return DamConfig(**values)
