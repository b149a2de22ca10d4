"""A tiny random DAM and a small learnable dataset: a seconds-long `dam-train` run on a CPU.

    python -m train.smoke runs/smoke            # writes runs/smoke/checkpoint and runs/smoke/data
    dam-train --config configs/train/tiny_cpu.yaml model.checkpoint=runs/smoke/checkpoint \\
        'data.datasets=[{path: runs/smoke/data}]' training.output_dir=runs/smoke/run

The rows ("a red square .") depend on the pixels, so the loss falls within 30 steps. Used by
the tests and to check an install end to end without downloading anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dam.modeling import DamForConditionalGeneration
from dam.modeling.sizes import tiny_config
from dam.prompts import IMAGE_PLACEHOLDER
from dam.schema import image_row, video_row, write_shard
from dam.tokenization import build_word_level_tokenizer, words_of
from train.augment import PHRASINGS

logger = logging.getLogger(__name__)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (235, 205, 40)}


def colored_square(color: str, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A gray noisy image holding one square of `color`, and the square's mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 170, (size, size, 3), dtype=np.uint8)
    x0, y0 = rng.integers(0, size // 2, 2)
    side = int(rng.integers(8, size // 2))
    image[y0 : y0 + side, x0 : x0 + side] = COLORS[color]
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return image, mask


def write_squares_dataset(folder: Path, num_rows: int = 48, shards: int = 2, video_every: int = 0) -> Path:
    """Rows "a {color} square ." in `shards` parquet shards; images as files beside them (relative
    paths, as most real datasets are); every `video_every`-th row is a 3-frame video."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = sorted(COLORS)
    rows = []
    for index in range(num_rows):
        color = names[index % len(names)]
        caption = f"a {color} square ."
        if video_every and index % video_every == video_every - 1:
            frames = [colored_square(color, seed=index * 10 + t) for t in range(3)]
            rows.append(
                video_row(
                    id=f"v{index}", masks=[m for _, m in frames], caption=caption, source="squares",
                    frames=[image for image, _ in frames],
                )
            )
            continue
        image, mask = colored_square(color, seed=index)
        relative = f"images/{index:04d}.png"
        Image.fromarray(image).save(folder / relative)
        rows.append(image_row(id=f"r{index}", image=relative, mask=mask, caption=caption, source="squares", category="square"))
    per_shard = -(-len(rows) // shards)
    for shard in range(shards):
        write_shard(rows[shard * per_shard : (shard + 1) * per_shard], folder / f"shard-{shard:05d}.parquet")
    return folder


def save_tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    """A freshly initialised tiny DAM (zero gates, as `from_parts` gives) and its word-level tokenizer."""
    vocabulary = words_of([*PHRASINGS, "a square . in detail one sentence sentences about more than words contains"])
    tokenizer = build_word_level_tokenizer([*COLORS, *vocabulary, *map(str, range(10))])
    torch.manual_seed(seed)
    model = DamForConditionalGeneration(
        tiny_config(tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), len(tokenizer), prompt_template="vicuna_v1")
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.tokenizer = tokenizer
    model.save_pretrained(folder)
    return Path(folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for checkpoint/ and data/")
    parser.add_argument("--rows", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    save_tiny_checkpoint(args.out / "checkpoint")
    write_squares_dataset(args.out / "data", num_rows=args.rows, video_every=8)
    logger.info("wrote %s and %s", args.out / "checkpoint", args.out / "data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
