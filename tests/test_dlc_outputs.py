"""`dam-bench dlc-outputs` on a tiny generated DLC-bench folder with a tiny random DAM:
captions for every annotation, resume, periodic flush, query mismatch, missing inputs."""

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

import dam.describe
from bench.cli import main as bench_main
from bench.dlc.outputs import describe_dlc_bench
from dam import DescribeAnything
from dam.errors import DamInputError
from tests.factories import box_mask, random_image, tiny_dam, tiny_tokenizer

SIZES = {1: (24, 32), 2: (40, 30), 3: (20, 20)}  # image id -> (height, width)
GREEDY = {"max_new_tokens": 4, "do_sample": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "dam"
    DescribeAnything(tiny_dam(seed=5), tiny_tokenizer()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def describer(model_dir):
    return DescribeAnything.from_pretrained(model_dir, dtype="float32")


def _rle(mask):
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode()}


def _uncompressed_rle(mask):
    flat = mask.astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value != current:
            counts.append(run)
            current, run = value, 0
        run += 1
    counts.append(run)
    return {"size": list(mask.shape), "counts": counts}


def _make_bench(root):
    """3 images, 5 annotations: polygons, compressed and uncompressed RLE (ids not sorted by image)."""
    (root / "images").mkdir(parents=True)
    images = []
    for image_id, (h, w) in SIZES.items():
        Image.fromarray(random_image(h, w, seed=image_id)).save(root / "images" / f"img{image_id}.png")
        images.append({"id": image_id, "file_name": f"img{image_id}.png", "height": h, "width": w})
    boxes = {
        11: box_mask(24, 32, 4, 3, 20, 15),
        31: box_mask(20, 20, 2, 2, 12, 9),
        22: box_mask(40, 30, 5, 10, 25, 30),
    }
    annotations = [
        {"id": 11, "image_id": 1, "category_id": 1, "segmentation": _rle(boxes[11])},
        {"id": 12, "image_id": 1, "category_id": 1, "segmentation": [[2, 2, 30, 2, 30, 20, 2, 20]]},
        {"id": 31, "image_id": 3, "category_id": 1, "segmentation": _uncompressed_rle(boxes[31])},
        {"id": 21, "image_id": 2, "category_id": 1, "segmentation": [[1, 1, 15, 1, 8, 30]]},
        {"id": 22, "image_id": 2, "category_id": 1, "segmentation": _rle(boxes[22])},
    ]
    for ann in annotations:
        ann["area"], ann["iscrowd"] = 1.0, 0
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return boxes


def _cli(model_dir, root, out, *extra):
    args = ["dlc-outputs", "--data-root", str(root), "--out", str(out), "--batch-size", "2", "--device", "cpu",
            "--dtype", "float32", "--max-new-tokens", "4", "--no-progress", *extra]
    if model_dir is not None:
        args += ["--model", str(model_dir)]
    return bench_main(args)


class Counting:
    """Wraps DescribeAnything.describe_batch: counts calls and regions, can fail on a given call,
    and records what the output file held when each call started."""

    def __init__(self, monkeypatch, out=None, fail_on_call=None):
        self.calls = 0
        self.regions = 0
        self.seen_on_disk: list[int] = []
        original = DescribeAnything.describe_batch
        counter = self

        def describe_batch(model, regions, **kwargs):
            counter.calls += 1
            counter.regions += len(regions)
            if out is not None:
                counter.seen_on_disk.append(len(json.loads(out.read_text())) - 1 if out.exists() else 0)
            if counter.calls == fail_on_call:
                raise RuntimeError("killed")
            return original(model, regions, **kwargs)

        monkeypatch.setattr(DescribeAnything, "describe_batch", describe_batch)


def test_captions_every_annotation_and_resumes(tmp_path, model_dir, describer, monkeypatch, capsys):
    root = tmp_path / "DLC-bench"
    boxes = _make_bench(root)
    out = tmp_path / "preds.json"
    counter = Counting(monkeypatch)
    assert _cli(model_dir, root, out) == 0
    assert "5 regions" in capsys.readouterr().out
    assert counter.calls == 3 and counter.regions == 5  # batches of 2
    preds = json.loads(out.read_text())
    assert list(preds) == ["11", "12", "31", "21", "22", "query"]  # annotation order, query last
    assert preds["query"] == describer.processor.default_query
    assert all(isinstance(preds[k], str) for k in preds)

    # The masks are the annotations' (RLE compressed and not): same caption as describing directly.
    image1 = np.array(Image.open(root / "images" / "img1.png").convert("RGB"))
    image3 = np.array(Image.open(root / "images" / "img3.png").convert("RGB"))
    assert preds["11"] == describer.describe(image1, boxes[11], **GREEDY)
    assert preds["31"] == describer.describe(image3, boxes[31], **GREEDY)

    # Rerun: nothing new to describe, file unchanged.
    before = out.read_text()
    assert _cli(model_dir, root, out) == 0
    assert counter.calls == 3
    assert out.read_text() == before


def test_partial_progress_is_flushed_and_the_rerun_finishes(tmp_path, model_dir, describer, monkeypatch):
    root = tmp_path / "DLC-bench"
    _make_bench(root)
    out = tmp_path / "preds.json"
    counter = Counting(monkeypatch, out=out, fail_on_call=4)
    with pytest.raises(RuntimeError, match="killed"):
        describe_dlc_bench(describer, root, out, batch_size=1, flush_every=2, progress=False, **GREEDY)
    # Written every 2 batches (before the failure): nothing at call 1-2, 2 captions at call 3-4.
    assert counter.seen_on_disk == [0, 0, 2, 2]
    partial = json.loads(out.read_text())
    assert len(partial) - 1 == 3  # the failing run kept its 3 finished captions too

    counter.regions = 0
    full = describe_dlc_bench(describer, root, out, batch_size=1, flush_every=2, progress=False, **GREEDY)
    assert counter.regions == 2
    assert all(full[k] == v for k, v in partial.items())
    assert json.loads(out.read_text()) == full and len(full) == 6


def test_builtin_model_is_the_default(tmp_path, model_dir, monkeypatch):
    root = tmp_path / "DLC-bench"
    _make_bench(root)
    monkeypatch.setattr(dam.describe, "BUILTIN_MODEL", model_dir)
    assert _cli(None, root, tmp_path / "preds.json") == 0
    assert len(json.loads((tmp_path / "preds.json").read_text())) == 6


def test_other_query_in_existing_file_is_an_error(tmp_path, model_dir, capsys):
    root = tmp_path / "DLC-bench"
    _make_bench(root)
    out = tmp_path / "preds.json"
    out.write_text(json.dumps({"11": "a red circle .", "query": "Describe it briefly."}))
    assert _cli(model_dir, root, out) == 2
    err = capsys.readouterr().err
    assert "Describe it briefly." in err and "--query" in err and "--out" in err
    # With that query, the file is finished (its caption kept).
    assert _cli(model_dir, root, out, "--query", "Describe it briefly.") == 0
    preds = json.loads(out.read_text())
    assert preds["11"] == "a red circle ." and len(preds) == 6 and preds["query"] == "Describe it briefly."


def test_missing_annotations_or_images_name_the_path(tmp_path, describer):
    root = tmp_path / "DLC-bench"
    root.mkdir()
    with pytest.raises(DamInputError, match=r"annotations\.json.*--data-root"):
        describe_dlc_bench(describer, root, tmp_path / "p.json", progress=False)
    _make_bench(tmp_path / "full")
    (root / "annotations.json").write_text((tmp_path / "full" / "annotations.json").read_text())
    with pytest.raises(DamInputError, match=r"images.*does not exist"):
        describe_dlc_bench(describer, root, tmp_path / "p.json", progress=False)
    (root / "images").mkdir()
    with pytest.raises(DamInputError, match=r"img\d\.png does not exist"):
        describe_dlc_bench(describer, root, tmp_path / "p.json", progress=False, **GREEDY)
