"""DLC-SDP sources: COCO-format, semantic PNGs, SA-1B, SA-V enumerate the right regions and skip damage."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from tests.sdp_fixtures import box, compressed_rle, make_coco, make_sa1b, rgb, write_json, write_video

from dam.configio import ConfigError  # noqa: E402
from dam.errors import DamInputError  # noqa: E402
from dam.masks import rle_to_mask  # noqa: E402
from data_pipeline.config import SourceConfig  # noqa: E402
from data_pipeline.sources import SkipLog, UnitSkipped, build_source, load_unit  # noqa: E402
from data_pipeline.tally import Tally  # noqa: E402


def _all_regions(source):
    regions, skipped, rejected = {}, Counter(), Counter()
    for key in source.units():
        try:
            unit = source.load(key)
        except UnitSkipped as skip:
            skipped[skip.reason] += 1
            continue
        rejected.update(unit.rejected)
        for region in unit.regions:
            regions[region.id] = (unit, region)
    return regions, skipped, rejected


def test_coco_regions_masks_and_categories(tmp_path):
    fx = make_coco(tmp_path)
    source = build_source(SourceConfig(type="coco", annotations=str(fx.annotations), images=str(fx.images)))
    assert source.units() == ["1", "2", "3", "4", "5"]  # by image id, whatever the file's order
    regions, skipped, rejected = _all_regions(source)
    assert list(regions) == ["coco/1/10", "coco/1/11", "coco/1/12", "coco/2/21", "coco/2/23", "coco/3/31", "coco/4/41"]
    assert skipped == {"missing_image": 1}
    assert rejected == {"iscrowd": 1, "bad_mask": 1}
    for region_id, (unit, region) in regions.items():
        assert region.category == fx.categories[region_id]
        np.testing.assert_array_equal(rle_to_mask(region.mask), fx.masks[region_id])
        assert region.area == fx.masks[region_id].sum()
        assert unit.id == region_id.rsplit("/", 1)[0] and unit.kind == "image"
    unit, region = regions["coco/1/11"]
    assert region.extra["bbox"] == [22, 2, 7, 16] and "segmentation" not in region.extra
    assert unit.path == fx.images / "000001.jpg" and unit.size == (32, 48)
    np.testing.assert_array_equal(unit.load_image(), fx.pixels["coco/1"])
    with pytest.raises(UnitSkipped, match="000004.jpg") as corrupt:
        regions["coco/4/41"][0].load_image()
    assert corrupt.value.reason == "corrupt_image"


def test_coco_lvis_style_entries_and_limit(tmp_path):
    (tmp_path / "coco" / "val2017").mkdir(parents=True)
    Image.fromarray(rgb(20, 30, 0)).save(tmp_path / "coco" / "val2017" / "000000000009.jpg")
    write_json(tmp_path / "lvis.json", {
        "images": [{"id": 9, "coco_url": "http://images.cocodataset.org/val2017/000000000009.jpg", "height": 20, "width": 30},
                   {"id": 10, "coco_url": "http://images.cocodataset.org/val2017/000000000010.jpg", "height": 20, "width": 30}],
        "annotations": [{"id": 5, "image_id": 9, "category_id": 1, "segmentation": compressed_rle(box(20, 30, 1, 1, 9, 9))},
                        {"id": 6, "image_id": 77, "category_id": 1, "segmentation": compressed_rle(box(20, 30, 1, 1, 9, 9))}],
        "categories": [{"id": 1, "name": "baseball_bat"}],
    })
    config = SourceConfig(type="coco", name="lvis", annotations=str(tmp_path / "lvis.json"), images=str(tmp_path / "coco"),
                          underscores_to_spaces=True)
    source = build_source(config)
    unit = source.load("9")
    assert unit.path == tmp_path / "coco" / "val2017" / "000000000009.jpg"
    assert [(r.id, r.category) for r in unit.regions] == [("lvis/9/5", "baseball bat")]
    config.limit = 1
    assert build_source(config).units() == ["9"]


def test_coco_wrong_images_folder_and_truncated_file_stop_at_once(tmp_path):
    fx = make_coco(tmp_path)
    with pytest.raises(ConfigError, match=r"source\.images: none of the first .* exist"):
        build_source(SourceConfig(type="coco", annotations=str(fx.annotations), images=str(tmp_path)))
    truncated = tmp_path / "truncated.json"
    truncated.write_text(fx.annotations.read_text()[:50])
    with pytest.raises(DamInputError, match="truncated.json"):
        build_source(SourceConfig(type="coco", annotations=str(truncated), images=str(fx.images)))
    with pytest.raises(ConfigError, match=r"source\.annotations: .*nope.json.* does not exist"):
        build_source(SourceConfig(type="coco", annotations=str(tmp_path / "nope.json"), images=str(fx.images)))


def test_sa1b_regions_extra_fields_and_damage(tmp_path, caplog):
    fx = make_sa1b(tmp_path / "sa1b")
    source = build_source(SourceConfig(type="sa1b", images=str(tmp_path / "sa1b")))
    assert source.units() == ["sa_1.json", "sa_2.json", "sa_3.json"]
    tally, log = Tally(), SkipLog()
    with caplog.at_level(logging.WARNING):
        units = [load_unit(source, key, tally, log) for key in source.units()]
    assert units[1] is None and units[2] is None
    assert "sa_2.json" in caplog.text and "sa_3.jpg" in caplog.text
    assert tally.units_seen == 3 and tally.units_skipped == {"corrupt_json": 1, "missing_image": 1}
    assert tally.filters["source"]["kept"] == 3 and tally.filters["source"]["rejected"] == {"bad_mask": 1}
    regions = units[0].regions
    assert [r.id for r in regions] == ["sa1b/1/1", "sa1b/1/2", "sa1b/1/4"]
    for region in regions:
        np.testing.assert_array_equal(rle_to_mask(region.mask), fx["masks"][region.id])
        assert region.category is None
        assert set(region.extra) == {"predicted_iou", "stability_score", "bbox", "point_coords", "crop_box"}
    assert regions[0].extra["predicted_iou"] == pytest.approx(0.81)
    np.testing.assert_array_equal(units[0].load_image(), fx["pixels"])


def test_semantic_connected_regions(tmp_path):
    labels = np.full((20, 30), 0, np.uint8)
    labels[2:6, 2:8] = 1  # class 1, first component
    labels[10:15, 20:28] = 1  # class 1, second component
    labels[12:18, 2:10] = 2
    labels[0:2, 25:30] = 255  # ignored
    labels[18:20, 25:30] = 7  # beyond class_names
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "lab" / "a").mkdir(parents=True)
    Image.fromarray(rgb(20, 30, 1)).save(tmp_path / "img" / "a" / "x.jpg")
    Image.fromarray(labels).save(tmp_path / "lab" / "a" / "x.png")
    Image.fromarray(rgb(20, 30, 2)).save(tmp_path / "img" / "a" / "y.jpg")
    (tmp_path / "lab" / "a" / "y.png").write_bytes(b"\x89PNG broken")
    config = SourceConfig(type="semantic", images=str(tmp_path / "img"), labels=str(tmp_path / "lab"),
                          class_names=["other", "wall", "floor"], ignore_ids=[0, 255])
    source = build_source(config)
    assert source.units() == ["a/x", "a/y"]
    regions, skipped, rejected = _all_regions(source)
    assert list(regions) == ["semantic/a/x/1/0", "semantic/a/x/1/1", "semantic/a/x/2/0"]
    assert [r.category for _, r in regions.values()] == ["wall", "wall", "floor"]
    expected = [labels == 1, labels == 1, labels == 2]
    expected[0][8:, :] = False
    expected[1][:8, :] = False
    for (_, region), mask in zip(regions.values(), expected):
        np.testing.assert_array_equal(rle_to_mask(region.mask), mask)
    assert skipped == {"corrupt_label": 1} and rejected == {"unknown_class": 1}
    names = tmp_path / "names.txt"
    names.write_text("other\nwall\nfloor\n")
    config.class_names = str(names)
    assert build_source(config).load("a/x").regions[2].category == "floor"


def test_sav_masklets_map_to_every_fourth_frame(tmp_path):
    videos = tmp_path / "sav"
    write_video(videos / "sav_000001.mp4", frames=9)
    h, w = 32, 48
    a = [box(h, w, 0, 0, 10, 10), box(h, w, 2, 2, 12, 12), box(h, w, 4, 4, 14, 14)]
    b = [box(h, w, 20, 0, 30, 10), np.zeros((h, w), bool), box(h, w, 24, 4, 34, 14)]
    write_json(videos / "sav_000001_manual.json", {
        "video_id": "sav_000001", "video_frame_count": 9.0, "video_height": float(h), "video_width": float(w),
        "masklet": [[compressed_rle(a[t]), compressed_rle(b[t])] for t in range(3)],
        "masklet_id": [0, 1], "masklet_size_bucket": ["small", "medium"], "masklet_num": 2,
    })
    write_json(videos / "sav_000001_auto.json", {
        "video_id": "sav_000001", "video_height": float(h), "video_width": float(w),
        "masklet": [[compressed_rle(b[t])] for t in range(3)], "masklet_id": [0], "masklet_stability_score": [0.97],
    })
    write_video(videos / "sav_000002.mp4", frames=5)
    (videos / "sav_000002_manual.json").write_text('{"masklet": [[{"size": [32, 48], "coun')
    write_video(videos / "sav_000003.mp4", frames=5)
    source = build_source(SourceConfig(type="sav", images=str(videos)))
    assert source.kind == "video" and source.units() == ["sav_000001", "sav_000002", "sav_000003"]
    regions, skipped, _ = _all_regions(source)
    assert skipped == {"corrupt_json": 1, "missing_annotations": 1}
    assert list(regions) == ["sav/sav_000001/manual/0", "sav/sav_000001/manual/1", "sav/sav_000001/auto/0"]
    unit, first = regions["sav/sav_000001/manual/0"]
    assert unit.kind == "video" and unit.meta["num_frames"] == 9 and unit.meta["fps"] == 24 and unit.size == (h, w)
    assert sorted(first.frame_masks) == [0, 4, 8] and first.mask is None
    for t, frame in enumerate((0, 4, 8)):
        np.testing.assert_array_equal(rle_to_mask(first.frame_masks[frame]), a[t])
        np.testing.assert_array_equal(rle_to_mask(regions["sav/sav_000001/manual/1"][1].frame_masks[frame]), b[t])
    assert first.extra == {"masklet_type": "manual", "masklet_id": 0, "masklet_size_bucket": "small"}
    assert regions["sav/sav_000001/auto/0"][1].extra["masklet_stability_score"] == 0.97
    only_manual = build_source(SourceConfig(type="sav", images=str(videos), masklet_types=["manual"]))
    assert [r.id for r in only_manual.load("sav_000001").regions] == ["sav/sav_000001/manual/0", "sav/sav_000001/manual/1"]


def test_source_options_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"source\.labels is not used by source\.type 'coco'"):
        build_source(SourceConfig(type="coco", annotations="a.json", images="x", labels="y"))
    with pytest.raises(ConfigError, match=r"source\.class_names is required"):
        build_source(SourceConfig(type="semantic", images="x", labels="y"))
    with pytest.raises(ConfigError, match=r"source\.type is required"):
        build_source(SourceConfig())
