"""dam.video: frame reading (decord and the PyAV fallback), masklet loading and frame sampling."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

import dam.video as video
from dam.errors import DamInputError
from dam.video import (
    load_masklet,
    prepare_video_inputs,
    read_video_frames,
    sample_masklet_frames,
    sav_masklet_to_frame_masks,
    video_num_frames,
)

H, W, T = 48, 64, 16
TOL = 6  # mpeg4 compression error on flat grey frames


def level(i: int) -> int:
    """Grey level encoding frame index ``i``."""
    return 10 + 15 * i


def frame_index(frame: np.ndarray) -> int:
    """Recover the frame index from a decoded frame's grey level."""
    i = round((float(frame.mean()) - 10) / 15)
    assert abs(frame.mean() - level(i)) < TOL
    return i


@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> str:
    av = pytest.importorskip("av")
    path = tmp_path_factory.mktemp("video") / "grey.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(T):
            frame = np.full((H, W, 3), level(i), np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture(params=["decord", "pyav"])
def backend(request, monkeypatch):
    """Run a test with decord, and again with decord made unimportable (PyAV fallback)."""
    if request.param == "decord":
        pytest.importorskip("decord")
    else:
        monkeypatch.setitem(sys.modules, "decord", None)
        monkeypatch.setattr(video, "_warned_no_decord", False)
    return request.param


def box_mask(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0:y1, x0:x1] = True
    return m


def masklet_visible(frames: list[int], n: int = T) -> list[np.ndarray | None]:
    """Masklet visible in ``frames`` only: an empty array or None elsewhere (alternating)."""
    return [box_mask(5, 20, 10, 30) if t in frames else (None if t % 2 else np.zeros((H, W), bool)) for t in range(n)]


# --- reading --------------------------------------------------------------------------------


def test_read_selected_frames(video_path, backend):
    assert video_num_frames(video_path) == T
    frames = read_video_frames(video_path, [0, 5, 15, 3, 5])
    assert len(frames) == 5
    for f in frames:
        assert f.shape == (H, W, 3) and f.dtype == np.uint8
    assert [frame_index(f) for f in frames] == [0, 5, 15, 3, 5]


def test_read_all_frames(video_path, backend):
    frames = read_video_frames(video_path)
    assert [frame_index(f) for f in frames] == list(range(T))


def test_pyav_fallback_logs_warning(video_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "decord", None)
    monkeypatch.setattr(video, "_warned_no_decord", False)
    with caplog.at_level(logging.WARNING, logger="dam.video"):
        assert frame_index(read_video_frames(video_path, [7])[0]) == 7
    assert "PyAV" in caplog.text


def test_decord_open_failure_falls_back_to_pyav(video_path, monkeypatch, caplog):
    decord = pytest.importorskip("decord")

    def broken(*args, **kwargs):
        raise RuntimeError("cannot open")

    monkeypatch.setattr(decord, "VideoReader", broken)
    with caplog.at_level(logging.WARNING, logger="dam.video"):
        frames = read_video_frames(video_path, [2, 9])
    assert [frame_index(f) for f in frames] == [2, 9]
    assert "falling back to PyAV" in caplog.text and video_path in caplog.text


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(DamInputError, match="nope.mp4"):
        read_video_frames(missing)
    with pytest.raises(DamInputError, match="nope.mp4"):
        video_num_frames(missing)


def test_unreadable_file(tmp_path, backend):
    bad = tmp_path / "text.mp4"
    bad.write_text("this is not a video")
    with pytest.raises(DamInputError, match="text.mp4"):
        read_video_frames(str(bad), [0])


def test_index_out_of_range(video_path, backend):
    with pytest.raises(DamInputError, match=r"frame index 16 .*16 frames"):
        read_video_frames(video_path, [3, 16])
    with pytest.raises(DamInputError, match="frame index -1"):
        read_video_frames(video_path, [-1])


# --- sampling -------------------------------------------------------------------------------


def test_sample_exactly_the_visible_frames():
    assert sample_masklet_frames(masklet_visible(list(range(4, 12)), 20), 8) == list(range(4, 12))


def test_sample_evenly_among_visible_frames():
    visible = list(range(3, 18))  # 15 frames -> every other one
    assert sample_masklet_frames(masklet_visible(visible, 20), 8) == [3, 5, 7, 9, 11, 13, 15, 17]
    picked = sample_masklet_frames(masklet_visible([1, 2, 8, 9, 10, 15], 20), 4)
    assert picked == [1, 8, 9, 15]


def test_sample_repeats_when_few_visible_frames():
    picked = sample_masklet_frames(masklet_visible([2, 7, 9], 12), 8)
    assert picked == [2, 2, 7, 7, 7, 7, 9, 9]
    assert sample_masklet_frames(masklet_visible([5], 12), 3) == [5, 5, 5]


def test_sample_empty_masklet():
    with pytest.raises(DamInputError, match="empty in every frame"):
        sample_masklet_frames([None, np.zeros((H, W), bool), None], 8)
    with pytest.raises(DamInputError, match="num_frames"):
        sample_masklet_frames(masklet_visible([1]), 0)


# --- masklets -------------------------------------------------------------------------------


def rle(mask: np.ndarray, as_str: bool = True) -> dict:
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if as_str:  # SA-V JSON stores counts as str
        r["counts"] = r["counts"].decode()
    return r


def test_load_masklet_list_with_none():
    m = box_mask(0, 10, 0, 10)
    out = load_masklet([None, m, np.zeros((H, W), np.uint8)], 3)
    assert out[0] is None
    assert out[1].dtype == bool and np.array_equal(out[1], m)
    assert out[2].shape == (H, W) and not out[2].any()


def test_load_masklet_dict():
    m = box_mask(2, 8, 3, 9)
    out = load_masklet({2: m, "4": rle(m)}, num_video_frames=6)
    assert len(out) == 6
    assert [x is None for x in out] == [True, True, False, True, False, True]
    assert np.array_equal(out[2], m) and np.array_equal(out[4], m)
    with pytest.raises(DamInputError, match="num_video_frames"):
        load_masklet({0: m})
    with pytest.raises(DamInputError, match=r"frame 6.*6 frames"):
        load_masklet({6: m}, num_video_frames=6)


def test_load_masklet_array():
    arr = np.zeros((4, H, W), bool)
    arr[1, 5:10, 5:10] = True
    out = load_masklet(arr, 4)
    assert len(out) == 4 and np.array_equal(out[1], arr[1]) and not out[0].any()
    with pytest.raises(DamInputError, match=r"\(T, H, W\)"):
        load_masklet(np.zeros((H, W), bool))


def test_load_masklet_sav_rle_list():
    m = box_mask(10, 30, 20, 40)
    out = load_masklet([rle(m), None, rle(m, as_str=False), rle(np.zeros((H, W), bool))], 4)
    assert np.array_equal(out[0], m) and out[1] is None and np.array_equal(out[2], m)
    assert out[3].shape == (H, W) and not out[3].any()


def test_load_masklet_count_mismatch():
    with pytest.raises(DamInputError, match=r"3 frames.*5 frames"):
        load_masklet([None, None, box_mask(0, 4, 0, 4)], 5)


def test_load_masklet_inconsistent_sizes():
    with pytest.raises(DamInputError, match="frame 1"):
        load_masklet([box_mask(0, 4, 0, 4), np.ones((10, 10), bool)])


def test_sav_masklet_to_frame_masks():
    objs = [box_mask(0, 5, 0, 5), box_mask(20, 30, 20, 30)]
    masklet = [[rle(o) for o in objs] for _ in range(4)]  # annotated frames 0..3 -> video 0, 4, 8, 12
    masklet[2][1] = None
    out = sav_masklet_to_frame_masks(masklet, 1, num_video_frames=T)
    assert sorted(out) == [0, 4, 12]
    assert out[4] is masklet[1][1]
    masks = load_masklet(out, T)
    assert np.array_equal(masks[12], objs[1]) and masks[8] is None and masks[1] is None
    with pytest.raises(DamInputError, match="object_index 2"):
        sav_masklet_to_frame_masks(masklet, 2, T)
    with pytest.raises(DamInputError, match="10 frames"):
        sav_masklet_to_frame_masks(masklet, 0, 10)


# --- prepare_video_inputs -------------------------------------------------------------------


def test_prepare_from_file_decodes_only_sampled_frames(video_path, backend, monkeypatch):
    read_calls: list[list[int]] = []
    real_read = video._VideoFile.read

    def spy(self, indices=None):
        read_calls.append(list(indices) if indices is not None else None)
        return real_read(self, indices)

    monkeypatch.setattr(video._VideoFile, "read", spy)
    masks = masklet_visible([6, 7, 8, 9, 13])
    frames, out_masks = prepare_video_inputs(video_path, masks, num_frames=8)
    assert len(frames) == len(out_masks) == 8
    expected = sample_masklet_frames(masks, 8)
    assert [frame_index(f) for f in frames] == expected
    assert set(expected) <= {6, 7, 8, 9, 13}
    assert all(m.dtype == bool and m.shape == (H, W) and m.any() for m in out_masks)
    assert read_calls == [expected]


def test_prepare_from_frame_list_and_dict():
    frames_in = [np.full((H, W, 3), level(i), np.uint8) for i in range(10)]
    m = box_mask(1, 9, 1, 9)
    frames, masks = prepare_video_inputs(frames_in, {3: m, 5: rle(m)}, num_frames=4)
    assert [frame_index(f) for f in frames] == [3, 3, 5, 5]
    assert all(np.array_equal(x, m) for x in masks)


def test_prepare_sav_masklet(video_path):
    obj = box_mask(8, 24, 8, 40)
    masklet = [[rle(obj)] for _ in range(4)]
    frame_masks = sav_masklet_to_frame_masks(masklet, 0, video_num_frames(video_path))
    frames, masks = prepare_video_inputs(video_path, frame_masks, num_frames=8)
    assert [frame_index(f) for f in frames] == [0, 0, 4, 4, 8, 8, 12, 12]
    assert all(np.array_equal(x, obj) for x in masks)


def test_prepare_count_mismatch(video_path):
    with pytest.raises(DamInputError, match=r"12 frames.*16 frames"):
        prepare_video_inputs(video_path, masklet_visible([1, 2], 12))
    frames_in = [np.zeros((H, W, 3), np.uint8)] * 5
    with pytest.raises(DamInputError, match=r"4 frames.*5 frames"):
        prepare_video_inputs(frames_in, masklet_visible([1], 4))


def test_prepare_size_mismatch_and_empty(video_path):
    masks = [np.ones((H // 2, W // 2), bool)] * T
    with pytest.raises(DamInputError, match="size"):
        prepare_video_inputs(video_path, masks)
    with pytest.raises(DamInputError, match="empty in every frame"):
        prepare_video_inputs(video_path, [None] * T)


def test_prepare_polygon_masklet_uses_frame_size(video_path):
    square = [[10, 5, 30, 5, 30, 25, 10, 25]]  # COCO polygon (x, y, ...): needs the frame size
    masks = [None] * T
    masks[11] = square
    frames, out = prepare_video_inputs(video_path, masks, num_frames=2)
    assert [frame_index(f) for f in frames] == [11, 11]
    assert out[0].shape == (H, W) and out[0][15, 20] and not out[0][40, 50]
