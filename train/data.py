"""Training data: mixed datasets -> focal-prompt tensors + tokenised conversations -> batches.

- `MixedRegionDataset` mixes datasets in the `dam.schema` layout by weight (a fixed, seeded
  list of (dataset, row) pairs per epoch), decodes a row, phrases its query with the prompt
  augmentation and encodes it with the same `DamProcessor` inference uses, so training and
  inference preprocessing cannot drift. Labels cover only the answer.
- Items are addressed by `epoch * len(dataset) + position` (the sampler emits these keys), so
  the augmentation of an item depends only on (seed, epoch, position): a resumed run sees the
  very same prompts in the very same order as an uninterrupted one.
- Relative image/video paths resolve against the dataset's `root`; unset, against the
  `image_root` a `dam-data merge` recorded in the dataset folder's manifest.json (where the
  pipeline's path-mode rows are relative to), else the dataset's folder.
- A corrupt row (missing file, undecodable image, bad mask) is replaced by the next usable one
  and counted in the batch (`num_corrupt_rows`), never fatal; every dataset is probed at start
  so that a wrong `root` or path stops the run at once instead of skipping everything.
- `LengthGroupedSampler` groups rows of similar length into batches; `DamCollator` pads (left
  or right) with position ids that follow the real tokens either way.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.jsonio import read_json
from dam.processing import IGNORE_INDEX, DamProcessor
from dam.schema import DATASET_MANIFEST, CorruptRowError, DecodedRow, decode_row, load_dataset_dir
from dam.video import sample_masklet_frames
from train.augment import PromptAugmentation
from train.config import DataConfig, DatasetConfig

logger = logging.getLogger(__name__)

_PROBE_ROWS = 4
_MAX_CONSECUTIVE_CORRUPT = 64
_CHARS_PER_TOKEN = 4  # length estimate for grouping, without tokenising every caption up front


@dataclass
class _Source:
    rows: Any  # datasets.Dataset
    root: Path
    key: str  # config key, for messages


def _load_source(spec: DatasetConfig, index: int) -> _Source:
    key = f"data.datasets.{index}"
    try:
        rows = load_dataset_dir(spec.path)
    except Exception as error:
        raise ConfigError(f"{key}.path: {error}") from None
    if len(rows) == 0:
        raise ConfigError(f"{key}.path: {spec.path!r} holds no rows")
    if spec.root:
        root = Path(spec.root)
        if not root.is_dir():
            raise ConfigError(f"{key}.root: {spec.root!r} is not a folder")
        return _Source(rows, root, key)
    path = Path(spec.path)
    return _Source(rows, _manifest_root(path, key) or (path if path.is_dir() else path.parent), key)


def _manifest_root(path: Path, key: str) -> Path | None:
    """The ``image_root`` of a merged dataset folder's manifest.json (None: no manifest, or bytes-mode rows)."""
    manifest = path / DATASET_MANIFEST
    if not manifest.is_file():
        return None
    try:
        image_root = read_json(manifest, "dataset manifest").get("image_root")
    except (DamInputError, AttributeError) as error:
        raise ConfigError(f"{key}.path: {str(manifest)!r} is unreadable ({error}); fix it, or set {key}.root") from None
    if image_root is None:
        return None
    if not Path(image_root).is_dir():
        raise ConfigError(
            f"{key}.root is unset and the image_root {image_root!r} recorded in {str(manifest)!r} is not a folder (images "
            f"moved?); set {key}.root to the folder the rows' image paths are relative to"
        )
    logger.info("%s: relative image paths resolve against %s (image_root of %s)", key, image_root, manifest)
    return Path(image_root)


def _mixture(sizes: Sequence[int], weights: Sequence[float], seed: int) -> np.ndarray:
    """(M, 2) array of (dataset, row): each dataset's rows `weight` times, fractions seeded, shuffled."""
    rng = np.random.default_rng(seed)
    parts = []
    for source, (size, weight) in enumerate(zip(sizes, weights)):
        whole, fraction = int(weight), weight - int(weight)
        rows = [np.arange(size)] * whole
        extra = int(round(fraction * size))
        if extra:
            rows.append(np.sort(rng.choice(size, extra, replace=False)))
        if rows:
            picked = np.concatenate(rows)
            parts.append(np.stack([np.full_like(picked, source), picked], axis=1))
    if not parts:
        raise ConfigError("the dataset weights select no rows: raise data.datasets.N.weight")
    mixture = np.concatenate(parts)
    return mixture[rng.permutation(len(mixture))]


