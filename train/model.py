"""The model to train: built from the config, parts frozen or given LoRA, saved in DAM format.

Parameters no forward reaches (the tower layers after `vision_feature_layer`, their adapters,
the post-layernorm and pooling head) are always frozen, so DDP needs no
`find_unused_parameters` and the optimizer holds no state for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, SiglipVisionModel, set_seed

from dam.modeling import DamForConditionalGeneration
from dam.modeling.vision import siglip_core
from train.config import FreezeConfig, LoraConfig, ModelConfig
from dam.configio import ConfigError

logger = logging.getLogger(__name__)


def _check_folder(path: str, key: str) -> str:
    if not Path(path).is_dir():
        raise ConfigError(f"{key}: {path!r} is not a folder (a local model folder with config.json is expected)")
    return path


def sincos_position_embeddings(grid_size: int, width: int) -> torch.Tensor:
    """(grid_size**2, width) 2D sine-cosine code, row-major: half the channels encode the row, half
    the column, each as sines and cosines at geometrically spaced frequencies (as MAE)."""
    if width % 4:
        raise ConfigError(f"model.vision_position_init: sincos needs a hidden size divisible by 4, got {width}")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    coordinates = torch.arange(grid_size, dtype=torch.float64)
    rows, columns = torch.meshgrid(coordinates, coordinates, indexing="ij")

    def code(values: torch.Tensor) -> torch.Tensor:  # (G*G,) -> (G*G, width/2)
        angles = values.reshape(-1, 1) * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([code(rows), code(columns)], dim=1).float()


def _position_embedding(vision: SiglipVisionModel) -> nn.Embedding:
    return siglip_core(vision).embeddings.position_embedding


def _init_positions(vision: SiglipVisionModel, how: str, scale: float) -> None:
    if how == "random":
        return
    embedding = _position_embedding(vision)
    grid_size = vision.config.image_size // vision.config.patch_size
    with torch.no_grad():
        embedding.weight.copy_(scale * sincos_position_embeddings(grid_size, embedding.weight.shape[1]))


def build_model(config: ModelConfig, seed: int | None = None) -> tuple[DamForConditionalGeneration, PreTrainedTokenizerBase]:
    """The DAM and tokenizer a run starts from (float32 master weights; mixed precision is the trainer's).

    `seed` seeds every RNG first: the Trainer seeds only when it is built, after the model, so
    without it the random parts (from scratch: everything) would differ on every run.
    """
    if seed is not None:
        set_seed(seed)
    if config.checkpoint:
        path = _check_folder(config.checkpoint, "model.checkpoint")
        model = DamForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(_check_folder(config.tokenizer, "model.tokenizer") if config.tokenizer else path)
        model.tokenizer = tokenizer
        return model, tokenizer
    vision_path = _check_folder(config.vision, "model.vision")
    llm_path = _check_folder(config.llm, "model.llm")
    tokenizer_path = _check_folder(config.tokenizer, "model.tokenizer") if config.tokenizer else llm_path
    if config.random_init:
        vision = SiglipVisionModel(AutoConfig.from_pretrained(vision_path))
        _init_positions(vision, config.vision_position_init, config.vision_position_scale)
        llm_config = AutoConfig.from_pretrained(llm_path)
        llm = AutoModelForCausalLM.from_config(llm_config, attn_implementation=config.dam.get("attn_implementation", "sdpa"))
    else:
        vision = SiglipVisionModel.from_pretrained(vision_path, dtype=torch.float32)
        llm = AutoModelForCausalLM.from_pretrained(llm_path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    try:
        model = DamForConditionalGeneration.from_parts(vision, llm, tokenizer, **config.dam)
    except TypeError as error:
        raise ConfigError(f"model.dam: {error}") from None
    return model, model.tokenizer


def _components(model: DamForConditionalGeneration) -> dict[str, list[nn.Parameter]]:
    vision = model.vision
    positions = _position_embedding(vision.tower).weight
    return {
        "vision_tower": [p for p in vision.tower.parameters() if p is not positions],
        "vision_position_embedding": [positions],
        "mask_embedding": list(vision.mask_patch_embedding.parameters()),
        "adapters": list(vision.adapters.parameters()),
        "projector": list(model.projector.parameters()),
        "llm": list(model.language_model.parameters()),
    }


def apply_freeze_policy(
    model: DamForConditionalGeneration, freeze: FreezeConfig, lora: LoraConfig
) -> DamForConditionalGeneration:
    """Set requires_grad per component; with freeze.llm == "lora" wrap the LLM with peft LoRA."""
    for component, parameters in _components(model).items():
        trainable = freeze.setting(component) == "full"
        for parameter in parameters:
            parameter.requires_grad_(trainable)
    if freeze.llm == "lora":
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        peft_config = PeftLoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules)
        )
        try:
            model.language_model = get_peft_model(model.language_model, peft_config)
        except ValueError as error:
            raise ConfigError(f"lora.target_modules: {error}") from None
    model.freeze_unused_parameters()
    _log_trainable(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the freeze policy leaves nothing to train: set at least one freeze.* to full (or llm: lora)")
    return model


def _log_trainable(model: DamForConditionalGeneration) -> None:
    counts = {
        name: (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
        for name, params in _components(model).items()
    }
    logger.info(
        "trainable parameters: %s",
        ", ".join(f"{name} {trainable / 1e6:.2f}M/{total / 1e6:.2f}M" for name, (trainable, total) in counts.items()),
    )


def merged_for_saving(model: DamForConditionalGeneration) -> DamForConditionalGeneration:
    """The model with any LoRA merged into the LLM's weights (a plain DAM for from_pretrained)."""
    from peft import PeftModel

    if isinstance(model.language_model, PeftModel):
        model.language_model = model.language_model.merge_and_unload()
    return model
