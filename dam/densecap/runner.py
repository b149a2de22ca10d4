"""Dense captioning of many images: proposals -> captions -> JSON + drawn picture + viewer.

    from dam.densecap import DenseCaptioner, FclnProposer, DamCaptioner, run_folder
    captioner = DenseCaptioner(FclnProposer(fcln), DamCaptioner(DescribeAnything.from_pretrained()))
    results = captioner([image])                       # in memory: boxes, scores, captions (, masks)
    stats = run_folder(captioner, "photos/", "out/")    # a folder: resumable, with a viewer

`run_folder` processes `image_batch_size` images per step (one proposer call, one captioner
call for all their regions), loading the next step's images and writing the previous step's
files on worker threads while the models run. It is resumable: an image whose JSON exists (and
was made with the same settings: the proposer's and captioner's `settings`, which identify
their models and options, and max_regions) is skipped, so rerunning the command finishes what
an interrupted run left; each JSON is written after its drawn picture and renamed into place,
so a JSON on disk always means a complete result. An image that cannot be read is skipped
with a warning and counted (`RunStats.failed`), so one bad file does not stop a folder. The
viewer (dam.densecap.viewer) is rewritten at the end from the JSON of every input image.

Per-image JSON: {"image": relative path, "width", "height", "proposer", "captioner",
"mask_source" ("proposer", "sam", "box" or null), "settings", "regions": [{"box": [x0, y0, x1,
y1], "score", "caption", "mask": COCO RLE (the mask the captioner read: the proposer's, or SAM's
of the box)}]}.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dam.densecap.captioners import Captioner
from dam.densecap.drawing import draw_dense_captions
from dam.densecap.files import IMAGE_SUFFIXES, InputImage, find_images, save_image_atomic
from dam.fingerprint import as_json_value
from dam.densecap.proposers import Proposer
from dam.densecap.regions import Regions
from dam.densecap.viewer import viewer_entry, write_viewer
from dam.errors import DamInputError
from dam.images import load_image
from dam.jsonio import read_json, write_json_atomic
from dam.masks import mask_to_rle

logger = logging.getLogger(__name__)


@dataclass
class DenseCaptions:
    """The dense captions of one image, best region first."""

    regions: Regions
    captions: list[str]
    proposer: str
    captioner: str
    mask_source: str | None

    @property
    def boxes(self) -> np.ndarray:
        return self.regions.boxes

    @property
    def scores(self) -> np.ndarray:
        return self.regions.scores

    def to_json(self, name: str, width: int, height: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
        records = []
        for index, (box, score, caption) in enumerate(zip(self.regions.boxes, self.regions.scores, self.captions)):
            record: dict[str, Any] = {"box": [round(float(v), 2) for v in box], "score": float(score), "caption": caption}
            if self.regions.masks is not None:
                record["mask"] = mask_to_rle(self.regions.masks[index])
            records.append(record)
        return {
            "image": name, "width": int(width), "height": int(height),
            "proposer": self.proposer, "captioner": self.captioner, "mask_source": self.mask_source,
            "settings": dict(settings or {}), "regions": records,
        }


class DenseCaptioner:
    """A proposer and a captioner: images in, `DenseCaptions` out (up to `max_regions` per image)."""

    def __init__(self, proposer: Proposer, captioner: Captioner, max_regions: int = 30) -> None:
        if max_regions < 1:
            raise DamInputError(f"max_regions={max_regions} must be at least 1")
        self.proposer = proposer
        self.captioner = captioner
        self.max_regions = max_regions

    @property
    def settings(self) -> dict[str, Any]:
        """What makes two runs' results comparable (as JSON reads them back); a resumed run must match them."""
        return as_json_value({"proposer": self.proposer.settings, "captioner": self.captioner.settings,
                              "max_regions": self.max_regions})

    def __call__(self, images: Sequence[Any], keys: Sequence[str] | None = None) -> list[DenseCaptions]:
        """Dense captions of `images` (anything `dam.load_image` reads)."""
        pixels = [load_image(image) for image in images]
        proposals = [r.head(self.max_regions) for r in self.proposer.propose(pixels, self.max_regions, keys)]
        # The source is named before the captioner attaches masks of its own, which would read as the proposer's.
        sources = [self.captioner.mask_source(regions) for regions in proposals]
        described = [self.captioner.attach_masks(image, regions) for image, regions in zip(pixels, proposals)]
        captions = self.captioner.caption(pixels, described)
        return [
            DenseCaptions(regions, list(texts), self.proposer.name, self.captioner.name, source)
            for regions, texts, source in zip(described, captions, sources)
        ]


