"""Model folders for training a DAM from scratch: a SigLIP config, an LLM config, a tokenizer.

`dam-train` builds a new DAM from a vision folder and an LLM folder; with
`model.random_init: true` only their config.json is read. This writes such folders for a
small model with a word-level tokenizer over a task's vocabulary, e.g. the built-in
ShapesDLC model (configs/models/shapes_tiny, committed; a test checks it is current):

    python -m train.scratch configs/models/shapes_tiny
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from transformers import LlamaConfig, SiglipVisionConfig

from dam.prompts import DEFAULT_QUERY
from dam.shapes import VOCABULARY
from dam.tokenization import build_word_level_tokenizer, words_of

logger = logging.getLogger(__name__)


def shapes_vocabulary() -> list[str]:
    """Every word of ShapesDLC captions and of the default query."""
    phrases = [phrase for values in VOCABULARY.values() for phrase in values]
    return words_of([*phrases, "a in the", DEFAULT_QUERY])


def shapes_tiny_configs(vocab_size: int) -> tuple[SiglipVisionConfig, LlamaConfig]:
    """The built-in model's shapes: a 4-layer ViT (192 px, 16 px patches) and a 2-layer Llama.

    192 px keeps the stripes (6 px period) of a large object's focal crop above the resize's
    Nyquist limit; every tower layer feeds the projector (vision_feature_layer -1).
    """
    vision = SiglipVisionConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        image_size=192, patch_size=16,
    )
    llm = LlamaConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True,
    )
    return vision, llm


def write_shapes_tiny(folder: str | Path) -> Path:
    """vision/, llm/ and tokenizer/ of the built-in ShapesDLC model under `folder`."""
    folder = Path(folder)
    tokenizer = build_word_level_tokenizer(shapes_vocabulary())
    vision, llm = shapes_tiny_configs(len(tokenizer))
    vision.save_pretrained(folder / "vision")
    llm.save_pretrained(folder / "llm")
    tokenizer.save_pretrained(folder / "tokenizer")
    logger.info("wrote %s/{vision,llm,tokenizer}", folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.scratch", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for vision/, llm/ and tokenizer/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    write_shapes_tiny(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
