"""The training-row schema: builders, parquet round trips, corrupt rows, dataset loading."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("datasets")
import pyarrow.parquet as pq  # noqa: E402

from dam.errors import DamInputError  # noqa: E402
from dam.masks import mask_to_rle  # noqa: E402
from dam.schema import (  # noqa: E402
    COLUMNS,
    SCHEMA_VERSION,
    CorruptRowError,
    decode_row,
    features,
    image_row,
    load_dataset_dir,
    row_num_frames,
    shard_files,
    video_row,
    write_shard,
)

DOCUMENTED = ["id", "source", "caption", "category", "image", "mask", "frames", "video", "frame_indices", "frame_masks"]


def _image(seed: int, h: int = 12, w: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h: int = 12, w: int = 16, box: tuple[int, int, int, int] = (2, 3, 7, 9)) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[box[0]:box[2], box[1]:box[3]] = True
    return m


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _roundtrip(rows: list[dict], tmp_path: Path) -> list[dict]:
    assert write_shard(rows, tmp_path / "shard-00000.parquet") == len(rows)
    return list(load_dataset_dir(tmp_path, cache_dir=tmp_path / "cache"))


def test_features_match_documented_columns():
    assert list(features()) == DOCUMENTED == list(COLUMNS)
    assert SCHEMA_VERSION == 1
    import datasets

    assert features()["image"] == datasets.Image(decode=False)
    assert features()["frames"].feature == datasets.Image(decode=False)
    for column in DOCUMENTED:
        import dam.schema

        assert f"``{column}``" in dam.schema.__doc__


def test_image_rows_round_trip(tmp_path):
    pixels = [_image(i) for i in range(3)]
    mask = _mask()
    Image.fromarray(pixels[2]).save(tmp_path / "rel.png")
    rows = [
        image_row("a", _png(pixels[0]), mask, "a red thing", "coco", category="thing"),
        image_row("b", pixels[1], mask_to_rle(mask), "a blue thing", "shapes"),
        image_row("c", "rel.png", mask, "a path image", "sa1b"),
    ]
    assert rows[2]["image"] == {"bytes": None, "path": "rel.png"}
    assert rows[0]["mask"] == mask_to_rle(mask) and isinstance(rows[0]["mask"]["counts"], str)
    stored = _roundtrip(rows, tmp_path)
    assert [r["id"] for r in stored] == ["a", "b", "c"]
    assert stored[0]["image"]["bytes"] == rows[0]["image"]["bytes"]  # not decoded by datasets
    for row, pix in zip(stored, pixels):
        assert row_num_frames(row) == 1
        decoded = decode_row(row, root=tmp_path)
        assert not decoded.is_video and len(decoded.frames) == len(decoded.masks) == 1
        np.testing.assert_array_equal(decoded.frames[0], pix)
        np.testing.assert_array_equal(decoded.masks[0], mask)
        assert decoded.masks[0].dtype == bool and decoded.frames[0].dtype == np.uint8
    assert decode_row(stored[0]).category == "thing" and decode_row(stored[1]).category is None
    assert decode_row(stored[0]).source == "coco" and decode_row(stored[0]).caption == "a red thing"


def test_video_row_with_frames_round_trip(tmp_path):
    frames = [_image(10 + t) for t in range(3)]
    masks = [_mask(box=(t, t, t + 4, t + 5)) for t in range(3)]
    row = video_row("v", masks, "a moving thing", "sav", frames=[_png(f) for f in frames])
    (stored,) = _roundtrip([row], tmp_path)
    assert row_num_frames(stored) == 3 and stored["image"] is None and stored["video"] is None
    decoded = decode_row(stored, tmp_path)
    assert decoded.is_video
    for got, want in zip(decoded.frames, frames):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(decoded.masks, masks):
        np.testing.assert_array_equal(got, want)


def _write_mp4(path: Path, n: int = 10, size: int = 32) -> None:
    av = pytest.importorskip("av")
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(n):
            frame = np.full((size, size, 3), 20 * t, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_video_row_with_mp4_round_trip(tmp_path):
    _write_mp4(tmp_path / "clip.mp4")
    masks = [_mask(32, 32, (t, t, t + 8, t + 8)) for t in range(3)]
    row = video_row("m", masks, "a fading square", "sav", video="clip.mp4", frame_indices=[0, 3, 6])
    (stored,) = _roundtrip([row], tmp_path)
    assert row_num_frames(stored) == 3 and stored["frame_indices"] == [0, 3, 6]
    decoded = decode_row(stored, root=tmp_path)
    assert decoded.is_video and [f.shape for f in decoded.frames] == [(32, 32, 3)] * 3
    for frame, level in zip(decoded.frames, (0, 60, 120)):  # lossy codec: approximately
        assert abs(float(frame.mean()) - level) < 8
    for got, want in zip(decoded.masks, masks):
        np.testing.assert_array_equal(got, want)


def _corrupt(row: dict, match: str, root=None) -> None:
    with pytest.raises(CorruptRowError, match=match) as info:
        decode_row(row, root)
    assert repr(row["id"]) in str(info.value)


def test_corrupt_rows_name_the_id_and_problem(tmp_path):
    good = image_row("ok", _image(0), _mask(), "x", "coco")
    _corrupt({**good, "id": "missing", "image": {"bytes": None, "path": "gone.png"}}, re.escape(str(tmp_path / "gone.png")), tmp_path)
    _corrupt({**good, "id": "bad-bytes", "image": {"bytes": b"not an image", "path": None}}, "cannot be decoded")
    _corrupt({**good, "id": "size", "mask": mask_to_rle(_mask(13, 16))}, "mask 0 is")
    _corrupt({**good, "id": "caption", "caption": "  "}, "empty caption")
    _corrupt({**good, "id": "empty", "mask": mask_to_rle(np.zeros((12, 16), bool))}, "empty")
    _corrupt({**good, "id": "nothing", "image": None, "mask": None}, "no image and no frames")
    _corrupt({**good, "id": "nomask", "mask": None}, "mask 0 is missing")
    _corrupt({**good, "id": "both", "video": "x.mp4"}, "has image and video")
    video = video_row("vid", [_mask()] * 2, "x", "sav", frames=[_image(1), _image(2)])
    _corrupt({**video, "frame_masks": video["frame_masks"][:1]}, "2 frames but 1 frame_masks")
    _corrupt({**video, "frame_masks": [], "frames": []}, "no image and no frames")
    _corrupt({**video, "frame_masks": [{"size": [12, 16], "counts": "zz"}] * 2}, "RLE")
    _corrupt({**video, "frames": [], "video": "nope.mp4", "frame_indices": [0, 1]}, re.escape(str(tmp_path / "nope.mp4")), tmp_path)
    assert issubclass(CorruptRowError, DamInputError)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"id": ""}, "id must be"),
        ({"caption": " "}, "caption must be"),
        ({"source": None}, "source must be"),
        ({"category": 3}, "category must be"),
        ({"image": 3.0}, "image is a float"),
        ({"image": b"junk"}, "image: bytes are not"),
        ({"image": np.zeros((12, 16, 2), np.uint8)}, "image array has shape"),
        ({"mask": np.zeros((12, 16), bool)}, "mask: .*no pixels"),
        ({"mask": _mask(16, 12)}, "mask: mask is 16x12"),
    ],
)
def test_image_row_rejects_bad_inputs(kwargs, match):
    args = {"id": "r", "image": _image(0), "mask": _mask(), "caption": "c", "source": "coco", **kwargs}
    with pytest.raises(DamInputError, match=match):
        image_row(**args)


def test_image_row_checks_mask_against_encoded_bytes():
    with pytest.raises(DamInputError, match="mask: mask is 12x16"):
        image_row("r", _png(_image(0, 16, 12)), _mask(), "c", "coco")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of frames"),
        ({"frames": [_image(0)], "video": "v.mp4"}, "exactly one of frames"),
        ({"frames": [_image(0)]}, "1 frames but 2 masks"),
        ({"frames": [_image(0)] * 2, "frame_indices": [0, 1]}, "frame_indices only applies"),
        ({"video": "v.mp4"}, "needs frame_indices"),
        ({"video": "v.mp4", "frame_indices": [0]}, "one per mask"),
        ({"video": "v.mp4", "frame_indices": [0, -1]}, "non-negative"),
        ({"video": "v.mp4", "frame_indices": [0, 1], "masks": [_mask(), _mask(13, 16)]}, "different sizes"),
        ({"video": "v.mp4", "frame_indices": [0, 1], "masks": []}, "non-empty list"),
        ({"video": 5, "frame_indices": [0, 1]}, "video path must be"),
        ({"frames": "a.png"}, "frames must be a list"),
        ({"frames": [_image(0), _image(1, 13, 16)]}, r"masks\[1\]: mask is 12x16"),
    ],
)
def test_video_row_rejects_bad_inputs(kwargs, match):
    args = {"id": "v", "masks": [_mask(), _mask()], "caption": "c", "source": "sav", **kwargs}
    with pytest.raises(DamInputError, match=match):
        video_row(**args)


def test_load_dataset_dir_errors(tmp_path):
    with pytest.raises(DamInputError, match="does not exist.*dam-data"):
        load_dataset_dir(tmp_path / "nowhere")
    with pytest.raises(DamInputError, match="no \\*.parquet shards.*dam-data"):
        load_dataset_dir(tmp_path)
    import pyarrow as pa

    table = pa.table({c: [None] for c in COLUMNS if c != "caption"})
    pq.write_table(table, tmp_path / "odd.parquet")
    with pytest.raises(DamInputError, match="lacks column.*'caption'"):
        load_dataset_dir(tmp_path)


def test_load_dataset_dir_refuses_newer_schema(tmp_path):
    import pyarrow as pa

    schema = features().arrow_schema
    schema = schema.with_metadata({**schema.metadata, b"dam_schema_version": b"99"})
    pq.write_table(pa.Table.from_pylist([image_row("a", _image(0), _mask(), "c", "coco")], schema=schema), tmp_path / "s.parquet")
    with pytest.raises(DamInputError, match="schema version 99"):
        load_dataset_dir(tmp_path)


def test_load_dataset_dir_file_and_sorted_shards(tmp_path):
    rows = [image_row(f"r{i}", _image(i), _mask(), f"cap {i}", "shapes") for i in range(5)]
    write_shard(rows[3:], tmp_path / "shard-00001.parquet")
    write_shard(rows[:3], tmp_path / "shard-00000.parquet")
    assert [f.name for f in shard_files(tmp_path)] == ["shard-00000.parquet", "shard-00001.parquet"]
    ds = load_dataset_dir(tmp_path)
    assert ds["id"] == [f"r{i}" for i in range(5)] and ds.features == features()
    assert load_dataset_dir(tmp_path / "shard-00001.parquet")["id"] == ["r3", "r4"]
    write_shard([], tmp_path / "shard-00002.parquet")  # empty shards are skipped
    assert len(load_dataset_dir(tmp_path)) == 5


def test_write_shard_is_atomic_and_replaces(tmp_path):
    path = tmp_path / "out" / "shard.parquet"
    assert write_shard([image_row("old", _image(0), _mask(), "old", "coco")], path) == 1
    assert load_dataset_dir(path)["id"] == ["old"]
    rows = [image_row(f"n{i}", _image(i), _mask(), "new", "coco") for i in range(250)]  # > one row group
    assert write_shard(iter(rows), path) == 250
    assert os.listdir(path.parent) == ["shard.parquet"]
    assert load_dataset_dir(path)["id"] == [f"n{i}" for i in range(250)]  # no stale cache

    def failing():
        yield rows[0]
        raise RuntimeError("labeler crashed")

    with pytest.raises(RuntimeError):
        write_shard(failing(), path)
    assert os.listdir(path.parent) == ["shard.parquet"]  # old shard intact, no temp file
    assert len(load_dataset_dir(path)) == 250
    with pytest.raises(DamInputError, match="twice"):
        write_shard([rows[0], rows[0]], path)
    with pytest.raises(DamInputError, match="has columns"):
        write_shard([{"id": "x"}], path)
    assert os.listdir(path.parent) == ["shard.parquet"]
    assert write_shard([], tmp_path / "empty.parquet") == 0
    assert len(load_dataset_dir(tmp_path / "empty.parquet")) == 0


def test_shard_keeps_hf_metadata(tmp_path):
    import datasets

    write_shard([image_row("a", _image(0), _mask(), "c", "coco")], tmp_path / "s.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "s.parquet"), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features == features()
    assert isinstance(ds[0]["image"]["bytes"], bytes)
