"""DLC-Bench captions: describe every annotated region of DLC-Bench with a DAM, resumably.

Reads `DLC-bench/annotations.json` (COCO format) and `DLC-bench/images/`, turns each
annotation's segmentation into a mask with pycocotools (`COCO.annToMask`, as the reference
script does), captions the regions greedily with `DescribeAnything.describe_batch` (one
`generate` per batch) and writes {ann_id: caption, ..., "query": query}, the predictions file
`dam-bench dlc-score` reads. The file is rewritten atomically every few batches, so a killed
run loses at most those batches, and a rerun of the same command skips every id it already
holds. Images are read as stored (no EXIF rotation), since the COCO masks index raw pixels.

    dam-bench dlc-outputs --model path/to/dam --data-root DLC-bench --out preds.json --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic

from bench.harness import run_benchmark

logger = logging.getLogger(__name__)

QUERY_KEY = "query"


def load_annotations(data_root: str | Path) -> tuple[Any, list[dict[str, Any]], Path]:
    """(pycocotools COCO index, annotations in file order, images folder) of a DLC-Bench folder."""
    from pycocotools.coco import COCO

    root = Path(data_root)
    ann_path, images_dir = root / "annotations.json", root / "images"
    hint = "point --data-root at the DLC-bench folder that holds annotations.json and images/"
    if not ann_path.is_file():
        raise DamInputError(f"DLC-Bench annotations {ann_path} do not exist; {hint}")
    if not images_dir.is_dir():
        raise DamInputError(f"DLC-Bench images folder {images_dir} does not exist; {hint}")
    dataset = read_json(ann_path, "DLC-Bench annotations")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("annotations"), list) or not isinstance(
        dataset.get("images"), list
    ):
        raise DamInputError(f"{ann_path} is not a COCO annotation file (it needs 'images' and 'annotations' lists)")
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco.createIndex()
    for ann in dataset["annotations"]:
        if ann.get("image_id") not in coco.imgs:
            raise DamInputError(f"annotation {ann.get('id')!r} of {ann_path} names image_id {ann.get('image_id')!r}, "
                                "which is not among its images")
    return coco, list(dataset["annotations"]), images_dir


def _read_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DamInputError(f"DLC-Bench image {path} does not exist; is images/ complete?")
    try:
        with Image.open(path) as img:
            return np.array(img.convert("RGB"))  # writable, as torch.from_numpy wants
    except (OSError, UnidentifiedImageError) as exc:
        raise DamInputError(f"DLC-Bench image {path} could not be read ({exc})") from exc


def _region(coco: Any, ann: dict[str, Any], images_dir: Path, cache: dict[int, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    info = coco.imgs[ann["image_id"]]
    image = cache.get(ann["image_id"])
    if image is None:
        image = cache[ann["image_id"]] = _read_image(images_dir / info["file_name"])
    if image.shape[:2] != (info["height"], info["width"]):
        raise DamInputError(
            f"image {info['file_name']} is {image.shape[1]}x{image.shape[0]} but annotations.json says "
            f"{info['width']}x{info['height']}; use the images distributed with these annotations"
        )
    mask = coco.annToMask(ann).astype(bool)
    if not mask.any():
        raise DamInputError(f"annotation {ann['id']} (image {info['file_name']}) has an empty segmentation mask")
    return image, mask


def _ordered(anns: list[dict[str, Any]], captions: dict[str, Any], query: str) -> dict[str, Any]:
    """Annotation order, then ids of the file that are not annotations any more, query last."""
    out = {str(a["id"]): captions[str(a["id"])] for a in anns if str(a["id"]) in captions}
    out.update({k: v for k, v in captions.items() if k not in out and k != QUERY_KEY})
    out[QUERY_KEY] = query
    return out


def describe_dlc_bench(
    describer: Any,
    data_root: str | Path,
    out: str | Path,
    *,
    batch_size: int = 32,
    query: str | None = None,
    flush_every: int = 4,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Caption every DLC-Bench region with `describer` (a DescribeAnything) into `out`.

    Args:
        data_root: the DLC-bench folder (annotations.json, images/).
        out: predictions JSON; ids it already holds are not described again.
        batch_size: regions per `generate`.
        query: the prompt (default: the model's default query); stored under "query".
        flush_every: rewrite `out` after this many batches.
        **generate_kwargs: passed to `describe_batch` (greedy unless overridden).

    Returns the predictions written, {ann_id: caption, ..., "query": query}.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise DamInputError(f"--batch-size must be at least 1, got {batch_size}")
    if flush_every < 1:
        raise DamInputError(f"--flush-every must be at least 1, got {flush_every}")
    query = query or describer.processor.default_query
    coco, anns, images_dir = load_annotations(data_root)

    captions: dict[str, Any] = {}
    out = Path(out)
    if out.exists():
        previous = read_json(out, "existing predictions")
        if not isinstance(previous, dict):
            raise DamInputError(f"existing predictions file {out} is not a JSON object; move it away or pick another --out")
        done_query = previous.get(QUERY_KEY)
        if done_query is not None and done_query != query:
            raise DamInputError(
                f"{out} holds captions made with the query {done_query!r}, not {query!r}; pass --query with that "
                "text to finish it, or a new --out to caption with this query"
            )
        captions = {k: v for k, v in previous.items() if k != QUERY_KEY and isinstance(v, str)}
    todo = [a for a in anns if str(a["id"]) not in captions]
    logger.info("DLC-Bench: %d regions, %d already in %s, %d to describe", len(anns), len(anns) - len(todo), out, len(todo))
    # Regions of one image side by side: each image is decoded once.
    todo.sort(key=lambda a: a["image_id"])
    generate_kwargs.setdefault("do_sample", False)

    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    cache: dict[int, np.ndarray] = {}
    flushed = len(captions)
    try:
        with tqdm(total=len(todo), desc="dlc-outputs", unit="region", disable=not progress) as bar:
            for index, batch in enumerate(batches, start=1):
                keep = {a["image_id"] for a in batch}
                cache = {k: v for k, v in cache.items() if k in keep}
                regions = [_region(coco, ann, images_dir, cache) for ann in batch]
                texts = describer.describe_batch(regions, batch_size=batch_size, query=query, **generate_kwargs)
                captions.update({str(ann["id"]): text for ann, text in zip(batch, texts)})
                bar.update(len(batch))
                if index % flush_every == 0 and index < len(batches):
                    write_json_atomic(out, _ordered(anns, captions, query))
                    flushed = len(captions)
    except BaseException:
        if len(captions) > flushed:  # an error or Ctrl-C: keep what is done for the rerun
            write_json_atomic(out, _ordered(anns, captions, query))
        raise
    result = _ordered(anns, captions, query)
    write_json_atomic(out, result)
    return result


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Options of `dam-bench dlc-outputs`."""
    p = parser or argparse.ArgumentParser(prog="dam-bench dlc-outputs", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="DAM checkpoint folder (default: the built-in ShapesDLC model)")
    p.add_argument("--data-root", required=True, help="DLC-bench folder holding annotations.json and images/")
    p.add_argument("--out", required=True, help="predictions JSON to write (resumed if it exists)")
    p.add_argument("--batch-size", type=int, default=32, help="regions per generate (default 32)")
    p.add_argument("--query", help="the prompt (default: the model's default query)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: as saved)")
    p.add_argument("--max-new-tokens", type=int, help="caption length limit in tokens (default: the model's)")
    p.add_argument("--flush-every", type=int, default=4, help="rewrite --out every N batches (default 4)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    """Run `dlc-outputs` from parsed arguments."""
    import torch

    from dam.describe import DescribeAnything

    # Check the data before loading a model: a wrong path should fail in a second, not a minute.
    load_annotations(args.data_root)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    describer = DescribeAnything.from_pretrained(args.model, device=device, dtype=args.dtype)
    generate_kwargs = {} if args.max_new_tokens is None else {"max_new_tokens": args.max_new_tokens}
    result = describe_dlc_bench(
        describer, args.data_root, args.out, batch_size=args.batch_size, query=args.query,
        flush_every=args.flush_every, progress=not args.no_progress, **generate_kwargs,
    )
    print(f"DLC-Bench captions: {sum(k != QUERY_KEY for k in result)} regions in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dam-bench dlc-outputs` entry point."""
    return run_benchmark("dam-bench dlc-outputs", build_parser(), run_from_args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
