"""Tiny training runs for CPU tests: a saved tiny DAM, a small learnable dataset, a config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dam.schema import image_row, video_row, write_shard
from tests.factories import tiny_dam, tiny_tokenizer

COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (235, 205, 40)}


def save_tiny_checkpoint(folder: Path) -> Path:
    """A tiny DAM (zero-initialised new modules, as a fresh DAM is) with its tokenizer."""
    model = tiny_dam(seed=0, perturb_new_modules=False)
    model.tokenizer = tiny_tokenizer()
    model.save_pretrained(folder)
    return folder


def colored_square(color: str, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A gray noisy image with one colored square; its mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(90, 170, (size, size, 3), dtype=np.uint8)
    x0, y0 = rng.integers(0, size // 2, 2)
    side = int(rng.integers(8, size // 2))
    image[y0 : y0 + side, x0 : x0 + side] = COLORS[color]
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return image, mask


def write_squares_dataset(folder: Path, num_rows: int = 48, shards: int = 2, video_every: int = 0) -> Path:
    """Rows "a {color} square ." (learnable from pixels); every `video_every`-th row is a 3-frame video.

    Images are stored as files next to the shards (relative paths), as most real datasets are.
    """
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
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


def tiny_train_overrides(checkpoint: Path, data: Path, output: Path, **extra: object) -> list[str]:
    """Overrides turning configs/train/tiny_cpu.yaml into a run on the given checkpoint and data."""
    values = {
        "model.checkpoint": str(checkpoint),
        "data.datasets": f"[{{path: {data}}}]",
        "training.output_dir": str(output),
    }
    values.update({key: str(value) for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]
