"""`dam-bench densecap-run`: FCLN or SAM proposals, FCLN or DAM captions, the DenseCap mAP.

ShapesDLC scenes in VG layout, a tiny random FCLN, the built-in ShapesDLC DAM and a tiny random
SAM (thresholds 0, so its random masks pass). METEOR is the exact-match stand-in of
tests/test_bench_densecap.py, so no JVM starts; the mAP check is that the run's numbers equal
`bench.densecap` on the files the run wrote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import bench.densecap
from bench.cli import main as dam_bench
from bench.densecap import densecap_map, parse_predictions
from bench.densecap_run import densecap_run, evaluated_ground_truth, selected_image_ids
from dam import DescribeAnything
from dam.densecap import DamCaptioner, DenseCaptioner, SamProposer
from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic
from dam.visual_genome import load_region_descriptions
from data_pipeline.shapes_layouts import write_shapes_visual_genome
from tests.test_bench_densecap import exact_meteor

PRED_KEYS = {"image_id", "box", "score", "caption"}


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def no_jvm(monkeypatch):
    """The command's default METEOR is Java's; these tests score with the exact-match stand-in."""
    monkeypatch.setattr(bench.densecap, "java_meteor", exact_meteor)


@pytest.fixture(scope="module")
def shapes_vg(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("densecap_run_vg")
    write_shapes_visual_genome(root, 4, seed=5, progress=False)
    return root


@pytest.fixture(scope="module")
def builtin() -> DescribeAnything:
    return DescribeAnything.from_pretrained()


def _args(shapes_vg: Path, out: Path, *extra: str) -> list[str]:
    return ["densecap-run", "--gt", str(shapes_vg / "region_descriptions.json"), "--images", str(shapes_vg / "images"),
            "--out", str(out), "--device", "cpu", "--no-progress", "--json", *extra]


def _check_written(out: Path, printed: dict) -> list[dict]:
    """preds.json has the benchmark's format and scores exactly as the run reported."""
    predictions = read_json(out / "preds.json", "predictions")
    gt = load_region_descriptions(out / "ground_truth.json")
    assert predictions and all(set(p) == PRED_KEYS for p in predictions)
    assert all(isinstance(p["caption"], str) and len(p["box"]) == 4 for p in predictions)
    assert {d.image_id for d in parse_predictions(predictions, {str(i): i for i in gt})} <= set(gt)
    assert densecap_map(gt, predictions, meteor=exact_meteor).to_json() == printed
    return predictions


