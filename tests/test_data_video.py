"""DLC-SDP video stage: SA-V masklets -> 8-frame video rows (fake VLM server, tiny DAM, tiny Mask2Former)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")
torch = pytest.importorskip("torch")
av = pytest.importorskip("av")

from tests.sdp_fixtures import DeterministicLabeler, InterruptingLabeler, box, compressed_rle, write_json  # noqa: E402

from dam.configio import ConfigError  # noqa: E402
from dam.masks import rle_to_mask  # noqa: E402
from dam.schema import decode_row, load_dataset_dir  # noqa: E402
from dam.video import read_video_frames, sample_masklet_frames  # noqa: E402
from data_pipeline.config import FilterConfig, OutputConfig, SourceConfig, VideoPartialConfig, VideoStageConfig  # noqa: E402
from data_pipeline.rejection import Instances  # noqa: E402
from data_pipeline.video_stage import run_video_stage  # noqa: E402

H, W, FRAMES = 32, 64, 33  # SA-V annotates every 4th frame: 0, 4, ..., 32 (decord 0.6 misreads 48-px-wide batches)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: intra-op threads cost more in synchronisation than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_video(path: Path, frames: int, seed: int) -> None:
    """An mp4 whose frames differ (noise and a moving bright block), so frame indices are checkable."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for i in range(frames):
            frame = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
            frame[4:20, i % 30:i % 30 + 16] = 240
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def moving(t: int) -> np.ndarray:
    return box(H, W, t, 2, t + 12, 14)