class MixedRegionDataset(Dataset):
    """Training items (input_ids, labels, pixel_values, crop_is_full_image) of mixed datasets."""

    def __init__(
        self,
        config: DataConfig,
        processor: DamProcessor,
        num_video_frames: int,
        seed: int = 0,
    ) -> None:
        self.processor = processor
        self.augmentation: PromptAugmentation = config.augmentation
        self.max_length = config.max_length
        self.num_video_frames = num_video_frames
        self.seed = seed
        self.sources = [_load_source(spec, i) for i, spec in enumerate(config.datasets)]
        self.index = _mixture([len(s.rows) for s in self.sources], [d.weight for d in config.datasets], seed)
        for source in self.sources:
            self._probe(source)
        logger.info(
            "training mixture: %d items from %s",
            len(self.index),
            ", ".join(f"{s.key} ({len(s.rows)} rows)" for s in self.sources),
        )

    def _probe(self, source: _Source) -> None:
        """Stop now if a dataset's first rows are all unusable (wrong path or root)."""
        errors = []
        for row in range(min(_PROBE_ROWS, len(source.rows))):
            try:
                decode_row(source.rows[row], source.root)
                return
            except CorruptRowError as error:
                errors.append(str(error))
        raise ConfigError(
            f"{source.key}: none of the first {len(errors)} rows can be read ({errors[0]}); check "
            f"{source.key}.path and {source.key}.root (relative image paths resolve against {str(source.root)!r})"
        )

    def __len__(self) -> int:
        return len(self.index)

    def lengths(self) -> list[int]:
        """Estimated token count of each item, for length-grouped batching (no decoding)."""
        per_source = []
        tokens_per_frame = self.processor.num_image_tokens
        for source in self.sources:
            columns = source.rows.select_columns(["caption", "frame_masks"])
            captions, frame_masks = columns["caption"], columns["frame_masks"]
            per_source.append(
                [
                    len(caption or "") // _CHARS_PER_TOKEN + tokens_per_frame * min(max(1, len(masks or [])), self.num_video_frames)
                    for caption, masks in zip(captions, frame_masks)
                ]
            )
        return [per_source[s][r] for s, r in self.index]

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, position = divmod(int(key), len(self.index))
        for skipped in range(_MAX_CONSECUTIVE_CORRUPT):
            source_index, row_index = self.index[(position + skipped) % len(self.index)]
            source = self.sources[source_index]
            rng = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + position + skipped)
            try:  # encode raises CorruptRowError too (a prompt longer than max_length)
                item = self.encode(decode_row(source.rows[int(row_index)], source.root), rng)
            except CorruptRowError as error:
                logger.warning("skipping corrupt row of %s: %s", source.key, error)
                continue
            item["num_corrupt_rows"] = skipped
            return item
        raise RuntimeError(
            f"{_MAX_CONSECUTIVE_CORRUPT} consecutive corrupt rows from item {position}: the data is "
            "broken; check it with `dam-data` before training"
        )

    def encode(self, row: DecodedRow, rng: random.Random) -> dict[str, Any]:
        """Model inputs of one decoded row, with a query drawn by the augmentation."""
        frames, masks = row.frames, row.masks
        if row.is_video and len(frames) > self.num_video_frames:
            keep = sample_masklet_frames(masks, self.num_video_frames)
            frames, masks = [frames[i] for i in keep], [masks[i] for i in keep]
        query = self.augmentation.query(row.caption, row.category, rng)
        encoded = self.processor.encode(query, num_frames=len(frames), answer=row.caption)
        input_ids, labels = encoded.input_ids, encoded.labels
        if len(input_ids) > self.max_length:
            prompt_length = sum(1 for label in labels if label == IGNORE_INDEX)
            if prompt_length >= self.max_length:
                raise CorruptRowError(
                    f"row {row.id!r}: its prompt alone has {prompt_length} tokens, more than "
                    f"data.max_length={self.max_length}"
                )
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        prompts = self.processor.focal_prompts(list(zip(frames, masks)))
        return {
            "input_ids": input_ids,
            "labels": labels,
            "pixel_values": self.processor.pixel_values(prompts),
            "crop_is_full_image": torch.tensor([p.crop_is_full_image for p in prompts], dtype=torch.bool),
        }


class LengthGroupedSampler(Sampler[int]):
    """A seeded per-epoch order in which neighbouring batches hold rows of similar length.

    The order is shuffled, cut into mega-batches of `mega_batch_factor * batch_size` items and
    each is sorted by length (longest first), as transformers' sampler does; keys are
    `epoch * n + position` so the dataset knows the epoch. `set_epoch` is called by the Trainer.
    """

    def __init__(
        self,
        lengths: Sequence[int] | None,
        num_items: int,
        batch_size: int,
        seed: int,
        mega_batch_factor: int = 50,
    ) -> None:
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.num_items = num_items
        self.mega_batch = max(1, batch_size * mega_batch_factor)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def order(self, epoch: int) -> np.ndarray:
        """Positions (not keys) of one epoch."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        if self.lengths is None:
            return permutation
        groups = [
            sorted(permutation[i : i + self.mega_batch], key=lambda p: -self.lengths[p])
            for i in range(0, self.num_items, self.mega_batch)
        ]
        return np.concatenate(groups)

    def __iter__(self) -> Iterator[int]:
        offset = self.epoch * self.num_items
        return iter((offset + self.order(self.epoch)).tolist())


class DamCollator:
    """Pads items into a batch; `side` "right" (training default) or "left"."""

    def __init__(self, processor: DamProcessor, side: str = "right") -> None:
        self.processor = processor
        self.side = side

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self.processor.pad([it["input_ids"] for it in items], self.side)
        labels, _ = self.processor.pad([it["labels"] for it in items], self.side, IGNORE_INDEX)
        # Positions count real tokens only, so a left-padded row sees the same positions as unpadded.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_(min=0)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "labels": labels,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),  # (sum F, 8, S, S)
            "crop_is_full_image": torch.cat([it["crop_is_full_image"] for it in items]),
            "num_corrupt_rows": torch.tensor(sum(it.get("num_corrupt_rows", 0) for it in items)),
        }
