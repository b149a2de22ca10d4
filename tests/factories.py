"""Tiny random models and tokenizers for CPU tests (transformers ModelTester sizes)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast, Qwen2Config

from dam.fcln import FclnConfig, FclnModel
from dam.modeling import DamConfig, DamForConditionalGeneration
from dam.modeling.sizes import tiny_config, tiny_llama_config, tiny_siglip_config  # noqa: F401 (re-exported)
from dam.shapes import VOCABULARY
from dam.tokenization import build_word_level_tokenizer

WORDS = (
    "user assistant a the of in on and with is red green blue yellow small large circle square triangle dog cat "
    "describe masked region detail object image video frames given above sequence form sentence "
    "words left right top bottom center striped dotted solid shiny wooden table sky tree car . , :"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s> assistant :{% endif %}"
)


def tiny_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    return build_word_level_tokenizer(WORDS, chat_template=CHAT_TEMPLATE if chat_template else None)


def tiny_qwen2_config(vocab_size: int = 99) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
        attn_implementation="sdpa",
    )


def tiny_dam_config(**overrides) -> DamConfig:
    tokenizer = tiny_tokenizer()
    overrides.setdefault("prompt_template", "chat")
    return tiny_config(tokenizer.convert_tokens_to_ids("<image>"), len(tokenizer), **overrides)


def tiny_dam(seed: int = 0, perturb_new_modules: bool = True, **overrides) -> DamForConditionalGeneration:
    """A tiny DAM; by default its gates and mask embedding are made non-zero so that the
    regional pass really depends on the mask and the global context."""
    torch.manual_seed(seed)
    model = DamForConditionalGeneration(tiny_dam_config(**overrides)).eval()
    if perturb_new_modules:
        with torch.no_grad():
            model.vision.mask_patch_embedding.weight.normal_(0, 0.5)
            for parameter in model.projector.parameters():
                parameter.normal_(0, 0.5)
            for adapter in model.vision.adapters:
                adapter.attn_gate.fill_(0.7)
                adapter.mlp_gate.fill_(0.5)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 0
    return model


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


SHAPE_WORDS = sorted({word for values in VOCABULARY.values() for value in values for word in value.split()} | {"a", "in", "the"})


def tiny_shapes_fcln(seed: int = 0, lstm_layers: int = 1) -> FclnModel:
    """A random FCLN with the ShapesDLC words, 128 px input, 20 proposals."""
    torch.manual_seed(seed)
    config = FclnConfig(
        backbone="tiny", tiny_backbone_channels=16, anchors=[[32, 32], [64, 64], [128, 128]],
        localization_hidden_size=16, recognition_hidden_size=32, recognition_dropout=0.0, grid_size=(3, 3),
        word_embedding_size=16, lstm_hidden_size=32, lstm_num_layers=lstm_layers, vocabulary=SHAPE_WORDS,
        test_num_proposals=20, image_longer_side=128, max_caption_length=8,
    )
    return FclnModel(config).eval()
