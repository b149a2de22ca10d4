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
