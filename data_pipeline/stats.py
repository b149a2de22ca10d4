"""`dam-data stats`: what a dataset folder holds, at a glance or as JSON.

    dam-data stats data/sdp_stage1 [--json] [--top 10]

Rows, distinct images (and videos), rows per source, caption length in words (mean and
percentiles), the most frequent categories, and the filter funnel of the report (report.json of
a merged dataset, or the summed shard reports of a stage output folder). Only the small columns
are read from the parquet shards, so image bytes are never loaded.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from dam.jsonio import read_json
from dam.schema import shard_files
from dam.schema import DATASET_MANIFEST
from data_pipeline.merge import DATASET_REPORT
from data_pipeline.sharding import RUN_MANIFEST, read_report
from data_pipeline.tally import Tally

PERCENTILES = (5, 25, 50, 75, 95)


def _report(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(summed tally JSON, image_root) from a merged dataset's or a stage folder's files."""
    if (folder / DATASET_MANIFEST).is_file():
        manifest = read_json(folder / DATASET_MANIFEST, "dataset manifest")
        report = read_json(folder / DATASET_REPORT, "dataset report") if (folder / DATASET_REPORT).is_file() else {}
        return report.get("total"), manifest.get("image_root")
    if (folder / RUN_MANIFEST).is_file():
        manifest = read_json(folder / RUN_MANIFEST, "run manifest")
        total = Tally()
        for k in range(manifest.get("sharding", {}).get("num_shards", 0)):
            report = read_report(folder, k)
            if report is not None:
                total.add(Tally.from_json(report["tally"]))
        return total.to_json(), manifest.get("image_root")
    return None, None


def dataset_stats(path: str | os.PathLike, top: int = 10) -> dict[str, Any]:
    """Statistics of the dataset at ``path`` (a folder of shards, or one parquet file)."""
    import pyarrow.parquet as pq

    counts = {"rows": 0}
    sources: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    images: set[str] = set()
    videos: set[str] = set()
    words: list[int] = []
    uncategorised = 0
    for file in shard_files(path):
        table = pq.read_table(file, columns=["id", "source", "caption", "category", "image.path", "video"])
        columns = {name: table.column(i).to_pylist() for i, name in enumerate(table.column_names)}
        for row_id, source, caption, category, image_path, video in zip(
            columns["id"], columns["source"], columns["caption"], columns["category"], columns["path"], columns["video"],
        ):
            counts["rows"] += 1
            sources[source] += 1
            words.append(len(caption.split()))
            if category is None:
                uncategorised += 1
            else:
                categories[category] += 1
            if video is not None:
                videos.add(video)
            elif image_path is not None:
                images.add(image_path)
            else:  # stored bytes: the id names the image ("coco/397133/1234" -> "coco/397133")
                images.add(row_id.rsplit("/", 1)[0])
    lengths = np.asarray(words if words else [0])
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    report, image_root = _report(folder)
    return {
        "path": str(path), "rows": counts["rows"], "images": len(images), "videos": len(videos),
        "sources": dict(sources.most_common()),
        "caption_words": {
            "mean": round(float(lengths.mean()), 2), "min": int(lengths.min()), "max": int(lengths.max()),
            **{f"p{p}": float(np.percentile(lengths, p)) for p in PERCENTILES},
        },
        "top_categories": dict(categories.most_common(top)), "categories": len(categories), "uncategorised": uncategorised,
        "image_root": image_root, "report": report,
    }


def _funnel(report: dict[str, Any]) -> list[str]:
    lines = []
    units = report.get("units", {})
    skipped = units.get("skipped", {})
    lines.append(f"  units: {units.get('seen', 0)} seen, {sum(skipped.values())} skipped" + (f" ({_reasons(skipped)})" if skipped else ""))
    for name, counts in report.get("filters", {}).items():
        rejected = counts.get("rejected", {})
        lines.append(f"  {name}: kept {counts.get('kept', 0)}, rejected {sum(rejected.values())}" + (f" ({_reasons(rejected)})" if rejected else ""))
    return lines


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable form of :func:`dataset_stats`."""
    words = stats["caption_words"]
    lines = [
        f"dataset: {stats['path']}",
        f"rows: {stats['rows']}",
        f"images: {stats['images']}" + (f", videos: {stats['videos']}" if stats["videos"] else ""),
        "sources: " + (", ".join(f"{s} ({n})" for s, n in stats["sources"].items()) or "none"),
        f"caption words: mean {words['mean']:.1f}, min {words['min']}, "
        + ", ".join(f"p{p} {words[f'p{p}']:g}" for p in PERCENTILES) + f", max {words['max']}",
        f"top categories ({stats['categories']} in all, {stats['uncategorised']} rows without): "
        + (", ".join(f"{c} ({n})" for c, n in stats["top_categories"].items()) or "none"),
    ]
    if stats["image_root"]:
        lines.append(f"image paths are relative to: {stats['image_root']} (dam-train: set the dataset's root to it)")
    if stats["report"]:
        lines.append("filters (regions kept / rejected):")
        lines += _funnel(stats["report"])
    return "\n".join(lines)