def make_sav(root: Path) -> dict[str, dict[int, np.ndarray]]:
    """sav_000001 and sav_000004: usable (4 masklets each: visible throughout; visible in 3 annotated frames;
    a bad RLE; a 4-pixel one); sav_000002: truncated JSON; sav_000003: not a video."""
    root.mkdir(parents=True)
    expected: dict[str, dict[int, np.ndarray]] = {}
    for video in ("sav_000001", "sav_000004"):
        write_video(root / f"{video}.mp4", FRAMES, seed=int(video[-1]))
        steps = range((FRAMES - 1) // 4 + 1)
        empty = np.zeros((H, W), bool)
        a = [moving(t) for t in steps]
        b = [box(H, W, 30, 16, 44, 30) if 2 <= t <= 4 else empty for t in steps]
        tiny = [box(H, W, 0, 30, 2, 32) for _ in steps]
        masklet = [[compressed_rle(a[t]), compressed_rle(b[t]), compressed_rle(a[t]), compressed_rle(tiny[t])] for t in steps]
        masklet[3][2] = {"size": [H, W], "counts": "!!broken"}
        write_json(root / f"{video}_manual.json", {
            "video_id": video, "video_height": float(H), "video_width": float(W), "masklet": masklet,
            "masklet_id": [0, 1, 2, 3],
        })
        expected[f"sav/{video}/manual/0"] = {4 * t: a[t] for t in steps}
        expected[f"sav/{video}/manual/1"] = {4 * t: b[t] for t in steps}
    write_video(root / "sav_000002.mp4", 9, seed=2)
    (root / "sav_000002_manual.json").write_text('{"masklet": [[{"size": [32, 64], "coun', encoding="utf-8")
    (root / "sav_000003.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video")
    write_json(root / "sav_000003_manual.json", {"masklet": [[compressed_rle(moving(0))]], "masklet_id": [0]})
    return expected


@pytest.fixture
def sav(tmp_path):
    root = tmp_path / "sav"
    return root, make_sav(root)


def video_config(root: Path, out: Path, **overrides) -> VideoStageConfig:
    config = VideoStageConfig(
        source=SourceConfig(type="sav", images=str(root)), filters=FilterConfig(min_area=10),
        partial=VideoPartialConfig(), output=OutputConfig(dir=str(out), shard_size=2), seed=5, batch_size=2, device="cpu",
    )
    for key, value in overrides.items():
        target = config
        *parents, name = key.split(".")
        for parent in parents:
            target = getattr(target, parent)
        setattr(target, name, value)
    return config


def sampled(masklet: dict[int, np.ndarray]) -> list[int]:
    """The 8 frames the stage must pick: dam.video's even spread over the visible annotated frames."""
    visible = [None] * FRAMES
    for frame, mask in masklet.items():
        visible[frame] = mask if mask.any() else None
    return sample_masklet_frames(visible, 8)


def rows_of(out: Path, tmp_path: Path) -> list[dict]:
    return sorted(load_dataset_dir(out, cache_dir=tmp_path / "hf-cache"), key=lambda r: r["id"])


KEPT = ["sav/sav_000001/manual/0", "sav/sav_000001/manual/1", "sav/sav_000004/manual/0", "sav/sav_000004/manual/1"]


def test_rows_hold_eight_frames_and_the_masklets_masks(sav, tmp_path):
    root, expected = sav
    labeler = DeterministicLabeler()
    summary = run_video_stage(video_config(root, tmp_path / "out"), labeler=labeler, progress=False)
    rows = rows_of(tmp_path / "out", tmp_path)
    assert [r["id"] for r in rows] == KEPT
    for row in rows:
        masklet = expected[row["id"]]
        indices = sampled(masklet)
        assert row["frame_indices"] == indices and len(row["frame_masks"]) == 8
        assert row["video"] == f"{row['id'].split('/')[1]}.mp4" and row["image"] is None and row["source"] == "sav"
        decoded = decode_row(row, root=root)  # what dam-train reads: 8 frames from the mp4, 8 masks
        assert decoded.is_video and len(decoded.frames) == len(decoded.masks) == 8
        for t, frame_index in enumerate(indices):
            np.testing.assert_array_equal(decoded.masks[t], masklet[frame_index])
            np.testing.assert_array_equal(rle_to_mask(row["frame_masks"][t]), masklet[frame_index])
        np.testing.assert_array_equal(np.stack(decoded.frames), np.stack(read_video_frames(root / row["video"], indices)))
    assert expected["sav/sav_000001/manual/1"] and rows[1]["frame_indices"] == [8, 8, 12, 12, 12, 12, 16, 16]
    request = next(r for r in labeler.requests if r.region_id == "sav/sav_000001/manual/0")
    assert len(request.frames) == len(request.masks) == 8 and request.frames[0].shape == (H, W, 3)
    tally = summary.tally.to_json()
    assert tally["units"] == {"seen": 4, "skipped": {"corrupt_json": 1, "corrupt_video": 1}}
    assert tally["filters"] == {
        "source": {"kept": 6, "rejected": {"bad_mask": 2}},
        "min_area": {"kept": 4, "rejected": {"too_small": 2}},
        "video": {"kept": 4, "rejected": {}},
        "labeler": {"kept": 4, "rejected": {}},
    }
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["stage"] == "video" and run["kind"] == "video" and run["image_root"] == str(root)
    from data_pipeline.merge import merge_datasets

    merge_datasets([tmp_path / "out"], tmp_path / "merged", progress=False)
    merged = sorted(load_dataset_dir(tmp_path / "merged", cache_dir=tmp_path / "hf-merged"), key=lambda r: r["id"])
    assert [r["id"] for r in merged] == KEPT and decode_row(merged[0], root=root).is_video


def test_bytes_storage_keeps_the_frames_themselves(sav, tmp_path):
    root, expected = sav
    config = video_config(root, tmp_path / "out", **{"output.image_storage": "bytes", "source.limit": 1})
    run_video_stage(config, labeler=DeterministicLabeler(), progress=False)
    rows = rows_of(tmp_path / "out", tmp_path)
    assert [r["id"] for r in rows] == KEPT[:2]
    for row in rows:
        assert row["video"] is None and len(row["frames"]) == 8 and row["frame_indices"] == []  # the schema's frames form
        decoded = decode_row(row)  # self-contained
        indices = sampled(expected[row["id"]])
        np.testing.assert_array_equal(np.stack(decoded.frames), np.stack(read_video_frames(root / "sav_000001.mp4", indices)))
        for t, frame_index in enumerate(indices):
            np.testing.assert_array_equal(decoded.masks[t], expected[row["id"]][frame_index])


def test_openai_labeler_sends_one_image_per_frame(sav, tmp_path):
    from tests.fake_labeler import FakeLabelerServer, request_parts

    root, _ = sav
    with FakeLabelerServer() as server:
        config = video_config(root, tmp_path / "out", labeler={
            "type": "openai", "base_url": server.base_url, "rejection_retries": 0, "views": {"max_side": 64},
        })
        summary = run_video_stage(config, progress=False)
        bodies = list(server.bodies)
    assert summary.rows == 4 and len(bodies) == 4
    for body in bodies:
        text, urls = request_parts(body)
        assert len(urls) == 8 and all(url.startswith("data:image/jpeg;base64,") for url in urls)
        assert "The 8 images are frames of one video in time order" in text and "the highlighted object" in text
    assert all("surface" in r["caption"] for r in rows_of(tmp_path / "out", tmp_path))


def test_video_dam_labels_masklets_from_their_frames(sav, tmp_path):
    from dam import DescribeAnything
    from tests.factories import tiny_dam, tiny_tokenizer

    root, _ = sav
    DescribeAnything(tiny_dam(seed=3), tiny_tokenizer()).save_pretrained(tmp_path / "dam")
    section = {"type": "dam", "path": str(tmp_path / "dam"), "device": "cpu", "max_new_tokens": 6, "cleaning": {"min_words": 1}}
    config = video_config(root, tmp_path / "out", labeler=section, **{"source.limit": 1})
    from data_pipeline.labelers.video import build_video_labeler

    labeler = build_video_labeler(section, num_frames=8)
    seen = []
    describe_batch = labeler.describer.describe_batch

    def spy(regions, **kwargs):
        seen.extend(regions)
        return describe_batch(regions, **kwargs)

    labeler.describer.describe_batch = spy
    summary = run_video_stage(config, labeler=labeler, progress=False)
    assert [len(region["video"]) for region in seen] == [8, 8] and all(len(region["masks"]) == 8 for region in seen)
    tally = summary.tally.to_json()["filters"]["labeler"]
    assert tally["kept"] + sum(tally["rejected"].values()) == 2 and summary.rows == tally["kept"]
    with pytest.raises(ConfigError, match="num_frames is 4 but the DAM at labeler.path takes 8 frames"):
        build_video_labeler(section, num_frames=4)


class WholeFrame:
    """An instance model that sees one object filling every frame: each masklet is a small part of it."""

    def instances(self, image: np.ndarray) -> Instances:
        return Instances(np.ones((1, *image.shape[:2]), bool), ["wall"])


class Halves:
    """An instance model seeing two objects: the left half ("dog" in the first frame of a video, "cat" in
    the others) and the right half ("car")."""

    def __init__(self, first_frames: list[np.ndarray]) -> None:
        self.first_frames = first_frames

    def instances(self, image: np.ndarray) -> Instances:
        left = np.zeros(image.shape[:2], bool)
        left[:, : image.shape[1] // 2] = True
        first = any(np.array_equal(image, frame) for frame in self.first_frames)
        return Instances(np.stack([left, ~left]), ["dog" if first else "cat", "car"])


def test_whole_masklets_take_the_majority_class_of_their_judged_frames(sav, tmp_path):
    root, _ = sav
    first_frames = [read_video_frames(root / f"{video}.mp4", [0])[0] for video in ("sav_000001", "sav_000004")]
    config = video_config(root, tmp_path / "out", **{"partial.path": "halves-model", "partial.match_iou": 0.05, "partial.min_inside": 1.0})
    labeler = DeterministicLabeler()
    summary = run_video_stage(config, labeler=labeler, instances=Halves(first_frames), progress=False)
    assert summary.tally.to_json()["filters"]["partial"] == {"kept": 4, "rejected": {}}
    # Masklet 0 stays in the left half and is judged on video frames 0, 20, 32 (dog, cat, cat): "cat", not the
    # first frame's "dog". Masklet 1 lies mostly in the right half: "car".
    expected = {i: "cat" if i.endswith("/0") else "car" for i in KEPT}
    assert {r.region_id: r.category for r in labeler.requests} == expected  # the labeler's prompt names it
    rows = rows_of(tmp_path / "out", tmp_path)
    assert {r["id"]: r["category"] for r in rows} == expected
    assert all(r["caption"].startswith(f"A {expected[r['id']]} (") for r in rows)
    unnamed = video_config(root, tmp_path / "unnamed", **{"partial.path": "halves-model", "partial.match_iou": 1.0,
                                                          "partial.min_inside": 1.0})
    labeler = DeterministicLabeler()
    run_video_stage(unnamed, labeler=labeler, instances=Halves(first_frames), progress=False)
    assert {r.category for r in labeler.requests} == {None}  # kept unmatched ("unmatched: keep"): no class to give


def test_partial_masklets_are_dropped(sav, tmp_path, monkeypatch):
    root, _ = sav
    config = video_config(root, tmp_path / "out", **{"partial.path": "whole-frame-model", "partial.frames": 3})
    calls = []
    model = WholeFrame()
    monkeypatch.setattr(model, "instances", lambda image: calls.append(image.shape) or WholeFrame.instances(model, image))
    summary = run_video_stage(config, labeler=DeterministicLabeler(), instances=model, progress=False)
    assert summary.rows == 0
    assert summary.tally.to_json()["filters"]["partial"] == {"kept": 0, "rejected": {"partial": 4}}
    # 3 judged frames per masklet, instances computed once per distinct frame of a video
    assert 0 < len(calls) <= 2 * 6

    from tests.test_data_stage2 import save_tiny_mask2former

    m2f = save_tiny_mask2former(tmp_path / "m2f")
    real = video_config(root, tmp_path / "real", **{"partial.path": str(m2f), "partial.threshold": 0.0, "partial.match_iou": 1.0,
                                                    "partial.min_inside": 0.0})
    tally = run_video_stage(real, labeler=DeterministicLabeler(), progress=False).tally.to_json()["filters"]
    assert tally["partial"]["kept"] + sum(tally["partial"]["rejected"].values()) == 4
    assert tally["partial"]["rejected"].get("partial", 0) > 0  # nothing whole, everything touching an instance a part


def test_a_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(sav, tmp_path):
    root, _ = sav
    run_video_stage(video_config(root, tmp_path / "reference", batch_size=1, **{"output.shard_size": 1}), labeler=DeterministicLabeler(), progress=False)
    config = video_config(root, tmp_path / "out", batch_size=1, **{"output.shard_size": 1})
    with pytest.raises(KeyboardInterrupt):  # killed at the first masklet of the 4th video (shard 3)
        run_video_stage(config, labeler=InterruptingLabeler(after=2), progress=False)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.report.json")) == [f"shard-0000{k}.report.json" for k in range(3)]
    summary = run_video_stage(config, labeler=DeterministicLabeler(), progress=False)
    assert summary.shards_skipped == [0, 1, 2] and summary.shards_written == [3]
    key = lambda r: (r["id"], r["caption"], r["frame_indices"], [m["counts"] for m in r["frame_masks"]])  # noqa: E731
    assert [key(r) for r in rows_of(tmp_path / "out", tmp_path)] == [key(r) for r in rows_of(tmp_path / "reference", tmp_path)]


def test_cli_video_with_the_placeholder_labeler(sav, tmp_path, capsys):
    from data_pipeline.cli import main

    root, _ = sav
    repo = Path(__file__).resolve().parents[1]
    argv = ["video", "--config", str(repo / "configs/data/video_sav.yaml"), "--no-progress", f"source.images={root}",
            f"output.dir={tmp_path / 'out'}", "partial.path=null", "labeler={type: placeholder}", "filters.min_area=10",
            "filters.max_area_fraction=null", "device=cpu"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().startswith("video: 4 rows from 4 units in 1 of 1 shards (worker 0/1;")
    assert {r["caption"] for r in rows_of(tmp_path / "out", tmp_path)} == {"A placeholder description of the object, written by no model at all."}
    assert main([*argv[:-1], "labeler={type: transformers, path: /x}"]) == 2
    assert "labeler.type 'transformers' cannot caption videos" in capsys.readouterr().err
    assert main([*argv, "source.type=sa1b"]) == 2
    assert "source.type must be 'sav' for the video stage" in capsys.readouterr().err


def test_a_masklet_the_labeler_timed_out_on_is_retried_by_a_rerun(sav, tmp_path):
    """The video stage shares stage 1's rule: a transient labeler failure leaves its shard for the rerun."""
    from data_pipeline.labelers import LabelResult

    class TimesOut(DeterministicLabeler):
        def label(self, requests):
            return [LabelResult(None, "timeout", transient=True) if r.region_id == KEPT[2] else answer
                    for r, answer in zip(requests, super().label(requests))]

    root, _ = sav
    run_video_stage(video_config(root, tmp_path / "reference", **{"output.shard_size": 1}), labeler=DeterministicLabeler(), progress=False)
    config = video_config(root, tmp_path / "out", **{"output.shard_size": 1})
    first = run_video_stage(config, labeler=TimesOut(), progress=False)
    assert list(first.shards_failed.values()) == [1] and "rerun the same command" in first.retry_message()
    labeler = DeterministicLabeler()
    second = run_video_stage(config, labeler=labeler, progress=False)
    assert second.shards_written == list(first.shards_failed) and second.shards_failed == {}
    assert sorted(r.region_id for r in labeler.requests) == KEPT[2:]  # only sav_000004's masklets are asked again
    key = lambda r: (r["id"], r["caption"], r["frame_indices"])  # noqa: E731
    assert [key(r) for r in rows_of(tmp_path / "out", tmp_path)] == [key(r) for r in rows_of(tmp_path / "reference", tmp_path)]
