"""The ShapesDLC synthetic dataset (:mod:`dam.shapes`) written as training shards (:mod:`dam.schema`).

    dam-data synthetic --num-images 10000 --out data/shapes
    write_synthetic_dataset("data/shapes", 10_000, seed=0)    # the same, from Python

Layout of the output folder (load it with ``dam.schema.load_dataset_dir``; row image paths are
relative to it, so pass it as ``root`` to ``decode_row``):

    synthetic.json              manifest {spec, seed, num_images, shard_size}
    shard-00000.parquet, ...    one row per object; shard k holds images [k * shard_size, (k+1) * shard_size)
    images/00000/0000000.png    each image once (lossless PNG), under its shard's folder, referenced
                                by every row of that image

Row ``id`` is ``shapes-{seed}-{image:07d}-{k}`` (k: the object's index in the scene), ``caption``
the object's template caption, ``category`` its shape, ``source`` "shapes". Image ``i`` is
``dam.shapes.scene(seed, i)``, so the content depends on (seed, image index) only.

Resumable: shards and images are written atomically (temporary file, then rename), so a shard
file that exists is complete; a rerun with the same arguments skips every shard whose file and
images exist, touching nothing, and writes the others (and their missing images) with identical
bytes. A folder holds
one dataset: rerunning with another seed, image count or shard size is refused.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic
from dam.schema import image_row, write_shard
from dam.shapes import SPEC, scene

logger = logging.getLogger(__name__)

MANIFEST = "synthetic.json"
SOURCE = "shapes"


def shard_path(out_dir: str | os.PathLike, shard: int) -> Path:
    return Path(out_dir) / f"shard-{shard:05d}.parquet"


def image_relpath(index: int, shard_size: int) -> str:
    """Path of image ``index`` relative to the dataset folder (as stored in its rows)."""
    return f"images/{index // shard_size:05d}/{index:07d}.png"


def _check_count(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DamInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _claim_folder(out_dir: Path, manifest: dict) -> None:
    """Write the manifest into a fresh folder, or check that the folder holds this same dataset."""
    path = out_dir / MANIFEST
    if out_dir.exists() and not out_dir.is_dir():
        raise DamInputError(f"output {str(out_dir)!r} is a file; pass a folder")
    if path.exists():
        found = read_json(path, "synthetic dataset manifest")
        if not isinstance(found, dict):
            found = {}
        different = [f"{key}={found.get(key)!r} (asked: {value!r})" for key, value in manifest.items() if found.get(key) != value]
        if different:
            raise DamInputError(
                f"{str(out_dir)!r} already holds a synthetic dataset with {', '.join(different)}; rerun with "
                f"the values in {MANIFEST} to resume it, or write to another (empty) folder"
            )
        return
    if any(out_dir.glob("*.parquet")):
        raise DamInputError(
            f"{str(out_dir)!r} holds parquet shards but no {MANIFEST}, so they are not this synthetic dataset; "
            f"write to another (empty) folder"
        )
    write_json_atomic(path, manifest)


def save_png_atomic(path: Path, pixels: np.ndarray) -> None:
    """Write ``pixels`` as a PNG at ``path`` through a temporary file, so a killed run leaves no half image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        Image.fromarray(pixels).save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _shard_rows(out_dir: Path, seed: int, images: range, shard_size: int, bar: tqdm) -> Iterator[dict]:
    """Render the images of one shard, save them, and yield their rows (one per object)."""
    for index in images:
        rendered = scene(seed, index)
        relpath = image_relpath(index, shard_size)
        if not (out_dir / relpath).is_file():  # an existing image is complete (atomic writes) and identical
            save_png_atomic(out_dir / relpath, rendered.image)
        for k, (obj, mask) in enumerate(zip(rendered.objects, rendered.masks)):
            yield image_row(
                id=f"{SOURCE}-{seed}-{index:07d}-{k}", image=relpath, mask=mask,
                caption=obj.caption, source=SOURCE, category=obj.shape,
            )
        bar.update(1)


def _complete(out_dir: Path, shard: int, images: range, shard_size: int) -> int | None:
    """Rows of the shard if its file and all its images exist (then it is complete), else None."""
    import pyarrow.parquet as pq

    path = shard_path(out_dir, shard)
    if not path.is_file() or not all((out_dir / image_relpath(i, shard_size)).is_file() for i in images):
        return None
    try:
        return pq.read_metadata(path).num_rows
    except Exception as exc:
        raise DamInputError(f"shard {str(path)!r} is unreadable ({exc}); delete it and rerun to rewrite it") from None


def write_synthetic_dataset(
    out_dir: str | os.PathLike, num_images: int, seed: int = 0, shard_size: int = 1000, progress: bool = True,
) -> int:
    """Write ``num_images`` ShapesDLC scenes to ``out_dir``; returns the dataset's total row count.

    ``shard_size`` is in images. Shards already complete (from an earlier run) are skipped.
    """
    num_images = _check_count("num_images", num_images, 1)
    seed = _check_count("seed", seed, 0)
    shard_size = _check_count("shard_size", shard_size, 1)
    out = Path(out_dir)
    _claim_folder(out, {"spec": SPEC, "seed": seed, "num_images": num_images, "shard_size": shard_size})
    total = written = skipped = 0
    with tqdm(total=num_images, disable=not progress, unit="img", desc="shapes") as bar:
        for shard, start in enumerate(range(0, num_images, shard_size)):
            images = range(start, min(start + shard_size, num_images))
            rows = _complete(out, shard, images, shard_size)
            if rows is None:
                rows = write_shard(_shard_rows(out, seed, images, shard_size, bar), shard_path(out, shard))
                written += 1
            else:
                bar.update(len(images))
                skipped += 1
            total += rows
    logger.info("%s: %d rows from %d images (%d shards written, %d complete already skipped)", out, total, num_images, written, skipped)
    return total
