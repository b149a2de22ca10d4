"""Visual Genome for the FCLN: the paper's preprocessing, a cached split, and one image per step.

Preprocessing (DenseCap, Johnson et al. 2016, section 4 "Dataset"):
- phrases are lowercased and stripped of punctuation (`dam.visual_genome.normalize_caption`);
- regions with more than `max_words` words (10) are dropped, as are empty phrases and boxes that
  are empty once clipped to the image (`dam.fcln.evaluation.filter_region`, which
  `dam-bench densecap-run` applies to its ground truth too);
- images with fewer than `min_regions_per_image` (20) or more than `max_regions_per_image` (50)
  kept regions are dropped;
- the images are split into train/val/test by id (a split file, or a seeded shuffle);
- the vocabulary is the words seen at least `min_word_count` (15) times in the training split;
  other words become <unk>.

The result (vocabulary, per split: image ids, image files, the boxes' frame sizes, boxes, encoded
captions, and for val/test the normalised phrases) is cached in output_dir/preprocessed/ with a
fingerprint of the data settings and input files, so reruns, resumes and evaluations reuse it.

Boxes stay in the frame of image_data.json (or of the image file when there is none) and are
scaled into the network's input (longer side 720) when an image is loaded, so a file whose pixels
differ in size from image_data.json still gets its boxes in the right place.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
from collections.abc import Hashable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.fcln import FclnImageProcessor, FclnVocabulary, build_vocabulary
from dam.fcln.evaluation import filter_region, region_descriptions_entry
from dam.images import image_file_size, load_image
from dam.jsonio import read_json, write_json_atomic
from dam.visual_genome import load_region_descriptions
from train.fcln_config import FclnDataConfig

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CACHE_DIR = "preprocessed"
CACHE_FILE = "dataset.pt"
CACHE_VERSION = 1
_VG_IMAGE_FOLDERS = ("images", "VG_100K", "VG_100K_2")


@dataclass
class FclnSplit:
    """One split's images and their kept regions, regions of image i at offsets[i]:offsets[i+1]."""

    image_ids: list[Hashable]
    image_paths: list[str]
    sizes: torch.Tensor  # (N, 2) long: (height, width) of the frame the boxes are given in
    offsets: torch.Tensor  # (N + 1,) long
    boxes: torch.Tensor  # (R, 4) float32 xyxy in that frame
    captions: torch.Tensor  # (R, L) long word ids, L <= max_words, right-padded with <pad>
    phrases: list[str] | None  # (R,) normalised phrases (val/test only: the evaluation's references)

    def __len__(self) -> int:
        return len(self.image_ids)

    def regions(self, index: int) -> slice:
        return slice(int(self.offsets[index]), int(self.offsets[index + 1]))

    def to_state(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FclnPreprocessed:
    """The cached result of `preprocess`."""

    vocabulary: list[str]
    splits: dict[str, FclnSplit]
    stats: dict[str, int]
    fingerprint: dict[str, Any]


def _file_stamp(path: str | None) -> dict[str, Any] | None:
    """Size and modification time of an input file: a changed file invalidates the cache."""
    if path is None:
        return None
    stat = os.stat(path)
    return {"path": os.path.abspath(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def resolve_image_data(config: FclnDataConfig) -> str | None:
    """The image_data.json to use: the configured one, or the one beside region_descriptions."""
    if config.image_data is not None:
        if not Path(config.image_data).is_file():
            raise ConfigError(
                f"data.image_data: {config.image_data!r} does not exist; give VG's image_data.json or null"
            )
        return config.image_data
    beside = Path(config.region_descriptions).parent / "image_data.json"
    return str(beside) if beside.is_file() else None


def resolve_image_dirs(config: FclnDataConfig) -> list[Path]:
    """The folders searched for images (see FclnDataConfig.image_dirs)."""
    if config.image_dirs:
        missing = [d for d in config.image_dirs if not Path(d).is_dir()]
        if missing:
            raise ConfigError(f"data.image_dirs: {missing[0]!r} is not a folder; list the folders holding the images")
        return [Path(d) for d in config.image_dirs]
    root = Path(config.region_descriptions).parent
    found = [root / name for name in _VG_IMAGE_FOLDERS if (root / name).is_dir()]
    if not found:
        raise ConfigError(
            f"data.image_dirs is empty and none of {', '.join(_VG_IMAGE_FOLDERS)} exists beside "
            f"{config.region_descriptions!r}; set data.image_dirs to the folders holding the images"
        )
    return found


def fingerprint(config: FclnDataConfig) -> dict[str, Any]:
    """What the cached preprocessing depends on (settings and input files, not num_workers)."""
    settings = asdict(config)
    settings.pop("num_workers")
    region_file = config.region_descriptions
    if not Path(region_file).is_file():
        raise ConfigError(
            f"data.region_descriptions: {region_file!r} does not exist; give Visual Genome's region_descriptions.json"
        )
    if config.split_file is not None and not Path(config.split_file).is_file():
        raise ConfigError(f"data.split_file: {config.split_file!r} does not exist; give a JSON of train/val/test ids or null")
    return {
        "version": CACHE_VERSION,
        "settings": settings,
        "image_dirs": [os.path.abspath(d) for d in resolve_image_dirs(config)],
        "region_descriptions": _file_stamp(region_file),
        "image_data": _file_stamp(resolve_image_data(config)),
        "split_file": _file_stamp(config.split_file),
    }


def _read_image_sizes(path: str) -> dict[str, tuple[int, int]]:
    """{str(image_id): (height, width)} of an image_data.json."""
    data = read_json(path, "image data")
    if not isinstance(data, list):
        raise DamInputError(f"image data file {path!r} must be a list of {{\"image_id\", \"width\", \"height\"}}")
    sizes = {}
    for index, entry in enumerate(data):
        image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        if image_id is None or not all(isinstance(entry.get(k), int) and entry[k] > 0 for k in ("width", "height")):
            raise DamInputError(
                f"image data file {path!r}: entry {index} needs an 'image_id' and positive integer 'width' and 'height'"
            )
        sizes[str(image_id)] = (entry["height"], entry["width"])
    return sizes


def _find_image(image_id: Hashable, folders: list[Path], patterns: list[str]) -> Path | None:
    for folder in folders:
        for pattern in patterns:
            path = folder / pattern.format(image_id=image_id)
            if path.is_file():
                return path
    return None


def _file_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the file's header (no decoding), or None when it is unreadable."""
    try:
        return image_file_size(path)
    except DamInputError:
        return None


def _sort_key(image_id: Hashable) -> tuple[str, Any]:
    return (type(image_id).__name__, image_id)


def split_image_ids(ids: list[Hashable], config: FclnDataConfig) -> dict[str, list[Hashable]]:
    """Train/val/test ids: from the split file, or a seeded shuffle of the sorted ids (the file's
    order does not matter, so the same images give the same split everywhere)."""
    if config.split_file is not None:
        data = read_json(config.split_file, "split")
        if not isinstance(data, dict) or not all(isinstance(data.get(name), list) for name in SPLITS):
            raise DamInputError(
                f"split file {config.split_file!r} must be a JSON object with lists 'train', 'val' and 'test' of image ids"
            )
        known = {str(image_id): image_id for image_id in ids}
        splits, seen = {}, set()
        for name in SPLITS:
            listed = [str(image_id) for image_id in data[name]]
            kept = [known[key] for key in listed if key in known and key not in seen]
            seen.update(listed)
            if len(kept) < len(listed):
                logger.warning("split file: %d of %d %s ids are not among the kept images (filtered out or "
                               "missing files)", len(listed) - len(kept), len(listed), name)
            splits[name] = kept
        unused = len(known) - sum(len(s) for s in splits.values())
        if unused:
            logger.info("split file: %d kept images are in no split and are not used", unused)
        return splits
    order = sorted(ids, key=_sort_key)
    random.Random(config.split_seed).shuffle(order)
    held_out = config.num_test + config.num_val
    if held_out >= len(order):
        raise ConfigError(
            f"data.num_test={config.num_test} + data.num_val={config.num_val} leaves no training image out of the "
            f"{len(order)} kept; lower them (or relax data.min_regions_per_image / max_regions_per_image)"
        )
    rest = order[held_out:]
    if config.num_train is not None:
        if config.num_train > len(rest):
            logger.warning("data.num_train=%d but only %d images remain for training", config.num_train, len(rest))
        rest = rest[: config.num_train]
    return {"test": order[: config.num_test], "val": order[config.num_test : held_out], "train": rest}


def preprocess(config: FclnDataConfig, progress: bool = True) -> FclnPreprocessed:
    """Read, filter, split and encode Visual Genome as the paper did (see the module docstring)."""
    stamp = fingerprint(config)
    folders = resolve_image_dirs(config)
    images = load_region_descriptions(config.region_descriptions, max_images=config.max_images)
    image_data = resolve_image_data(config)
    recorded = _read_image_sizes(image_data) if image_data else {}
    stats = dict.fromkeys(
        ("images_read", "regions_read", "images_without_file", "images_without_size", "regions_too_long",
         "regions_empty_phrase", "regions_empty_box", "images_too_few_regions", "images_too_many_regions"), 0
    )
    stats["images_read"] = len(images)
    kept: dict[Hashable, dict[str, Any]] = {}
    for image_id, regions in tqdm(images.items(), desc="preprocessing", unit="img", disable=not progress):
        stats["regions_read"] += len(regions)
        path = _find_image(image_id, folders, config.image_patterns)
        if path is None:
            stats["images_without_file"] += 1
            continue
        size = recorded.get(str(image_id)) or _file_size(path)
        if size is None:
            stats["images_without_size"] += 1
            continue
        height, width = size
        boxes, phrases = [], []
        for region in regions:
            kept_region = filter_region(region.phrase, region.box, height, width, config.max_words)
            if isinstance(kept_region, str):
                stats[kept_region] += 1
                continue
            phrase, box = kept_region
            boxes.append(box)
            phrases.append(phrase)
        if not boxes or (config.min_regions_per_image is not None and len(boxes) < config.min_regions_per_image):
            stats["images_too_few_regions"] += 1
            continue
        if config.max_regions_per_image is not None and len(boxes) > config.max_regions_per_image:
            stats["images_too_many_regions"] += 1
            continue
        kept[image_id] = {"path": str(path), "size": (height, width), "boxes": boxes, "phrases": phrases}
    if stats["images_without_file"]:
        example = next(iter(image_id for image_id in images if image_id not in kept), None)
        logger.warning(
            "%d of %d images have no file in %s named %s (e.g. image %r); they are skipped",
            stats["images_without_file"], len(images), [str(f) for f in folders], config.image_patterns, example,
        )
    if not kept:
        raise DamInputError(
            f"no image of {config.region_descriptions!r} is left after preprocessing ({json.dumps(stats)}); check "
            "data.image_dirs / data.image_patterns and relax data.min_regions_per_image, max_regions_per_image or max_words"
        )
    ids = split_image_ids(list(kept), config)
    if not ids["train"]:
        raise DamInputError("the training split is empty; check data.split_file or data.num_train")
    words = build_vocabulary((p for image_id in ids["train"] for p in kept[image_id]["phrases"]), config.min_word_count)
    vocabulary = FclnVocabulary(words)
    splits = {name: _encode_split(ids[name], kept, vocabulary, config.max_words, name != "train") for name in SPLITS}
    stats.update({f"{name}_images": len(split) for name, split in splits.items()})
    stats.update({f"{name}_regions": int(split.offsets[-1]) for name, split in splits.items()})
    stats["vocabulary_size"] = len(vocabulary)
    logger.info("preprocessed: %s", ", ".join(f"{key}={value}" for key, value in stats.items()))
    return FclnPreprocessed(vocabulary.words, splits, stats, stamp)


def _encode_split(ids: list[Hashable], kept: dict[Hashable, dict[str, Any]], vocabulary: FclnVocabulary,
                  max_words: int, keep_phrases: bool) -> FclnSplit:
    phrases = [p for image_id in ids for p in kept[image_id]["phrases"]]
    counts = [len(kept[image_id]["boxes"]) for image_id in ids]
    offsets = torch.zeros(len(ids) + 1, dtype=torch.long)
    offsets[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    boxes = torch.tensor([b for image_id in ids for b in kept[image_id]["boxes"]], dtype=torch.float32).reshape(-1, 4)
    return FclnSplit(
        image_ids=list(ids),
        image_paths=[kept[image_id]["path"] for image_id in ids],
        sizes=torch.tensor([kept[image_id]["size"] for image_id in ids], dtype=torch.long).reshape(-1, 2),
        offsets=offsets,
        boxes=boxes,
        captions=vocabulary.encode_batch(phrases, max_words),
        phrases=phrases if keep_phrases else None,
    )


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_preprocess(config: FclnDataConfig, output_dir: str | Path, *, must_match: bool = False,
                       progress: bool = True) -> FclnPreprocessed:
    """The preprocessed data cached in output_dir/preprocessed/, built first when missing or stale.

    With `must_match` (resuming a run), a cache built from other settings or files is an error:
    the checkpoint's vocabulary belongs to it.
    """
    path = Path(output_dir) / CACHE_DIR / CACHE_FILE
    stamp = fingerprint(config)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("fingerprint") == stamp:
            logger.info("reusing the preprocessed data in %s", path)
            splits = {name: FclnSplit(**split) for name, split in state["splits"].items()}
            return FclnPreprocessed(state["vocabulary"], splits, state["stats"], state["fingerprint"])
        if must_match:
            raise ConfigError(
                f"{path} was preprocessed with other data settings or input files than the config's; resume with "
                "the run's original data section, or start a new training.output_dir"
            )
        logger.warning("the data settings or input files changed since %s was written; preprocessing again", path)
    data = preprocess(config, progress)
    state = {"fingerprint": data.fingerprint, "vocabulary": data.vocabulary, "stats": data.stats,
             "splits": {name: split.to_state() for name, split in data.splits.items()}}
    _save_atomic(state, path)
    write_json_atomic(path.parent / "vocabulary.json", data.vocabulary)
    write_json_atomic(path.parent / "stats.json", data.stats)
    return data


@dataclass
class FclnExample:
    """One image ready for the network, with its targets in network-input pixels."""

    index: int
    image_id: Hashable
    pixels: torch.Tensor | None  # (3, h, w) normalised; None when the file could not be read
    boxes: torch.Tensor  # (G, 4) xyxy in input pixels
    captions: torch.Tensor  # (G, L) word ids
    scale: tuple[float, float]  # (sx, sy): input pixels per pixel of the boxes' frame
    error: str | None = None


class FclnImageDataset(Dataset):
    """Images of a split resized by the model's FclnImageProcessor, boxes scaled to match.

    An unreadable image gives an example with `pixels` None and the error, so that one corrupt file
    among 77,000 skips a step instead of ending a days-long run.
    """

    def __init__(self, split: FclnSplit, processor: FclnImageProcessor) -> None:
        self.split = split
        self.processor = processor

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> FclnExample:
        split = self.split
        regions = split.regions(index)
        boxes, captions = split.boxes[regions], split.captions[regions]
        image_id = split.image_ids[index]
        try:
            pixels = self.processor(load_image(split.image_paths[index])).pixel_values[0]  # (3, h, w)
        except DamInputError as error:
            return FclnExample(index, image_id, None, boxes, captions, (1.0, 1.0), str(error))
        frame_height, frame_width = (int(v) for v in split.sizes[index])
        scale = (pixels.shape[-1] / frame_width, pixels.shape[-2] / frame_height)
        scaled = boxes * boxes.new_tensor([scale[0], scale[1], scale[0], scale[1]])
        return FclnExample(index, image_id, pixels, scaled, captions, scale)


def unbatched(example: FclnExample) -> FclnExample:
    """The DataLoader's collate function: one image per step, passed through as is."""
    return example


def epoch_order(num_images: int, seed: int, epoch: int) -> torch.Tensor:
    """The image order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_images, generator=generator)


class IterationSampler(Sampler[int]):
    """Image indices of iterations [start, stop): iteration i is image epoch_order(seed, i // N)[i % N].

    The order is a function of the iteration number alone, so a resumed run sees exactly the
    images the uninterrupted run would have, without saving any sampler state.
    """

    def __init__(self, num_images: int, seed: int, start: int, stop: int) -> None:
        if num_images < 1:
            raise DamInputError("the training split has no images")
        self.num_images, self.seed, self.start, self.stop = num_images, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[int]:
        epoch, order = -1, None
        for iteration in range(self.start, self.stop):
            current, position = divmod(iteration, self.num_images)
            if current != epoch:
                epoch, order = current, epoch_order(self.num_images, self.seed, current)
            yield int(order[position])


def split_ground_truth(split: FclnSplit, max_images: int | None = None) -> list[dict[str, Any]]:
    """The kept regions of a split in VG's region_descriptions.json layout (for `dam-bench densecap
    --gt`): boxes clipped, phrases normalised, long phrases already dropped."""
    if split.phrases is None:
        raise DamInputError("the training split keeps no phrases; evaluate the val or test split")
    count = len(split) if max_images is None else min(max_images, len(split))
    entries = []
    for index in range(count):
        regions = split.regions(index)
        image_id = split.image_ids[index]
        entries.append(region_descriptions_entry(image_id, split.boxes[regions].tolist(), split.phrases[regions]))
    return entries
