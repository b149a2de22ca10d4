"""The training-row schema: the one definition shared by ``train/`` and ``data_pipeline/``.

Datasets are Hugging Face ``datasets`` stored as parquet shards. Every row has every column;
columns a row does not use are null (scalars) or empty (lists).

=================  ==========================================  ===============================
column             type                                        meaning
=================  ==========================================  ===============================
``id``             string                                      unique within a dataset
``source``         string                                      origin: "coco", "sa1b", "sav"...
``caption``        string                                      the region's description
``category``       string | null                               class name, when known
``image``          {bytes: binary|null, path: string|null}     image rows: encoded PNG/JPEG, or
                   | null (``datasets.Image(decode=False)``)   a path (relative to the dataset)
``mask``           {size: [h, w] int32, counts: string}        image rows: COCO compressed RLE
                   | null                                      (as ``dam.masks.mask_to_rle``)
``frames``         list of Image(decode=False)                 video rows given as images
``video``          string | null                               video rows: path to an mp4
``frame_indices``  list[int32]                                 frames of ``video`` used
``frame_masks``    list of RLE                                 video rows: one mask per frame
=================  ==========================================  ===============================

An image row sets ``image`` and ``mask``; a video row sets ``frame_masks`` and either
``frames`` or ``video`` + ``frame_indices``. Build rows with :func:`image_row` /
:func:`video_row` (they validate), write them with :func:`write_shard`, read them back with
:func:`load_dataset_dir` and :func:`decode_row` (``root``: the folder of the shards, which
relative paths are relative to). ``datasets`` / ``pyarrow`` are imported lazily, so ``dam``
imports without them.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from dam.errors import DamInputError
from dam.images import load_image, open_image_file
from dam.masks import load_mask, mask_to_rle, rle_to_mask
from dam.video import read_video_frames

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DATASET_MANIFEST = "manifest.json"  # a merged dataset's record (image_root, shards); dam-data writes it, dam-train reads it
COLUMNS = ("id", "source", "caption", "category", "image", "mask", "frames", "video", "frame_indices", "frame_masks")
_VERSION_KEY = b"dam_schema_version"  # parquet metadata key; shards newer than the code are refused
_ROW_GROUP = 100  # rows per parquet row group: image rows are large and readers stream by group
_MAKE_DATA = "create one with `dam-data` (or dam.schema.write_shard)"


def features() -> "datasets.Features":
    """The ``datasets.Features`` of a training dataset (see the module docstring)."""
    from datasets import Features, Image as HFImage, List, Value

    rle = {"size": List(Value("int32"), length=2), "counts": Value("string")}
    return Features({
        "id": Value("string"), "source": Value("string"), "caption": Value("string"),
        "category": Value("string"), "image": HFImage(decode=False), "mask": rle,
        "frames": List(HFImage(decode=False)), "video": Value("string"),
        "frame_indices": List(Value("int32")), "frame_masks": List(rle),
    })


class CorruptRowError(DamInputError):
    """A stored row cannot be decoded; the message names the row id and the problem."""


@dataclass
class DecodedRow:
    """A row ready for training: uint8 (H, W, 3) frames and bool (H, W) masks, one per frame."""

    id: str
    source: str
    caption: str
    category: str | None
    frames: list[np.ndarray]
    masks: list[np.ndarray]
    is_video: bool


def _text(value: Any, field: str, optional: bool = False) -> str | None:
    if (value is None and optional) or (isinstance(value, str) and value.strip()):
        return value
    raise DamInputError(f"{field} must be a non-empty string, got {value!r}")


def _image_cell(image: Any, field: str) -> tuple[dict, tuple[int, int] | None]:
    """(Image storage dict, (H, W) when known without reading a file) of bytes / a path / an array."""
    if isinstance(image, (bytes, bytearray)):
        try:  # reads the header only
            with Image.open(io.BytesIO(image)) as img:
                width, height = img.size
                if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF rotation swaps the axes
                    width, height = height, width
        except Exception as exc:
            raise DamInputError(f"{field}: bytes are not an encoded image ({exc}); pass PNG or JPEG bytes") from None
        return {"bytes": bytes(image), "path": None}, (height, width)
    if isinstance(image, (str, os.PathLike)):
        return {"bytes": None, "path": _text(os.fspath(image), f"{field} path")}, None
    if isinstance(image, np.ndarray):
        pixels, buffer = load_image(image), io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}, pixels.shape[:2]
    raise DamInputError(f"{field} is a {type(image).__name__}; pass PNG/JPEG bytes, a path or a uint8 (H, W, 3) array")


def _rle(mask: Any, field: str, size: tuple[int, int] | None) -> dict:
    try:
        return mask_to_rle(load_mask(mask, size))  # re-encoding gives canonical str counts
    except DamInputError as exc:
        raise DamInputError(f"{field}: {exc}") from None


def _base(id: str, caption: str, source: str, category: str | None) -> dict:
    return {
        "id": _text(id, "id"), "source": _text(source, "source"), "caption": _text(caption, "caption"),
        "category": _text(category, "category", optional=True), "image": None, "mask": None,
        "frames": [], "video": None, "frame_indices": [], "frame_masks": [],
    }


def image_row(id: str, image: Any, mask: Any, caption: str, source: str, category: str | None = None) -> dict:
    """A validated image row. ``image``: PNG/JPEG bytes, a path (stored as given) or a uint8
    (H, W, 3) array (stored as PNG); ``mask``: bool array or COCO RLE, non-empty, image-sized."""
    row = _base(id, caption, source, category)
    row["image"], size = _image_cell(image, "image")
    row["mask"] = _rle(mask, "mask", size)
    return row


def video_row(
    id: str, masks: Sequence[Any], caption: str, source: str, category: str | None = None,
    frames: Sequence[Any] | None = None, video: str | os.PathLike | None = None,
    frame_indices: Sequence[int] | None = None,
) -> dict:
    """A validated video row: one non-empty mask per frame, the frames given either as
    ``frames`` (bytes / paths / arrays) or as ``video`` (an mp4 path) at ``frame_indices``."""
    row = _base(id, caption, source, category)
    if (frames is None) == (video is None):
        raise DamInputError("give exactly one of frames (a list of images) or video (an mp4 path + frame_indices)")
    if isinstance(masks, (str, bytes, dict)) or not isinstance(masks, Sequence) or not masks:
        raise DamInputError("masks must be a non-empty list with one mask per frame")
    sizes: list[tuple[int, int] | None] = [None] * len(masks)
    if frames is not None:
        if isinstance(frames, (str, bytes, os.PathLike)):
            raise DamInputError("frames must be a list of images (bytes / paths / arrays), one per mask")
        if frame_indices is not None:
            raise DamInputError("frame_indices only applies to video; leave it out when giving frames")
        if len(frames) != len(masks):
            raise DamInputError(f"{len(frames)} frames but {len(masks)} masks; give one mask per frame")
        cells = [_image_cell(f, f"frames[{t}]") for t, f in enumerate(frames)]
        row["frames"], sizes = [c for c, _ in cells], [s for _, s in cells]
    else:
        row["video"] = _text(os.fspath(video) if isinstance(video, os.PathLike) else video, "video path")
        if frame_indices is None or len(frame_indices) != len(masks):
            got = "none" if frame_indices is None else len(frame_indices)
            raise DamInputError(f"video needs frame_indices, one per mask ({len(masks)}); got {got}")
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in frame_indices):
            raise DamInputError(f"frame_indices must be non-negative integers, got {list(frame_indices)!r}")
        row["frame_indices"] = [int(i) for i in frame_indices]
    row["frame_masks"] = [_rle(m, f"masks[{t}]", s) for t, (m, s) in enumerate(zip(masks, sizes))]
    if len({tuple(r["size"]) for r in row["frame_masks"]}) > 1:
        raise DamInputError("masks have different sizes; all frames of a video have one size")
    return row


def row_num_frames(row: dict) -> int:
    """Frames a row holds (1 for image rows), without decoding anything."""
    if row.get("frames"):
        return len(row["frames"])
    if row.get("video") is not None:
        return len(row.get("frame_indices") or [])
    return int(row.get("image") is not None)


def _existing(path: str, root: str | Path | None, what: str) -> Path:
    resolved = Path(path) if Path(path).is_absolute() or root is None else Path(root) / path
    if not resolved.is_file():
        raise DamInputError(f"{what} file {str(resolved)!r} does not exist")
    return resolved


def _decode_image(cell: dict, root: str | Path | None) -> np.ndarray:
    if cell.get("bytes") is None:
        return load_image(open_image_file(_existing(cell.get("path") or "", root, "image")))
    try:
        with Image.open(io.BytesIO(cell["bytes"])) as img:
            img.load()
            img = ImageOps.exif_transpose(img)  # as open_image_file does for files
    except Exception as exc:
        raise DamInputError(f"image bytes cannot be decoded ({type(exc).__name__}: {exc})") from None
    return load_image(img)


def _decode_media(row: dict, root: str | Path | None) -> tuple[list[np.ndarray], list[Any], bool]:
    """(frames, their RLEs, is_video) of a row, with the row's structure checked."""
    image, frames, video = row.get("image"), row.get("frames") or [], row.get("video")
    kinds = [name for name, used in (("image", image is not None), ("frames", frames), ("video", video)) if used]
    if len(kinds) != 1:
        raise DamInputError(f"has {' and '.join(kinds)}; a row has exactly one" if kinds else "has no image and no frames")
    if image is not None:
        return [_decode_image(image, root)], [row.get("mask")], False
    rles = list(row.get("frame_masks") or [])
    count = len(frames) if frames else len(row.get("frame_indices") or [])
    if count == 0 or count != len(rles):
        raise DamInputError(f"{count} frames but {len(rles)} frame_masks; need one mask per frame (and >= 1)")
    if frames:
        return [_decode_image(cell, root) for cell in frames], rles, True
    return read_video_frames(_existing(video, root, "video"), row["frame_indices"]), rles, True


