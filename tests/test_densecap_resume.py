"""dam.densecap: what a rerun may reuse, and the inputs a folder run must survive.

Outputs written into the input folder are not captioned again; results of another model, other
options or fewer regions are never resumed or reused; SAM's masks of FCLN boxes reach the JSON
and the viewer; an unreadable image is skipped and counted, not fatal; the command rejects
option mistakes before loading models. Tiny random FCLN and SAM models, the built-in DAM.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tqdm.auto import tqdm

from dam import DescribeAnything
from dam.cli import main
from dam.densecap import (
    DamCaptioner,
    DenseCaptioner,
    FclnCaptioner,
    FclnProposer,
    FixedProposer,
    Regions,
    find_images,
    region_masks,
    run_folder,
    score_queries,
    search_folder,
)
from dam.densecap.files import InputImage
from dam.densecap.runner import stored_regions
from dam.densecap.viewer import DATA_FILE
from dam.errors import DamInputError
from dam.fcln import FclnModel
from dam.masks import rle_to_mask
from dam.shapes import scene
from tests.factories import tiny_shapes_fcln
from tests.test_densecap_app import GREEDY


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def builtin() -> DescribeAnything:
    return DescribeAnything.from_pretrained()


def _two_scenes(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(scene(0, 0).image).save(folder / "a.png")
    Image.fromarray(scene(0, 1).image).save(folder / "sub" / "b.png")
    return folder


def _fcln_dense(seed: int = 0, max_regions: int = 2) -> DenseCaptioner:
    fcln = tiny_shapes_fcln(seed=seed)
    return DenseCaptioner(FclnProposer(fcln), FclnCaptioner(fcln), max_regions=max_regions)


# ---- outputs are not inputs ----------------------------------------------------------------


def test_output_equal_to_input_is_not_captioned_again(tmp_path):
    folder = _two_scenes(tmp_path / "photos")
    dense = _fcln_dense()
    assert run_folder(dense, folder, folder, progress=False).processed == 2
    assert (folder / "a.png.drawn.jpg").is_file() and (folder / "sub" / "b.png.drawn.jpg").is_file()
    assert [image.name for image in find_images(folder, folder)] == ["a.png", "sub/b.png"]
    again = run_folder(dense, folder, folder, progress=False)
    assert (again.processed, again.skipped) == (0, 2)
    assert not list(folder.rglob("*.drawn.jpg.*"))


def test_a_drawn_looking_photo_outside_the_output_is_still_an_input(tmp_path):
    folder = _two_scenes(tmp_path / "photos")
    shutil.copy(folder / "a.png", folder / "c.drawn.jpg")
    assert "c.drawn.jpg" in [image.name for image in find_images(folder, tmp_path / "out")]


# ---- settings: which results a rerun may resume or reuse -----------------------------------


def test_resume_refuses_results_of_another_model(tmp_path):
    folder = _two_scenes(tmp_path / "photos")
    run_folder(_fcln_dense(seed=0), folder, tmp_path / "out", progress=False)
    with pytest.raises(DamInputError, match="other settings"):
        run_folder(_fcln_dense(seed=1), folder, tmp_path / "out", progress=False)


def test_settings_match_for_the_same_model_loaded_twice(tmp_path):
    tiny_shapes_fcln().save_pretrained(tmp_path / "fcln")
    first, second = (FclnModel.from_pretrained(tmp_path / "fcln") for _ in range(2))
    settings = DenseCaptioner(FclnProposer(first), FclnCaptioner(first)).settings
    assert settings == DenseCaptioner(FclnProposer(second), FclnCaptioner(second)).settings
    assert json.loads(json.dumps(settings)) == settings  # compares equal to what a result file stores


def test_settings_name_the_dam_generation_and_sam_options(builtin):
    fcln = tiny_shapes_fcln()
    short = DamCaptioner(builtin, max_new_tokens=5, do_sample=False).settings
    assert short != DamCaptioner(builtin, max_new_tokens=12, do_sample=False).settings
    assert short["generate"] == {"do_sample": False, "max_new_tokens": 5}
    assert DamCaptioner(builtin, batch_size=1, max_new_tokens=5, do_sample=False).settings == short
    assert FclnProposer(fcln).settings != FclnProposer(tiny_shapes_fcln(seed=1)).settings
    pytest.importorskip("segment_anything")
    from dam.densecap import SamProposer
    from tests.test_sam import tiny_sam

    loose = SamProposer(tiny_sam(), points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0).settings
    assert loose != SamProposer(tiny_sam(), points_per_side=4, pred_iou_thresh=0.5, stability_score_thresh=0.0).settings
    assert loose != SamProposer(tiny_sam(seed=1), points_per_side=4, pred_iou_thresh=0.0,
                                stability_score_thresh=0.0).settings


def test_stored_regions_need_the_same_proposer_and_enough_regions(tmp_path):
    folder = _two_scenes(tmp_path / "photos")
    out = tmp_path / "out"
    dense = _fcln_dense(max_regions=2)
    run_folder(dense, folder, out, progress=False)
    image = InputImage(folder / "a.png", "a.png")
    proposer = dense.settings["proposer"]
    stored = json.loads((out / "a.png.json").read_text())["regions"]
    for wanted in (1, 2):
        regions = stored_regions(image, out, proposer, wanted)
        assert regions is not None and regions.boxes.tolist() == [r["box"] for r in stored]
    assert stored_regions(image, out, proposer, 3) is None  # the run kept 2: the third best is unknown
    other = DenseCaptioner(FclnProposer(tiny_shapes_fcln(seed=1)), dense.captioner).settings["proposer"]
    assert stored_regions(image, out, other, 1) is None


# ---- SAM masks of FCLN boxes ---------------------------------------------------------------


def test_sam_masks_of_fcln_boxes_are_stored_and_shown(builtin, tmp_path):
    pytest.importorskip("segment_anything")
    from dam.sam import SamPrompter
    from tests.test_sam import tiny_sam

    folder = tmp_path / "photos"
    folder.mkdir()
    image = scene(0, 0).image
    Image.fromarray(image).save(folder / "a.png")
    prompter = SamPrompter(tiny_sam())
    dense = DenseCaptioner(FclnProposer(tiny_shapes_fcln()), DamCaptioner(builtin, prompter, **GREEDY), max_regions=2)
    run_folder(dense, folder, tmp_path / "out", progress=False)
    result = json.loads((tmp_path / "out" / "a.png.json").read_text())
    assert result["mask_source"] == "sam" and len(result["regions"]) == 2
    boxes = np.array([region["box"] for region in result["regions"]])
    expected, _ = region_masks(image, Regions(boxes, np.ones(len(boxes))), prompter)
    for region, mask in zip(result["regions"], expected):
        np.testing.assert_array_equal(rle_to_mask(region["mask"]), mask)
        assert region["caption"] == builtin.describe(image, mask, **GREEDY)
    assert '"mask"' in (tmp_path / "out" / DATA_FILE).read_text()  # the viewer paints them


# ---- unreadable images ---------------------------------------------------------------------


def test_an_unreadable_image_is_skipped_counted_and_named(tmp_path, caplog):
    folder = _two_scenes(tmp_path / "photos")
    (folder / "broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="dam.densecap.runner"):
        stats = run_folder(_fcln_dense(), folder, tmp_path / "out", image_batch_size=2, progress=False)
    assert (stats.processed, stats.skipped, stats.failed) == (2, 0, 1)
    assert "1 unreadable" in stats.summary()
    assert any("broken.png" in record.getMessage() for record in caplog.records)
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.json")) == ["a.png.json", "b.png.json"]
    again = run_folder(_fcln_dense(), folder, tmp_path / "out", progress=False)
    assert (again.processed, again.skipped, again.failed) == (0, 2, 1)


def test_cli_finishes_the_folder_and_exits_1_on_an_unreadable_image(tmp_path, capsys):
    folder = _two_scenes(tmp_path / "photos")
    (folder / "broken.png").write_bytes(b"not a png")
    tiny_shapes_fcln().save_pretrained(tmp_path / "fcln")
    common = ["densecap", "--input", str(folder), "--output", str(tmp_path / "out"), "--fcln", str(tmp_path / "fcln"),
              "--captioner", "fcln", "--max-regions", "2", "--device", "cpu"]
    assert main(common) == 1
    assert "2 images captioned" in capsys.readouterr().out and (tmp_path / "out" / "sub" / "b.png.json").is_file()
    assert main([*common, "--query", "a red circle", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["failed"] == ["broken.png"]


# ---- option checks -------------------------------------------------------------------------


def test_cli_rejects_option_mistakes_before_loading_models(tmp_path, capsys, monkeypatch):
    def no_models(args):
        raise AssertionError("models loaded before the options were checked")

    monkeypatch.setattr("dam.densecap.cli.build_components", no_models)
    folder = _two_scenes(tmp_path / "photos")
    tiny_shapes_fcln().save_pretrained(tmp_path / "fcln")
    (tmp_path / "taken").write_text("a file")
    (tmp_path / "sam.pth").write_bytes(b"")
    base = ["densecap", "--input", str(folder), "--fcln", str(tmp_path / "fcln")]
    cases = [
        (["--output", str(tmp_path / "taken")], "is a file"),
        (["--output", str(tmp_path / "o"), "--top-k", "3"], "--top-k is for --query"),
        (["--output", str(tmp_path / "o"), "--query", " "], "--query is blank"),
        (["--output", str(tmp_path / "o"), "--captioner", "fcln", "--sam-checkpoint", str(tmp_path / "sam.pth")],
         "--sam-checkpoint is unused"),
    ]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        assert message in capsys.readouterr().err


# ---- progress ------------------------------------------------------------------------------


class _ZeroScorer:
    name = "zero"

    def score(self, images, regions, queries):
        return [np.zeros((len(r), len(queries)), dtype=np.float32) for r in regions]


def test_query_progress_bar_knows_its_total(monkeypatch):
    totals = []

    def recording_tqdm(*args, **kwargs):
        totals.append(kwargs.get("total"))
        return tqdm(*args, **kwargs)

    monkeypatch.setattr("dam.densecap.scoring.tqdm", recording_tqdm)
    pixels = np.zeros((8, 8, 3), np.uint8)
    proposer = FixedProposer({k: Regions(np.array([[0, 0, 4, 4]], float), np.ones(1)) for k in "abc"})
    items = [(key, pixels) for key in "abc"]
    score_queries(iter(items), ["q"], proposer, _ZeroScorer(), num_images=3, progress=False)
    score_queries(items, ["q"], proposer, _ZeroScorer(), progress=False)
    assert totals == [3, 3]


def test_search_reuses_nothing_from_a_run_of_another_proposer(tmp_path, caplog):
    folder = _two_scenes(tmp_path / "photos")
    out = tmp_path / "out"
    run_folder(_fcln_dense(seed=0), folder, out, progress=False)
    other = FclnProposer(tiny_shapes_fcln(seed=1))
    with caplog.at_level(logging.INFO, logger="dam.densecap.runner"):
        search_folder(["a red circle"], other, _ZeroScorer(), folder, out, max_regions=2, progress=False)
    assert not any("reused" in record.getMessage() for record in caplog.records)
