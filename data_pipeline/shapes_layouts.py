"""ShapesDLC scenes in the layouts of public datasets: Visual Genome's and COCO's.

    dam-data synthetic --format visual-genome --num-images 500 --out data/shapes_vg
    dam-data synthetic --format coco --num-images 50 --out data/shapes_coco

Both write ``images/{image_id}.png`` (image ids start at 1: scene ``i`` of :func:`dam.shapes.scene`
is image ``i + 1``, so the same seed gives the same pictures as the parquet dataset; a rerun
keeps the images already written) and their JSON files atomically at the end, so a folder with
them is complete.

- Visual Genome: ``region_descriptions.json`` (a list of {"id", "regions": [{"region_id",
  "image_id", "phrase", "x", "y", "width", "height"}]}) and ``image_data.json`` ([{"image_id",
  "width", "height"}]). Every object is one region with its exact box and its ShapesDLC caption,
  so captions identify objects unambiguously: a dense captioner trained on it can be scored,
  and retrieval has a known right answer.
- COCO: ``instances.json``, one annotation per object (its exact mask as compressed RLE, bbox,
  area; categories circle, square, triangle): a source for `dam-data stage1` with known answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from dam.jsonio import write_json_atomic
from dam.masks import mask_to_rle
from dam.shapes import IMAGE_SIZE, VOCABULARY, Scene, scene

from data_pipeline.synthetic import save_png_atomic


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


def _scenes(out: Path, num_images: int, seed: int, progress: bool) -> Iterator[tuple[int, Scene]]:
    """(image id, scene) for each scene, its PNG written unless already there (a rerun resumes)."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    for index in tqdm(range(num_images), desc="scenes", unit="img", disable=not progress):
        rendered = scene(seed, index)
        path = out / "images" / f"{index + 1}.png"
        if not path.exists():
            save_png_atomic(path, rendered.image)
        yield index + 1, rendered


def write_shapes_visual_genome(
    out_dir: str | os.PathLike, num_images: int, seed: int = 0, progress: bool = True
) -> int:
    """Render ``num_images`` scenes into ``out_dir`` in VG's layout; returns the number of regions."""
    out = Path(out_dir)
    images, descriptions = [], []
    for image_id, rendered in _scenes(out, num_images, seed, progress):
        record, regions = scene_regions(rendered, image_id)
        images.append(record)
        descriptions.append({"id": image_id, "regions": regions})
    write_json_atomic(out / "image_data.json", images)
    write_json_atomic(out / "region_descriptions.json", descriptions)
    return sum(len(entry["regions"]) for entry in descriptions)


def write_shapes_coco(out_dir: str | os.PathLike, num_images: int, seed: int = 0, progress: bool = True) -> int:
    """Render ``num_images`` scenes into ``out_dir`` as a COCO instances set; returns the number of objects."""
    out = Path(out_dir)
    category_ids = {name: number + 1 for number, name in enumerate(VOCABULARY["shape"])}
    images, annotations = [], []
    for image_id, rendered in _scenes(out, num_images, seed, progress):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": IMAGE_SIZE, "height": IMAGE_SIZE})
        for number, (obj, mask) in enumerate(zip(rendered.objects, rendered.masks)):
            x0, y0, x1, y1 = obj.box
            annotations.append(
                {
                    "id": image_id * 100 + number,
                    "image_id": image_id,
                    "category_id": category_ids[obj.shape],
                    "segmentation": mask_to_rle(mask),
                    "area": int(mask.sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "iscrowd": 0,
                }
            )
    categories = [{"id": number, "name": name} for name, number in category_ids.items()]
    write_json_atomic(out / "instances.json", {"images": images, "annotations": annotations, "categories": categories})
    return len(annotations)