def decode_row(row: dict, root: str | Path | None = None) -> DecodedRow:
    """Decode a stored row; relative paths are resolved against ``root`` (the dataset folder).

    Any problem raises :class:`CorruptRowError` naming the row id.
    """
    try:
        caption = row.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise DamInputError(f"empty caption {caption!r}")
        frames, rles, is_video = _decode_media(row, root)
        masks = []
        for t, (frame, rle) in enumerate(zip(frames, rles)):
            if rle is None:
                raise DamInputError(f"mask {t} is missing")
            mask = rle_to_mask(rle)
            if mask.shape != frame.shape[:2]:
                raise DamInputError(f"mask {t} is {mask.shape} (H, W) but its image is {frame.shape[:2]}")
            if not mask.any():
                raise DamInputError(f"mask {t} is empty")
            masks.append(mask)
    except (DamInputError, KeyError, TypeError, ValueError, OSError) as exc:
        raise CorruptRowError(f"row {row.get('id')!r} is corrupt: {exc}") from exc
    return DecodedRow(row.get("id"), row.get("source"), caption, row.get("category"), frames, masks, is_video)


def temp_path(path: Path) -> Path:
    """A fresh hidden temp file beside ``path`` (``.{name}.{uuid}.tmp``; dam.jsonio.write_json_atomic's are alike)."""
    return path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temp files of ``path`` (see ``temp_path``) that a writer killed mid-write left behind."""
    path = Path(path)
    return sorted(path.parent.glob(f".{path.name}.*.tmp"))


def write_shard(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write ``rows`` to the parquet shard ``path`` atomically; return the number of rows.

    The file carries the HF feature metadata, so ``datasets`` restores the Image columns.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = features().arrow_schema
    schema = schema.with_metadata({**(schema.metadata or {}), _VERSION_KEY: str(SCHEMA_VERSION).encode()})
    tmp = temp_path(path)
    count, ids, batch = 0, set(), []
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for row in rows:
                if not isinstance(row, dict) or set(row) != set(COLUMNS):
                    got = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise DamInputError(f"row {count} for {str(path)!r} has columns {got}, not {list(COLUMNS)}; build rows with image_row / video_row")
                if row["id"] in ids:
                    raise DamInputError(f"row id {row['id']!r} appears twice in {str(path)!r}; ids must be unique")
                ids.add(row["id"])
                batch.append(row)
                count += 1
                if len(batch) == _ROW_GROUP:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            if batch:  # an empty shard gets no row group: datasets cannot read a 0-row group
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("wrote %d rows to %s", count, path)
    return count


def shard_files(path: str | os.PathLike) -> list[Path]:
    """The parquet shards of a dataset: ``path`` itself, or the sorted ``*.parquet`` in it."""
    p = Path(path)
    if not p.exists():
        raise DamInputError(f"dataset path {str(p)!r} does not exist; {_MAKE_DATA}")
    files = [p] if p.is_file() else sorted(f for f in p.glob("*.parquet") if f.is_file())
    if not files:
        raise DamInputError(f"dataset folder {str(p)!r} holds no *.parquet shards; {_MAKE_DATA}")
    return files


def load_dataset_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> "datasets.Dataset":
    """A parquet shard or a folder of shards as a ``datasets.Dataset``, images not decoded.

    ``cache_dir``: where ``datasets`` keeps its arrow copy (default: the HF datasets cache).
    """
    import datasets
    import pyarrow.parquet as pq

    nonempty = []
    for f in shard_files(path):
        try:
            meta = pq.read_metadata(f)
            schema = meta.schema.to_arrow_schema()
        except Exception as exc:
            raise DamInputError(f"shard {str(f)!r} is not a readable parquet file ({exc}); rewrite it") from None
        missing = [c for c in COLUMNS if c not in schema.names]
        if missing:
            raise DamInputError(f"shard {str(f)!r} lacks column(s) {missing}; write shards with dam.schema.write_shard")
        version = int((schema.metadata or {}).get(_VERSION_KEY, b"0"))
        if version > SCHEMA_VERSION:
            raise DamInputError(f"shard {str(f)!r} has schema version {version} > {SCHEMA_VERSION}; upgrade the toolkit")
        if meta.num_rows:  # datasets cannot read 0-row shards, which hold nothing anyway
            nonempty.append(str(f))
    if not nonempty:
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}, features=features())
    ds = datasets.Dataset.from_parquet(nonempty, cache_dir=None if cache_dir is None else str(cache_dir)).select_columns(list(COLUMNS))
    return ds if ds.features == features() else ds.cast(features())