def test_fcln_fcln_writes_scores_and_resumes(shapes_vg, fcln_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = _args(shapes_vg, out, "--proposals", "fcln", "--captioner", "fcln", "--fcln", str(fcln_dir),
                 "--max-regions", "4", "--image-batch", "2")
    assert dam_bench(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    predictions = _check_written(out, printed)
    assert printed["num_images"] == 4 and len(predictions) == 16  # 4 boxes in each of 4 images
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == ["chunk-000000.json", "chunk-000001.json",
                                                                      "settings.json"]

    captioned = []
    original_call = DenseCaptioner.__call__

    def counting_call(self, images, keys=None):
        captioned.extend(keys)
        return original_call(self, images, keys)

    monkeypatch.setattr(DenseCaptioner, "__call__", counting_call)
    assert dam_bench(argv) == 0  # everything done: nothing is captioned again
    assert captioned == [] and json.loads(capsys.readouterr().out) == printed

    (out / "checkpoint" / "chunk-000001.json").unlink()  # as if killed before the second batch
    assert dam_bench(argv) == 0
    assert sorted(captioned) == sorted(str(i) for i in list(load_region_descriptions(out / "ground_truth.json"))[2:])
    assert json.loads(capsys.readouterr().out) == printed
    assert read_json(out / "preds.json", "predictions") == predictions

    assert dam_bench([*argv, "--max-regions", "3"]) == 2  # other settings never mix into one file
    assert "other settings" in capsys.readouterr().err


def test_fcln_proposals_dam_captions(shapes_vg, fcln_dir, builtin, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _args(shapes_vg, out, "--proposals", "fcln", "--captioner", "dam", "--model", "builtin",
                 "--fcln", str(fcln_dir), "--max-regions", "2", "--max-images", "2", "--max-new-tokens", "8")
    assert dam_bench(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    predictions = _check_written(out, printed)
    assert printed["num_images"] == 2 and len(predictions) == 4 and all(p["caption"] for p in predictions)


def test_sam_proposals_dam_captions(shapes_vg, builtin, tmp_path):
    pytest.importorskip("segment_anything")
    from tests.test_sam import tiny_sam

    proposer = SamProposer(tiny_sam(), points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    dense = DenseCaptioner(proposer, DamCaptioner(builtin, max_new_tokens=8, do_sample=False), max_regions=3)
    gt = load_region_descriptions(shapes_vg / "region_descriptions.json")
    out = tmp_path / "run"
    result = densecap_run(dense, gt, shapes_vg / "images", out, image_ids=list(gt)[:2], image_batch_size=1, progress=False, meteor=exact_meteor)
    predictions = _check_written(out, result.to_json())
    assert result.num_images == 2 and 1 <= len(predictions) <= 6


def test_ground_truth_is_filtered_as_fcln_evaluation_filters_it(shapes_vg, tmp_path):
    gt_json = read_json(shapes_vg / "region_descriptions.json", "gt")[:3]
    regions = gt_json[0]["regions"]
    regions.append({**regions[0], "phrase": "one two three four five six seven eight nine ten eleven"})
    regions.append({**regions[0], "x": 600, "phrase": "outside the image"})
    gt_json[1]["regions"] = [{**gt_json[1]["regions"][0], "phrase": "!!!"}]  # no words: the image has no region left
    write_json_atomic(tmp_path / "gt.json", gt_json)
    gt = load_region_descriptions(tmp_path / "gt.json")
    references, files = evaluated_ground_truth(gt, shapes_vg / "images", list(gt))
    first, second, third = list(gt)
    assert list(references) == list(files) == [first, third]
    assert len(references[first]) == len(regions) - 2
    assert all(r.phrase == r.phrase.lower() and "." not in r.phrase for r in references[first])

    write_json_atomic(tmp_path / "splits.json", {"train": [first], "test": [third, second]})
    assert selected_image_ids(gt, str(tmp_path / "splits.json"), "test", None) == [second, third]
    assert selected_image_ids(gt, None, "test", 2) == [first, second]
    with pytest.raises(DamInputError, match="no list 'val'"):
        selected_image_ids(gt, str(tmp_path / "splits.json"), "val", None)


def test_user_errors(shapes_vg, fcln_dir, tmp_path, capsys):
    assert dam_bench(_args(shapes_vg, tmp_path, "--proposals", "sam", "--captioner", "dam")) == 2
    assert "--proposals sam needs --sam-checkpoint" in capsys.readouterr().err
    assert dam_bench(_args(shapes_vg, tmp_path, "--proposals", "fcln", "--captioner", "dam")) == 2
    assert "--proposals fcln needs --fcln" in capsys.readouterr().err
    assert dam_bench(_args(shapes_vg, tmp_path, "--proposals", "fcln", "--captioner", "fcln", "--fcln", str(tmp_path))) == 2
    assert "not an FCLN folder" in capsys.readouterr().err


def test_prediction_checkpoint_refuses_or_replaces_other_settings(tmp_path, caplog):
    from dam.fcln.evaluation import PredictionCheckpoint

    first = PredictionCheckpoint(tmp_path, {"model": "a"})
    first.add([(1, [{"image_id": 1}]), ("x", [])])
    assert PredictionCheckpoint(tmp_path, {"model": "a"}).done() == {"1", "x"}
    with pytest.raises(DamInputError, match="other settings"):
        PredictionCheckpoint(tmp_path, {"model": "b"})
    replaced = PredictionCheckpoint(tmp_path, {"model": "b"}, replace_stale=True)
    assert replaced.done() == set() and "discarding" in caplog.text
    assert PredictionCheckpoint(tmp_path, {"model": "b"}).done() == set()