@dataclass
class RunStats:
    """What `run_folder` did."""

    processed: int
    skipped: int
    seconds: float
    viewer: Path | None = None
    failed: int = 0
    """Images that could not be read (each named in a warning) and were skipped."""

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        text = (f"{self.processed} images captioned in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s), "
                f"{self.skipped} already done")
        return text + (f", {self.failed} unreadable (skipped; see the warnings)" if self.failed else "")


def _is_done(image: InputImage, output: Path, settings: dict[str, Any]) -> bool:
    """Whether `image` has a complete result; a result made with other settings is an error."""
    path = image.result_path(output)
    if not path.is_file():
        return False
    try:
        result = read_json(path, "result")
    except DamInputError:
        logger.warning("%s is unreadable; captioning %s again", path, image.name)
        return False
    previous = result.get("settings") if isinstance(result, dict) else None
    if previous != settings:
        raise DamInputError(
            f"{path} was made with other settings than this run ({_differences(previous, settings)}); use another "
            "--output folder, or --overwrite to caption every image again"
        )
    return True


def _differences(previous: Any, settings: Any, prefix: str = "") -> str:
    """The settings a stored result differs in, as "dotted.key: stored there, this run's now"
    (the full dicts hold model fingerprints: too long to find a difference in by eye)."""
    if isinstance(previous, dict) and isinstance(settings, dict):
        keys = sorted({*previous, *settings})
        parts = (_differences(previous.get(k), settings.get(k), f"{prefix}{k}.") for k in keys)
        return "; ".join(part for part in parts if part)
    return "" if previous == settings else f"{prefix[:-1] or 'settings'}: {previous!r} there, {settings!r} now"


