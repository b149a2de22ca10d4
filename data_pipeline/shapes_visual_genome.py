"""ShapesDLC scenes in Visual Genome's layout, for dense captioning (FCLN, the DenseCap mAP, retrieval).

    dam-data synthetic --format visual-genome --num-images 500 --out data/shapes_vg

writes ``images/{image_id}.png``, ``region_descriptions.json`` (VG's format: a list of
{"id", "regions": [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}) and
``image_data.json`` ([{"image_id", "width", "height"}]). Every object of a scene is one region
with its exact box and its ShapesDLC caption, so captions identify objects unambiguously: a
dense captioner trained on it can be scored, and retrieval has a known right answer. Scenes are
those of :func:`dam.shapes.scene` (image ids start at 1, scene ``i`` is image ``i + 1``), so the
same seed gives the same pictures as the parquet dataset.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from dam.jsonio import write_json_atomic
from dam.shapes import IMAGE_SIZE, Scene, scene

from data_pipeline.synthetic import _save_png_atomic


def scene_regions(rendered: Scene, image_id: int) -> tuple[dict, list[dict]]:
    """The VG image record and region records of a rendered scene."""
    regions = []
    for number, obj in enumerate(rendered.objects):
        x0, y0, x1, y1 = obj.box
        regions.append(
            {
                "region_id": image_id * 100 + number,
                "image_id": image_id,
                "phrase": obj.caption,
                "x": x0,
                "y": y0,
                "width": x1 - x0,
                "height": y1 - y0,
            }
        )
    return {"image_id": image_id, "width": IMAGE_SIZE, "height": IMAGE_SIZE}, regions


def write_shapes_visual_genome(
    out_dir: str | os.PathLike, num_images: int, seed: int = 0, progress: bool = True
) -> int:
    """Render ``num_images`` scenes into ``out_dir`` in VG's layout; returns the number of regions.

    Images already on disk are not written again (a rerun resumes); the two JSON files are
    rewritten atomically at the end, so a folder with them is complete.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, descriptions = [], []
    for index in tqdm(range(num_images), desc="scenes", unit="img", disable=not progress):
        rendered = scene(seed, index)
        record, regions = scene_regions(rendered, index + 1)
        path = out / "images" / f"{record['image_id']}.png"
        if not path.exists():
            _save_png_atomic(path, rendered.image)
        images.append(record)
        descriptions.append({"id": record["image_id"], "regions": regions})
    write_json_atomic(out / "image_data.json", images)
    write_json_atomic(out / "region_descriptions.json", descriptions)
    return sum(len(entry["regions"]) for entry in descriptions)
