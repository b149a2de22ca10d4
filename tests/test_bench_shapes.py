"""dam-bench shapes: regions of fresh scenes, caption scoring per attribute and size class."""

from __future__ import annotations



from bench.shapes import EVAL_SEED, evaluation_regions, format_table, score_captions
from dam.shapes import ATTRIBUTES, caption_for, scene


def test_evaluation_regions_are_every_object_of_consecutive_scenes():
    regions, truths = evaluation_regions(9, seed=5)
    objects = [obj for index in range(4) for obj in scene(5, index).objects][:9]
    assert truths == [obj.attributes for obj in objects]
    assert all(image.shape == (512, 512, 3) and mask.shape == (512, 512) for image, mask in regions)
    assert EVAL_SEED > 1000  # far from the small seeds training sets use


def test_scores_per_attribute_and_size():
    _, truths = evaluation_regions(30)
    perfect = [caption_for(**t) for t in truths]
    report = score_captions(perfect, truths)
    assert all(value == 1.0 for group in report["accuracy"].values() for value in group.values())
    assert report["all_attributes_correct"] == 1.0
    assert sum(report["counts"][size] for size in ("small", "medium", "large") if size in report["counts"]) == 30

    wrong_color = [caption_for(**{**t, "color": "green" if t["color"] != "green" else "red"}) for t in truths]
    report = score_captions(wrong_color, truths)
    assert report["accuracy"]["all"]["color"] == 0.0
    assert all(report["accuracy"]["all"][a] == 1.0 for a in ATTRIBUTES if a != "color")
    assert report["all_attributes_correct"] == 0.0
    assert "color" in format_table(report)


def test_malformed_captions_score_only_what_they_say():
    truths = [{"size": "small", "color": "red", "pattern": "striped", "shape": "circle", "position": "top left"}]
    report = score_captions(["a red thing"], truths)
    accuracy = report["accuracy"]["small"]
    assert accuracy["color"] == 1.0 and accuracy["shape"] == 0.0 and accuracy["position"] == 0.0


def test_cli_rejects_a_missing_model(tmp_path, capsys):
    from bench.cli import main

    assert main(["shapes", "--model", str(tmp_path / "absent"), "--num-regions", "2"]) == 2
    assert "does not exist" in capsys.readouterr().err