def _chunks(items: Sequence[InputImage], size: int) -> Iterator[list[InputImage]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _read(image: InputImage) -> np.ndarray | None:
    """The pixels of `image`, or None, with a warning naming the file and why, when it cannot be read."""
    try:
        return load_image(image.path)
    except (DamInputError, OSError) as error:
        logger.warning("skipping %s: %s", image.path, error)
        return None


def _load(chunk: list[InputImage]) -> tuple[list[InputImage], list[np.ndarray]]:
    """The readable images of `chunk` and their pixels."""
    loaded = [(image, _read(image)) for image in chunk]
    readable = [(image, pixels) for image, pixels in loaded if pixels is not None]
    return [image for image, _ in readable], [pixels for _, pixels in readable]


def _write(chunk: list[InputImage], pixels: list[np.ndarray], results: list[DenseCaptions], output: Path,
           settings: dict[str, Any]) -> None:
    for image, array, result in zip(chunk, pixels, results):
        drawn = draw_dense_captions(array, result.boxes, result.captions, result.regions.masks)
        save_image_atomic(image.drawn_path(output), drawn)
        height, width = array.shape[:2]
        # The JSON last: its existence is what marks the image done.
        write_json_atomic(image.result_path(output), result.to_json(image.name, width, height, settings))


def write_folder_viewer(images: Sequence[InputImage], output: str | Path) -> Path:
    """(Re)write the viewer of `output` from the results of `images` that exist."""
    output = Path(output)
    entries = []
    for image in images:
        path = image.result_path(output)
        if path.is_file():
            entries.append(viewer_entry(read_json(path, "result"), image.path, image.drawn_path(output), output))
    return write_viewer(output, entries)


def run_folder(captioner: DenseCaptioner, source: str | Path, output: str | Path, *, image_batch_size: int = 8,
               overwrite: bool = False, viewer: bool = True, progress: bool = True) -> RunStats:
    """Dense-caption every image of `source` (a file or folder) into `output` (module docstring)."""
    if image_batch_size < 1:
        raise DamInputError(f"image_batch_size={image_batch_size} must be at least 1")
    output = Path(output)
    images = find_images(source, output)
    if not images:
        raise DamInputError(f"--input {str(source)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    settings = captioner.settings
    todo = images if overwrite else [image for image in images if not _is_done(image, output, settings)]
    skipped = len(images) - len(todo)
    if skipped:
        logger.info("%d of %d images already have results in %s; captioning the other %d",
                    skipped, len(images), output, len(todo))
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    chunks = list(_chunks(todo, image_batch_size))
    failed = 0
    with ThreadPoolExecutor(max_workers=2) as pool, \
            tqdm(total=len(todo), desc="densecap", unit="img", disable=not progress) as bar:
        loading: Future | None = pool.submit(_load, chunks[0]) if chunks else None
        writing: Future | None = None
        for index, chunk in enumerate(chunks):
            readable, pixels = loading.result()  # type: ignore[union-attr]
            loading = pool.submit(_load, chunks[index + 1]) if index + 1 < len(chunks) else None
            failed += len(chunk) - len(readable)
            if readable:
                results = captioner(pixels, [image.name for image in readable])
                if writing is not None:
                    writing.result()  # one write in flight: errors surface, memory stays bounded
                writing = pool.submit(_write, readable, pixels, results, output, settings)
            bar.update(len(chunk))
        if writing is not None:
            writing.result()
    elapsed = time.perf_counter() - start
    page = write_folder_viewer(images, output) if viewer else None
    stats = RunStats(len(todo) - failed, skipped, elapsed, page, failed)
    logger.info("%s", stats.summary())
    return stats


QUERY_RESULTS_FILE = "query_results.json"


def stored_regions(image: InputImage, output: Path, proposer_settings: dict[str, Any],
                   max_regions: int) -> Regions | None:
    """The regions an earlier `dam densecap` run stored for `image`, when that run's proposer had
    `proposer_settings` (as JSON reads them back) and it kept at least `max_regions` regions (the
    first `max_regions` of more are the same regions); else None.

    Masks are kept only when the proposer made them: masks a captioner derived from the boxes
    (SAM) are for the scorer to derive as it is configured.
    """
    from dam.masks import rle_to_mask

    path = image.result_path(output)
    if not path.is_file():
        return None
    try:
        result = read_json(path, "result")
    except DamInputError:
        return None
    settings = result.get("settings") if isinstance(result, dict) else None
    if not isinstance(settings, dict) or settings.get("proposer") != proposer_settings:
        return None
    stored_max = settings.get("max_regions")
    if not isinstance(stored_max, int) or stored_max < max_regions:
        return None
    records = result.get("regions") or []
    own_masks = result.get("mask_source") == "proposer" and records and all("mask" in r for r in records)
    masks = [rle_to_mask(r["mask"]) for r in records] if own_masks else None
    return Regions(np.array([r["box"] for r in records]).reshape(-1, 4), np.array([r["score"] for r in records]), masks)


def search_folder(queries: Sequence[str], proposer: Proposer, scorer: Any, source: str | Path, output: str | Path,
                  *, max_regions: int = 30, image_batch_size: int = 8, top_k: int = 10,
                  progress: bool = True) -> dict[str, Any]:
    """Open-world detection over a folder: the `top_k` regions of all images ranked by
    log P(query | region) for each query, written to OUTPUT/query_results.json and returned.

    Regions stored by an earlier `dam densecap` run into `output` with the same proposer settings
    and at least `max_regions` regions are reused (scored at their stored boxes, and masks when
    the proposer made them); other images are proposed afresh. Images that cannot be read are
    skipped with a warning and listed under "failed".
    """
    from dam.densecap.scoring import score_queries

    if top_k < 1:
        raise DamInputError(f"top_k={top_k} must be at least 1")
    output = Path(output)
    images = find_images(source, output)
    if not images:
        raise DamInputError(f"--input {str(source)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    by_name = {image.name: image for image in images}
    wanted = as_json_value(proposer.settings)
    reused = 0
    failed: list[str] = []

    def regions_for(name: str) -> Regions | None:
        nonlocal reused
        regions = stored_regions(by_name[name], output, wanted, max_regions)
        reused += regions is not None
        return regions

    def readable() -> Iterator[tuple[str, np.ndarray]]:
        for image in images:
            pixels = _read(image)
            if pixels is None:
                failed.append(image.name)
            else:
                yield image.name, pixels

    scores = score_queries(
        readable(), queries, proposer, scorer, max_regions=max_regions, image_batch_size=image_batch_size,
        keep_hits=top_k, progress=progress, regions_for=regions_for, num_images=len(images),
    )
    if reused:
        logger.info("reused the stored regions of %d of %d images", reused, len(images))
    result = {
        "proposer": proposer.name,
        "scorer": scorer.name,
        "num_images": len(images) - len(failed),
        "failed": failed,
        "num_pairs": scores.num_pairs,
        "seconds": round(scores.seconds, 3),
        "queries": [
            {"query": query, "hits": [hit.to_json() for hit in scores.top_hits(q, top_k)]}
            for q, query in enumerate(scores.queries)
        ],
    }
    write_json_atomic(output / QUERY_RESULTS_FILE, result)
    return result
