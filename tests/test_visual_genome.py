"""Visual Genome region descriptions: boxes as corners, ids wherever releases put them, clear errors."""

import json

import pytest

from dam.errors import DamInputError
from dam.visual_genome import VGRegion, load_region_descriptions, normalize_caption, parse_region_descriptions


def _region(phrase, x, y, w, h, image_id=None, region_id=None):
    region = {"phrase": phrase, "x": x, "y": y, "width": w, "height": h}
    if image_id is not None:
        region["image_id"] = image_id
    if region_id is not None:
        region["region_id"] = region_id
    return region


def test_loads_corner_boxes_in_file_order(tmp_path):
    data = [
        {"id": 7, "regions": [_region("A red car.", 10, 20, 30, 40, 7, 100), _region("sky", 0, 0, 5.5, 2, 7, 101)]},
        {"id": 3, "regions": [_region("tree", 1, 2, 3, 4, 3, 102)]},
    ]
    path = tmp_path / "region_descriptions.json"
    path.write_text(json.dumps(data))
    images = load_region_descriptions(path)
    assert list(images) == [7, 3]
    assert images[7] == [
        VGRegion(image_id=7, box=(10.0, 20.0, 40.0, 60.0), phrase="A red car.", region_id=100),
        VGRegion(image_id=7, box=(0.0, 0.0, 5.5, 2.0), phrase="sky", region_id=101),
    ]
    assert all(isinstance(v, float) for v in images[7][0].box)
    assert load_region_descriptions(path, normalize=True)[7][0].phrase == "a red car"


def test_image_id_from_entry_or_regions():
    data = [
        {"image_id": 1, "regions": [_region("a", 0, 0, 1, 1)]},
        {"regions": [_region("b", 0, 0, 1, 1, image_id=2)]},
        {"id": 3, "image_id": 99, "regions": []},
        {"id": 1, "regions": [_region("c", 0, 0, 1, 1, image_id=1)]},  # a repeated id adds to its image
    ]
    images = parse_region_descriptions(data)
    assert list(images) == [1, 2, 3]
    assert [r.phrase for r in images[1]] == ["a", "c"]
    assert images[2][0].image_id == 2 and images[3] == []


def test_max_images_keeps_the_first_images():
    data = [{"id": i, "regions": [_region(str(i), 0, 0, 1, 1)]} for i in range(5)]
    assert list(parse_region_descriptions(data, max_images=2)) == [0, 1]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A man's  RED, t-shirt!\n", "a mans red tshirt"),
        ("  2 dogs.  ", "2 dogs"),
        ("Café au lait; 100%", "café au lait 100"),
        ("...", ""),
        ("under_score\tand\u00a0tab", "underscore and tab"),
    ],
)
def test_normalize_caption(text, expected):
    assert normalize_caption(text) == expected


def test_errors_name_the_file_and_index(tmp_path):
    with pytest.raises(DamInputError, match="does not exist"):
        load_region_descriptions(tmp_path / "missing.json")
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"id": 1, "regions": []}))
    with pytest.raises(DamInputError, match=r"bad\.json.*must be a list"):
        load_region_descriptions(path)
    cases = [
        ([{"id": 1, "regions": []}, {"id": 2}], "entry 1 has no 'regions' list"),
        ([{"regions": [_region("a", 0, 0, 1, 1)]}], "entry 0 has no image id"),
        ([{"id": 1, "regions": [_region("a", 0, 0, 1, 1), {"phrase": "b", "x": 0, "y": 0}]}],
         "entry 0, region 1 lacks 'width', 'height'"),
        ([{"id": 1, "regions": [_region("a", 0, "0", 1, 1)]}], "entry 0, region 0: 'y' must be a number"),
        ([{"id": 1, "regions": [_region(None, 0, 0, 1, 1)]}], "'phrase' must be a string"),
        ([{"id": 1, "regions": ["a car"]}], "entry 0, region 0 is not an object"),
    ]  # fmt: skip
    for data, message in cases:
        path.write_text(json.dumps(data))
        with pytest.raises(DamInputError, match=message) as info:
            load_region_descriptions(path)
        assert "bad.json" in str(info.value)
