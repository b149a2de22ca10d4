"""The committed from-scratch model folders match what train.scratch writes (no drift)."""

from __future__ import annotations

import json
from pathlib import Path

from dam.shapes import VOCABULARY
from train.scratch import write_shapes_tiny

COMMITTED = Path(__file__).resolve().parents[1] / "configs" / "models" / "shapes_tiny"


def test_committed_shapes_tiny_folders_are_current(tmp_path):
    fresh = write_shapes_tiny(tmp_path / "shapes_tiny")
    for part in ("vision/config.json", "llm/config.json", "tokenizer/tokenizer.json"):
        committed = json.loads((COMMITTED / part).read_text())
        written = json.loads((fresh / part).read_text())
        committed.pop("transformers_version", None)
        written.pop("transformers_version", None)
        assert committed == written, f"{part} is stale: run python -m train.scratch configs/models/shapes_tiny"


def test_the_tokenizer_knows_every_caption_word():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(COMMITTED / "tokenizer")
    for values in VOCABULARY.values():
        for phrase in values:
            assert tokenizer.unk_token_id not in tokenizer(phrase, add_special_tokens=False)["input_ids"], phrase


def test_sincos_position_init_codes_rows_and_columns():
    import pytest
    import torch

    from dam.configio import ConfigError
    from train.config import ModelConfig
    from train.model import build_model, sincos_position_embeddings

    code = sincos_position_embeddings(4, 16)  # (16 patches, 16 channels): rows in the first half
    grid = code.view(4, 4, 16)
    assert torch.equal(grid[:, 0, :8], grid[:, 3, :8])  # row half: same along a row
    assert torch.equal(grid[0, :, 8:], grid[3, :, 8:])  # column half: same down a column
    assert len({tuple(row.tolist()) for row in code}) == 16  # every patch has its own code
    with pytest.raises(ConfigError, match="divisible by 4"):
        sincos_position_embeddings(4, 18)

    config = ModelConfig(vision=str(COMMITTED / "vision"), llm=str(COMMITTED / "llm"),
                         tokenizer=str(COMMITTED / "tokenizer"), random_init=True, vision_position_init="sincos")
    model, _ = build_model(config)
    embedding = model.vision.tower.embeddings.position_embedding.weight
    assert torch.equal(embedding, sincos_position_embeddings(12, embedding.shape[1]))


def test_sincos_scale_and_a_frozen_position_embedding():
    import pytest
    import torch

    from dam.configio import ConfigError
    from train.config import FreezeConfig, LoraConfig, ModelConfig, TrainConfig, load_config
    from train.model import apply_freeze_policy, build_model, sincos_position_embeddings

    config = ModelConfig(vision=str(COMMITTED / "vision"), llm=str(COMMITTED / "llm"), tokenizer=str(COMMITTED / "tokenizer"),
                         random_init=True, vision_position_init="sincos", vision_position_scale=4.0)
    model, _ = build_model(config)
    embedding = model.vision.tower.embeddings.position_embedding.weight
    assert torch.allclose(embedding, 4.0 * sincos_position_embeddings(12, embedding.shape[1]))

    model = apply_freeze_policy(model, FreezeConfig(vision_position_embedding="frozen"), LoraConfig())
    assert not embedding.requires_grad
    assert model.vision.tower.embeddings.patch_embedding.weight.requires_grad  # the rest of the tower trains
    assert FreezeConfig(vision_tower="frozen").setting("vision_position_embedding") == "frozen"  # unset: as the tower
    assert FreezeConfig(vision_tower="frozen", vision_position_embedding="full").setting("vision_position_embedding") == "full"

    base = ["model.vision=v", "model.llm=l", "data.datasets=[{path: d}]"]
    with pytest.raises(ConfigError, match="vision_position_init: sincos"):
        load_config(None, base + ["model.vision_position_scale=4"])
    with pytest.raises(ConfigError, match="must be > 0"):
        load_config(None, base + ["model.vision_position_init=sincos", "model.vision_position_scale=0"])
    assert isinstance(load_config(None, base + ["model.vision_position_init=sincos", "model.vision_position_scale=4"]), TrainConfig)


def test_a_from_scratch_model_is_the_same_for_the_same_seed():
    import torch

    from train.config import ModelConfig
    from train.model import build_model

    config = ModelConfig(vision=str(COMMITTED / "vision"), llm=str(COMMITTED / "llm"), tokenizer=str(COMMITTED / "tokenizer"),
                         random_init=True)
    first = build_model(config, seed=3)[0].state_dict()
    torch.rand(10)  # RNG state moved on, as the data loading of a run does
    again = build_model(config, seed=3)[0].state_dict()
    other = build_model(config, seed=4)[0].state_dict()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)
