"""DenseCap mAP: greedy ground-truth merge, one-to-one matching, 101-level AP, exact on hand-made cases."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bench import densecap as dc
from bench.cli import main as bench_main
from dam.errors import DamInputError
from dam.visual_genome import VGRegion, parse_region_descriptions

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")

# Two images, three objects far apart (no merging); boxes are [x1, y1, x2, y2].
OBJECTS = {
    1: [("A red car.", (0, 0, 10, 10)), ("green tree", (50, 50, 70, 90))],
    2: [("a dog", (5, 5, 25, 15))],
}


def _gt_json(objects=OBJECTS):
    return [
        {"id": image_id, "regions": [
            {"region_id": 10 * image_id + k, "image_id": image_id, "phrase": phrase,
             "x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1}
            for k, (phrase, (x1, y1, x2, y2)) in enumerate(regions)
        ]}
        for image_id, regions in objects.items()
    ]  # fmt: skip


def _gt(objects=OBJECTS):
    return parse_region_descriptions(_gt_json(objects))


def _pred(image_id, box, score, caption):
    return {"image_id": image_id, "box": list(box), "score": score, "caption": caption}


def exact_meteor(candidates, references):
    """1 for a caption equal to one of its (normalized) references, else 0."""
    return [1.0 if c in refs else 0.0 for c, refs in zip(candidates, references)]


def _perfect_predictions():
    scores = iter([0.9, 0.8, 0.7])
    return [_pred(i, box, next(scores), phrase) for i, regions in OBJECTS.items() for phrase, box in regions]


def test_perfect_predictions_score_one():
    result = dc.densecap_map(_gt(), _perfect_predictions(), meteor=exact_meteor)
    assert result.map == 1.0 and result.det_map == 1.0
    assert set(result.ap.values()) == {1.0} and len(result.ap) == 30 and len(result.det_ap) == 5
    assert (result.num_images, result.num_detections, result.num_ground_truth) == (2, 3, 3)


def test_iou_055_passes_three_of_five_iou_thresholds():
    preds = []
    for image_id, regions in OBJECTS.items():
        for phrase, (x1, y1, x2, y2) in regions:
            preds.append(_pred(image_id, (x1, y1, x2, y1 + 0.55 * (y2 - y1)), 0.5, phrase))  # IoU 0.55
    result = dc.densecap_map(_gt(), preds, meteor=exact_meteor)
    assert result.map == pytest.approx(0.6, abs=1e-12) and result.det_map == pytest.approx(0.6, abs=1e-12)
    for t in dc.IOU_THRESHOLDS:
        expected = 1.0 if t <= 0.5 else 0.0
        assert result.det_ap[f"iou={t:g}"] == expected
        assert all(result.ap[f"iou={t:g},meteor={m:g}"] == expected for m in dc.METEOR_THRESHOLDS)


def test_duplicate_detections_are_false_positives():
    gt = _gt({1: [("a red car", (0, 0, 10, 10)), ("green tree", (50, 50, 70, 90))]})
    preds = [
        _pred(1, (0, 0, 10, 10), 0.9, "a red car"),
        _pred(1, (0, 0, 10, 9), 0.8, "a red car"),  # IoU 0.9 with the car, which is taken
        _pred(1, (50, 50, 70, 90), 0.7, "green tree"),
    ]
    # Ranking T, F, T with 2 positives: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1. Levels 0..0.50
    # (51) reach precision 1, levels 0.51..1 (50) reach 2/3: AP = (51 + 50 * 2/3) / 101 = 253/303.
    result = dc.densecap_map(gt, preds, meteor=exact_meteor)
    assert list(result.ap.values()) == pytest.approx([253 / 303] * 30, abs=1e-12)
    assert result.map == pytest.approx(253 / 303, abs=1e-12) and result.det_map == pytest.approx(253 / 303, abs=1e-12)


def test_detection_whose_best_box_is_taken_misses_even_if_another_box_fits():
    # The wheel has IoU 0.6 with the car: below 0.7, so the two stay separate.
    gt = _gt({1: [("a red car", (0, 0, 10, 10)), ("a wheel", (0, 0, 10, 6)), ("green tree", (50, 50, 70, 90))]})
    preds = [
        _pred(1, (0, 0, 10, 10), 0.9, "a red car"),
        _pred(1, (0, 0, 10, 9), 0.8, "a wheel"),  # IoU 0.9 with the taken car, 0.67 with the free wheel
        _pred(1, (50, 50, 70, 90), 0.7, "green tree"),
    ]
    # T, F, T with 3 positives: recall 1/3 for levels 0..0.33 (34, precision 1), 2/3 for levels
    # 0.34..0.66 (33, precision 2/3), never above: AP = (34 + 33 * 2/3) / 101 = 56/101.
    result = dc.densecap_map(gt, preds, meteor=exact_meteor)
    assert result.num_ground_truth == 3
    assert result.det_map == pytest.approx(56 / 101, abs=1e-12) and result.map == pytest.approx(56 / 101, abs=1e-12)


def test_images_without_predictions_only_add_positives(caplog):
    preds = [p for p in _perfect_predictions() if p["image_id"] == 1]
    result = dc.densecap_map(_gt(), preds, meteor=exact_meteor)
    # T, T with 3 positives: recall 2/3 reached for levels 0..0.66 (67) at precision 1.
    assert result.map == pytest.approx(67 / 101, abs=1e-12) and result.num_ground_truth == 3
    assert "1 of 2 ground-truth images have no predictions" in caplog.text


def _regions(boxes):
    return [VGRegion(image_id=1, box=tuple(map(float, box)), phrase=phrase) for phrase, box in boxes]


def test_greedy_merge_takes_the_box_with_most_neighbours():
    # "a" overlaps "b" and "c" at IoU 0.82, but "b" and "c" overlap at only 0.68: "a" has the most
    # neighbours (3 with itself) although it is not first; "d" is far away.
    regions = _regions([("b", (1, 0, 11, 10)), ("a", (0, 0, 10, 10)), ("c", (0, 1, 10, 11)),
                        ("d", (100, 100, 110, 110))])  # fmt: skip
    merged = dc.merge_ground_truth(regions)
    assert len(merged) == 2
    assert merged[0].box == pytest.approx((1 / 3, 1 / 3, 31 / 3, 31 / 3))
    assert merged[0].references == ["b", "a", "c"]
    assert merged[1].box == (100.0, 100.0, 110.0, 110.0) and merged[1].references == ["d"]


def test_greedy_merge_counts_only_remaining_boxes_and_breaks_ties_low():
    # A chain: x1 and x2 both have 3 neighbours; x1 (lower index) wins and takes x0..x2; x3 then
    # has only itself left, although it overlapped x2.
    chain = _regions([(f"x{k}", (k, 0, 10 + k, 10)) for k in range(4)])
    merged = dc.merge_ground_truth(chain)
    assert [m.references for m in merged] == [["x0", "x1", "x2"], ["x3"]]
    assert merged[0].box == pytest.approx((1.0, 0.0, 11.0, 10.0)) and merged[1].box == (3.0, 0.0, 13.0, 10.0)
    # Two pairs, every count 2: the pair of the lowest index goes first.
    pairs = _regions([("q0", (50, 50, 60, 60)), ("p0", (0, 0, 10, 10)),
                      ("q1", (50, 50, 60, 59)), ("p1", (0, 0, 10, 9.5))])  # fmt: skip
    assert [m.references for m in dc.merge_ground_truth(pairs)] == [["q0", "q1"], ["p0", "p1"]]
    assert dc.merge_ground_truth([]) == []


def test_merged_ground_truth_is_one_positive_with_every_reference():
    gt = _gt({1: [("A car.", (0, 0, 10, 10)), ("the vehicle", (1, 0, 11, 10)), ("red auto", (0, 1, 10, 11)),
                  ("sky", (100, 100, 110, 110))]})  # fmt: skip
    calls = []

    def meteor(candidates, references):
        calls.append((list(candidates), [list(r) for r in references]))
        return exact_meteor(candidates, references)

    result = dc.densecap_map(gt, [_pred(1, (0, 0, 10, 10), 0.9, "Red auto!")], meteor=meteor)
    assert result.num_ground_truth == 2 and result.num_regions == 4
    assert calls == [(["red auto"], [["a car", "the vehicle", "red auto"]])]
    assert result.map == pytest.approx(51 / 101, abs=1e-12)  # recall 1/2 reached at precision 1


def test_interpolated_ap_by_hand():
    # T, F, T, F, F with 4 positives: precision 1, 1/2, 2/3, 1/2, 2/5 at recall 1/4, 1/4, 1/2, 1/2, 1/2.
    # Levels 0..0.25 (26): best precision 1; 0.26..0.50 (25): 2/3; 0.51..1 (50): 0.
    assert dc.interpolated_ap([True, False, True, False, False], 4) == pytest.approx(128 / 303, abs=1e-12)
    # Level 0 takes the best precision anywhere in the ranking, not the first one.
    assert dc.interpolated_ap([False, True], 1) == pytest.approx(0.5, abs=1e-12)
    # Recall 3/10 reaches level 0.30 exactly (compared without float rounding).
    assert dc.interpolated_ap([True] * 3, 10) == pytest.approx(31 / 101, abs=1e-12)
    assert dc.interpolated_ap([], 3) == 0.0
    with pytest.raises(DamInputError, match="at least one"):
        dc.interpolated_ap([True], 0)


@pytest.mark.parametrize("meteor_value, passing", [(1.0, 6), (0.12, 3), (0.1, 2), (0.0, 0)])
def test_meteor_must_exceed_the_threshold(meteor_value, passing):
    gt = _gt({1: [("a cat", (0, 0, 10, 10)), ("a dog", (50, 50, 60, 60))]})
    preds = [_pred(1, (0, 0, 10, 10), 0.9, "cat"), _pred(1, (50, 50, 52, 60), 0.5, "dog")]  # IoU 1 and 0.2
    seen = []

    def meteor(candidates, references):
        seen.extend(candidates)
        return [meteor_value] * len(candidates)

    result = dc.densecap_map(gt, preds, meteor=meteor)
    assert seen == ["cat"]  # IoU 0.2 can never be a true positive: not scored
    # T, F (IoU 0.2) with 2 positives: levels 0..0.50 at precision 1.
    assert result.det_map == pytest.approx(51 / 101, abs=1e-12)
    assert result.map == pytest.approx(passing / 6 * 51 / 101, abs=1e-12)
    for m in dc.METEOR_THRESHOLDS:
        expected = 51 / 101 if meteor_value > m else 0.0
        assert result.ap[f"iou=0.5,meteor={m:g}"] == pytest.approx(expected, abs=1e-12)


def test_max_images_and_string_image_ids():
    preds = [{**p, "image_id": str(p["image_id"])} for p in _perfect_predictions()]
    result = dc.densecap_map(_gt(), preds, meteor=exact_meteor, max_images=1)
    assert (result.num_images, result.num_detections, result.num_ground_truth, result.map) == (1, 2, 2, 1.0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: {"box": p["box"]}, "entry 1 lacks 'image_id', 'score', 'caption'"),
        (lambda p: {**p, "box": [0, 0, 10]}, r"entry 1 has box \[0, 0, 10\]; it must be 4 finite numbers"),
        (lambda p: {**p, "box": [0, 0, True, 10]}, "it must be 4 finite numbers"),
        (lambda p: {**p, "box": [50, 50, 20, 40]}, r"not \[x, y, width, height\]"),
        (lambda p: {**p, "score": "high"}, "entry 1 has score 'high'"),
        (lambda p: {**p, "caption": None}, "entry 1 has a caption that is not a string"),
        (lambda p: {**p, "image_id": 99}, "entry 1 has image_id 99, which is not in the ground truth"),
        (lambda p: "a car", "entry 1 is not an object"),
    ],
)
def test_bad_predictions_name_the_entry(mutate, message):
    preds = _perfect_predictions()
    preds[1] = mutate(preds[1])
    with pytest.raises(DamInputError, match=message):
        dc.densecap_map(_gt(), preds, meteor=exact_meteor, source="predictions file 'p.json'")
    with pytest.raises(DamInputError, match="must be a list"):
        dc.densecap_map(_gt(), {"1": []}, meteor=exact_meteor)
    with pytest.raises(DamInputError, match="has no regions"):
        dc.densecap_map({1: []}, [], meteor=exact_meteor)


def test_summary_table():
    text = dc.densecap_map(_gt(), _perfect_predictions(), meteor=exact_meteor).summary()
    assert "DenseCap mAP (x100): 100.00" in text and "detection mAP (x100): 100.00" in text
    assert "METEOR>0.25" in text and text.splitlines()[-1].startswith("IoU>=0.7")


def _write_inputs(tmp_path, preds):
    (tmp_path / "gt.json").write_text(json.dumps(_gt_json()))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    return ["densecap", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "preds.json")]


def test_cli_prints_table_and_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dc, "java_meteor", exact_meteor)
    argv = _write_inputs(tmp_path, _perfect_predictions())
    assert bench_main([*argv, "--max-images", "1"]) == 0
    out = capsys.readouterr().out
    assert "DenseCap mAP (x100): 100.00" in out and "1 images, 2 detections" in out
    (tmp_path / "preds.json").write_text(json.dumps([{"image_id": 1}]))
    assert bench_main(argv) == 2
    assert "dam-bench densecap: error: predictions file" in capsys.readouterr().err
    assert bench_main(["densecap", "--gt", str(tmp_path / "nope.json"), "--pred", str(tmp_path / "preds.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


@needs_java
def test_cli_json_with_java_meteor_in_one_jvm(tmp_path, capsys, monkeypatch):
    preds = _perfect_predictions()
    preds[1]["caption"] = "zebra"  # the tree, found but wrongly described: METEOR 0
    preds[2]["image_id"] = "2"
    argv = _write_inputs(tmp_path, preds)
    java = []
    original = subprocess.Popen

    class CountingPopen(original):
        def __init__(self, args, *rest, **kwargs):
            if "java" in Path(str(args[0])).name:
                java.append(args)
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", CountingPopen)
    assert bench_main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(java) == 1
    # Language: T, F, T with 3 positives -> 56/101 at every threshold; detection: all found -> 1.
    assert result["map"] == pytest.approx(56 / 101, abs=1e-12)
    assert result["det_map"] == 1.0
    assert set(result["ap"]) == {f"iou={t:g},meteor={m:g}" for t in dc.IOU_THRESHOLDS for m in dc.METEOR_THRESHOLDS}
    assert "iou=0.3,meteor=0.05" in result["ap"]
    assert (result["num_images"], result["num_detections"], result["num_ground_truth"]) == (2, 3, 3)
