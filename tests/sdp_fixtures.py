"""Tiny real inputs for the DLC-SDP tests (COCO, SA-1B, semantic PNGs, SA-V mp4) and test labelers.

Everything is written into a tmp folder with PIL / json / av, so the sources read real files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from dam.images import load_image
from dam.masks import load_mask
from data_pipeline.config import FilterConfig, OutputConfig, SourceConfig, Stage1Config
from data_pipeline.labelers import LabelRequest, LabelResult


def rgb(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box(height: int, width: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    mask = np.zeros((height, width), bool)
    mask[y0:y1, x0:x1] = True
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def uncompressed_rle(mask: np.ndarray) -> dict:
    flat = mask.flatten(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(np.concatenate(([0], flat, [1 - flat[-1]])))).tolist()
    runs = np.diff([0] + changes).tolist()
    return {"size": list(mask.shape), "counts": [int(r) for r in runs]}


def polygon(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


@dataclass
class CocoFixture:
    root: Path
    annotations: Path
    images: Path
    masks: dict[str, np.ndarray]  # region id -> expected mask
    categories: dict[str, str | None]  # region id -> category
    pixels: dict[str, np.ndarray]  # unit id -> decoded image


def make_coco(root: Path, name: str = "coco") -> CocoFixture:
    """5 images: 3 good (2 JPEG, 1 PNG), 1 corrupt JPEG, 1 missing; polygons, RLEs, crowd, a bad RLE."""
    images = root / "images"
    images.mkdir(parents=True)
    sizes = {1: (32, 48), 2: (40, 40), 3: (24, 36), 4: (20, 20), 5: (20, 20)}
    files = {1: "000001.jpg", 2: "000002.png", 3: "sub/000003.jpg", 4: "000004.jpg", 5: "000005.jpg"}
    pixels = {}
    for i in (1, 2, 3):
        path = images / files[i]
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb(*sizes[i], seed=i)).save(path)
        pixels[f"{name}/{i}"] = load_image(path)
    (images / files[4]).write_bytes(b"\xff\xd8 this is not a jpeg")
    h1, w1 = sizes[1]
    h2, w2 = sizes[2]
    m10, m12, m13 = box(h1, w1, 2, 2, 20, 14), box(h1, w1, 30, 4, 40, 12), box(h1, w1, 0, 20, 48, 32)
    m21, m22 = box(h2, w2, 5, 5, 35, 30), box(h2, w2, 0, 0, 10, 10)
    bad = compressed_rle(m22)
    bad["size"] = [h2, w2 + 1]  # counts cover h*w pixels but the size says otherwise: corrupt
    anns = [
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": polygon(22, 2, 29, 18), "iscrowd": 0, "bbox": [22, 2, 7, 16]},
        {"id": 10, "image_id": 1, "category_id": 3, "segmentation": compressed_rle(m10), "iscrowd": 0},
        {"id": 12, "image_id": 1, "category_id": 2, "segmentation": uncompressed_rle(m12), "iscrowd": 0},
        {"id": 13, "image_id": 1, "category_id": 3, "segmentation": uncompressed_rle(m13), "iscrowd": 1},
        {"id": 21, "image_id": 2, "category_id": 3, "segmentation": compressed_rle(m21), "iscrowd": 0},
        {"id": 22, "image_id": 2, "category_id": 1, "segmentation": bad, "iscrowd": 0},
        {"id": 23, "image_id": 2, "category_id": 1, "segmentation": polygon(36, 36, 38, 38), "iscrowd": 0},
        {"id": 31, "image_id": 3, "category_id": 2, "segmentation": polygon(3, 3, 30, 20), "iscrowd": 0},
        {"id": 41, "image_id": 4, "category_id": 1, "segmentation": polygon(1, 1, 10, 10), "iscrowd": 0},
        {"id": 51, "image_id": 5, "category_id": 1, "segmentation": polygon(1, 1, 10, 10), "iscrowd": 0},
    ]
    data = {
        "images": [{"id": i, "file_name": files[i], "height": sizes[i][0], "width": sizes[i][1]} for i in (3, 1, 5, 2, 4)],
        "annotations": anns,
        "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "dog:ear"}, {"id": 3, "name": "cat"}],
    }
    annotations = root / "instances.json"
    write_json(annotations, data)

    def raster(poly: list, size: tuple[int, int]) -> np.ndarray:
        return load_mask(poly, size)

    masks = {
        f"{name}/1/10": m10, f"{name}/1/11": raster(polygon(22, 2, 29, 18), sizes[1]), f"{name}/1/12": m12,
        f"{name}/2/21": m21, f"{name}/2/23": raster(polygon(36, 36, 38, 38), sizes[2]),
        f"{name}/3/31": raster(polygon(3, 3, 30, 20), sizes[3]), f"{name}/4/41": raster(polygon(1, 1, 10, 10), sizes[4]),
    }
    categories = {
        f"{name}/1/10": "cat", f"{name}/1/11": "dog", f"{name}/1/12": "dog:ear", f"{name}/2/21": "cat",
        f"{name}/2/23": "dog", f"{name}/3/31": "dog:ear", f"{name}/4/41": "dog",
    }
    return CocoFixture(root, annotations, images, masks, categories, pixels)


def coco_config(fixture: CocoFixture, out: Path, **output: Any) -> Stage1Config:
    return Stage1Config(
        source=SourceConfig(type="coco", annotations=str(fixture.annotations), images=str(fixture.images)),
        filters=FilterConfig(min_area=10),
        output=OutputConfig(dir=str(out), shard_size=output.pop("shard_size", 1), **output),
        seed=3, batch_size=2,
    )


class DeterministicLabeler:
    """Captions from (category, id, seed); regions in ``refuse`` / ``fail`` get no caption."""

    def __init__(self, refuse: Sequence[str] = (), fail: Sequence[str] = ()) -> None:
        self.refuse, self.fail = set(refuse), set(fail)
        self.calls = 0
        self.requests: list[LabelRequest] = []

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        self.calls += 1
        self.requests += list(requests)
        out = []
        for r in requests:
            assert r.image.dtype == np.uint8 and r.image.shape[:2] == r.mask.shape and r.mask.dtype == bool
            if r.region_id in self.refuse:
                out.append(LabelResult(None, "refusal"))
            elif r.region_id in self.fail:
                out.append(LabelResult(None, "error: HTTP 500 from the server"))
            else:
                words = " ".join(["word"] * (1 + r.seed % 7))
                out.append(LabelResult(f"A {r.category or 'thing'} ({r.region_id}, seed {r.seed % 1000}) {words}.", None))
        return out


class InterruptingLabeler(DeterministicLabeler):
    """Like DeterministicLabeler, but the call after ``after`` calls raises KeyboardInterrupt (a kill)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        if self.calls >= self.after:
            raise KeyboardInterrupt
        return super().label(requests)


def make_sa1b(root: Path) -> dict[str, Any]:
    """sa_1 (3 annotations, one with a bad RLE), sa_2 (truncated JSON), sa_3 (image missing)."""
    root.mkdir(parents=True)
    h, w = 30, 40
    Image.fromarray(rgb(h, w, 7)).save(root / "sa_1.jpg")
    masks = {1: box(h, w, 0, 0, 10, 10), 2: box(h, w, 5, 5, 40, 30), 4: box(h, w, 20, 0, 30, 5)}
    anns = []
    for ann_id, mask in masks.items():
        anns.append({
            "id": ann_id, "segmentation": compressed_rle(mask), "bbox": [0, 0, 1, 1], "area": int(mask.sum()),
            "predicted_iou": 0.8 + ann_id / 100, "stability_score": 0.9, "crop_box": [0, 0, w, h], "point_coords": [[1.0, 2.0]],
        })
    anns.append({"id": 3, "segmentation": {"size": [h, w], "counts": "!!not-rle"}, "bbox": [0, 0, 1, 1], "area": 1,
                 "predicted_iou": 0.9, "stability_score": 0.9, "crop_box": [0, 0, w, h], "point_coords": [[1.0, 2.0]]})
    write_json(root / "sa_1.json", {"image": {"image_id": 1, "width": w, "height": h, "file_name": "sa_1.jpg"}, "annotations": anns})
    Image.fromarray(rgb(h, w, 8)).save(root / "sa_2.jpg")
    (root / "sa_2.json").write_text('{"image": {"image_id": 2, "width": 40, "height": 30, "file_na', encoding="utf-8")
    write_json(root / "sa_3.json", {"image": {"image_id": 3, "width": w, "height": h, "file_name": "sa_3.jpg"}, "annotations": []})
    return {"masks": {f"sa1b/1/{k}": m for k, m in masks.items()}, "pixels": load_image(root / "sa_1.jpg")}


def write_video(path: Path, frames: int, height: int = 32, width: int = 48, fps: int = 24) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = np.full((height, width, 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
