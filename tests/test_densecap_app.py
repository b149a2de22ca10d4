"""dam.densecap: folders of images -> JSON + drawn pictures + viewer, text queries, and the scorers.

Tiny random FCLN and SAM models propose regions; the built-in ShapesDLC DAM (and a tiny random
DAM for the scorer check) captions and scores them. The viewer is checked in headless Chromium
(skipped where no chromium binary is installed; Debian: apt-get install chromium).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dam import DescribeAnything
from dam.cli import main
from dam.densecap import (
    DamCaptioner,
    DamQueryScorer,
    DenseCaptioner,
    FclnCaptioner,
    FclnProposer,
    FclnQueryScorer,
    FixedProposer,
    Regions,
    SamProposer,
    box_to_mask,
    dam_query_logprobs,
    fcln_query_logprobs,
    find_images,
    run_folder,
    search_folder,
)
from dam.densecap.viewer import DATA_FILE, VIEWER_FILE
from dam.errors import DamInputError
from dam.fcln import FclnModel
from dam.fcln.vocabulary import END_ID, START_ID
from dam.masks import rle_to_mask
from dam.shapes import scene
from data_pipeline.shapes_layouts import write_shapes_visual_genome
from tests.factories import tiny_dam, tiny_shapes_fcln, tiny_tokenizer

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "chromium-headless-shell") if shutil.which(name)),
    None,
)
GREEDY = dict(max_new_tokens=12, do_sample=False)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def builtin() -> DescribeAnything:
    return DescribeAnything.from_pretrained()


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Five ShapesDLC scenes in VG layout, plus a copy in a subfolder, a hidden one and a non-image."""
    root = tmp_path_factory.mktemp("shapes_vg")
    write_shapes_visual_genome(root, 5, progress=False)
    images = root / "images"
    (images / "sub").mkdir()
    shutil.copy(images / "1.png", images / "sub" / "one.png")
    (images / ".cache").mkdir()
    shutil.copy(images / "2.png", images / ".cache" / "two.png")
    shutil.copy(images / "3.png", images / ".hidden.png")
    (images / "notes.txt").write_text("not an image")
    return root


# ---- folders -------------------------------------------------------------------------------


def test_find_images_recurses_and_skips_hidden_non_images_and_the_output(shapes, tmp_path):
    images = shapes / "images"
    names = [image.name for image in find_images(images, output=images / "results")]
    assert names == ["1.png", "2.png", "3.png", "4.png", "5.png", "sub/one.png"]
    (images / "results").mkdir()
    shutil.copy(images / "1.png", images / "results" / "1.png.drawn.png")
    try:
        assert [i.name for i in find_images(images, output=images / "results")] == names
    finally:
        shutil.rmtree(images / "results")
    assert [i.name for i in find_images(images / "4.png")] == ["4.png"]
    with pytest.raises(DamInputError, match="does not exist"):
        find_images(tmp_path / "missing")
    with pytest.raises(DamInputError, match="not an image file"):
        find_images(images / "notes.txt")


def test_folder_run_writes_results_and_resumes(shapes, tmp_path):
    fcln = tiny_shapes_fcln()
    dense = DenseCaptioner(FclnProposer(fcln), FclnCaptioner(fcln), max_regions=4)
    out = tmp_path / "out"
    stats = run_folder(dense, shapes / "images", out, image_batch_size=4, progress=False)
    assert (stats.processed, stats.skipped) == (6, 0) and stats.images_per_second > 0
    result = json.loads((out / "sub" / "one.png.json").read_text())
    assert (result["image"], result["width"], result["height"]) == ("sub/one.png", 512, 512)
    assert (result["proposer"], result["captioner"], result["mask_source"]) == ("fcln", "fcln", None)
    assert 1 <= len(result["regions"]) <= 4
    for region in result["regions"]:
        x0, y0, x1, y1 = region["box"]
        assert 0 <= x0 <= x1 <= 512 and 0 <= y0 <= y1 <= 512 and "mask" not in region
        assert isinstance(region["caption"], str) and 0 <= region["score"] <= 1
    # The same captions as FclnModel.detect gives for the image itself.
    detected = fcln.detect([np.array(Image.open(shapes / "images" / "1.png").convert("RGB"))], max_regions=4)[0]
    assert [r["caption"] for r in result["regions"]] == detected.captions
    np.testing.assert_allclose([r["box"] for r in result["regions"]], detected.boxes.numpy(), atol=0.01)
    drawn = Image.open(out / "sub" / "one.png.drawn.jpg")
    assert drawn.size == (512, 512)
    assert (out / VIEWER_FILE).is_file() and (out / DATA_FILE).is_file()
    assert not list(out.rglob("*.tmp"))

    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.json")}
    again = run_folder(dense, shapes / "images", out, progress=False)
    assert (again.processed, again.skipped) == (0, 6)
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*.json")} == stamps

    (out / "3.png.json").unlink()
    redo = run_folder(dense, shapes / "images", out, progress=False)
    assert (redo.processed, redo.skipped) == (1, 5)
    assert (out / "3.png.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json") if p.name != "3.png.json"} == {
        p: t for p, t in stamps.items() if p.name != "3.png.json"
    }

    other = DenseCaptioner(FclnProposer(fcln), FclnCaptioner(fcln), max_regions=2)
    with pytest.raises(DamInputError, match="other settings"):
        run_folder(other, shapes / "images", out, progress=False)
    assert run_folder(other, shapes / "images", out, overwrite=True, progress=False).processed == 6


def test_dam_captions_fcln_boxes_through_box_masks(builtin, shapes, tmp_path):
    fcln = tiny_shapes_fcln()
    dense = DenseCaptioner(FclnProposer(fcln), DamCaptioner(builtin, batch_size=8, **GREEDY), max_regions=3)
    image = scene(0, 0).image
    (result,) = dense([image])
    assert result.mask_source == "box" and len(result.captions) == len(result.boxes) == 3
    masks = [box_to_mask(box, 512, 512) for box in result.boxes]
    assert result.captions == builtin.describe_batch([(image, m) for m in masks], **GREEDY)


def test_box_to_mask_takes_the_pixels_whose_centres_the_box_holds():
    mask = box_to_mask([1.2, 0.0, 3.6, 2.5], 4, 5)
    expected = np.zeros((4, 5), bool)
    expected[0:2, 1:4] = True  # centres 1.5, 2.5, 3.5 in x; 0.5, 1.5 in y
    np.testing.assert_array_equal(mask, expected)
    assert box_to_mask([2.1, 2.1, 2.2, 2.2], 4, 5).sum() == 1  # thinner than a pixel: the pixel it sits on
    assert box_to_mask([-10, -10, 100, 100], 4, 5).all()


def test_sam_proposer_with_a_tiny_random_sam_end_to_end(builtin, tmp_path):
    pytest.importorskip("segment_anything")
    from tests.test_sam import tiny_sam

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(scene(0, 1).image[:200, :300]).save(folder / "a.png")
    proposer = SamProposer(tiny_sam(), points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    dense = DenseCaptioner(proposer, DamCaptioner(builtin, **GREEDY), max_regions=3)
    stats = run_folder(dense, folder, tmp_path / "out", progress=False)
    assert stats.processed == 1
    result = json.loads((tmp_path / "out" / "a.png.json").read_text())
    assert (result["proposer"], result["captioner"], result["mask_source"]) == ("sam", "dam", "proposer")
    assert 1 <= len(result["regions"]) <= 3
    for region in result["regions"]:
        mask = rle_to_mask(region["mask"])
        assert mask.shape == (200, 300) and mask.any()
        ys, xs = np.nonzero(mask)
        assert region["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert region["caption"] == builtin.describe(np.array(Image.open(folder / "a.png")), mask, **GREEDY)


# ---- command line --------------------------------------------------------------------------


def test_cli_folder_run_and_query(shapes, fcln_dir, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--input", str(shapes / "images"), "--output", str(out), "--fcln", str(fcln_dir),
              "--max-regions", "3", "--device", "cpu", "--max-new-tokens", "12"]
    assert main(["densecap", *common]) == 0
    printed = capsys.readouterr().out
    assert "6 images captioned" in printed and "images/s" in printed and "index.html" in printed
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.json")) == [
        "1.png.json", "2.png.json", "3.png.json", "4.png.json", "5.png.json", "sub/one.png.json"
    ]
    assert json.loads((out / "2.png.json").read_text())["mask_source"] == "box"
    assert main(["densecap", *common]) == 0
    assert "0 images captioned" in capsys.readouterr().out

    query = "a large yellow dotted square in the top left"
    assert main(["densecap", *common, "--query", query, "--top-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((out / "query_results.json").read_text())
    assert printed == stored and stored["scorer"] == "dam" and stored["num_images"] == 6
    hits = stored["queries"][0]["hits"]
    assert stored["queries"][0]["query"] == query and len(hits) == 2 and hits[0]["logprob"] >= hits[1]["logprob"]
    # The stored regions are the ones scored: every hit's box is one the folder run wrote.
    boxes = json.loads((out / f"{hits[0]['image']}.json").read_text())["regions"]
    assert hits[0]["box"] == boxes[hits[0]["region"]]["box"]
    assert main(["densecap", *common, "--query", query, "--top-k", "2"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(q, rank, image) for q, rank, _, image, _ in lines] == [(query, "1", hits[0]["image"]), (query, "2", hits[1]["image"])]


def test_cli_user_errors(shapes, fcln_dir, tmp_path, capsys):
    base = ["densecap", "--input", str(shapes / "images"), "--output", str(tmp_path / "o")]
    assert main(base) == 2
    assert "--fcln PATH" in capsys.readouterr().err
    assert main([*base, "--fcln", str(tmp_path / "nope")]) == 2
    assert "not an FCLN folder" in capsys.readouterr().err
    assert main([*base, "--proposer", "sam"]) == 2
    assert "--sam-checkpoint" in capsys.readouterr().err
    assert main(["densecap", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o"),
                 "--fcln", str(fcln_dir)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- open-world detection ------------------------------------------------------------------


def test_open_world_detection_finds_the_described_object(builtin, shapes, tmp_path):
    """Ground-truth boxes as proposals, the built-in DAM as scorer: the query's object is the top hit."""
    regions = {}
    descriptions = json.loads((shapes / "region_descriptions.json").read_text())
    for entry in descriptions:
        boxes = [[r["x"], r["y"], r["x"] + r["width"], r["y"] + r["height"]] for r in entry["regions"]]
        regions[f"{entry['id']}.png"] = Regions(np.array(boxes, float), np.ones(len(boxes)))
    regions["sub/one.png"] = regions["1.png"]
    target = descriptions[3]["regions"][2]  # "a medium purple dotted square in the top right"
    result = search_folder([target["phrase"]], FixedProposer(regions, "gt"), DamQueryScorer(builtin), shapes / "images",
                           tmp_path, top_k=3, progress=False)
    top = result["queries"][0]["hits"][0]
    assert top["image"] == "4.png" and top["region"] == 2
    assert top["box"] == [target["x"], target["y"], target["x"] + target["width"], target["y"] + target["height"]]


# ---- viewer --------------------------------------------------------------------------------


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_viewer_page_shows_the_selected_region_caption(shapes, tmp_path):
    fcln = tiny_shapes_fcln()
    out = tmp_path / "viewer"
    run_folder(DenseCaptioner(FclnProposer(fcln), FclnCaptioner(fcln), max_regions=3), shapes / "images", out,
               progress=False)
    second = json.loads((out / "2.png.json").read_text())["regions"][1]
    # A caption that could break out of the script element must stay text.
    data = (out / DATA_FILE).read_text()
    assert data.startswith("window.DENSECAP_RESULTS = ")
    url = (out / VIEWER_FILE).as_uri() + "?image=1&region=1"
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--virtual-time-budget=5000", "--window-size=1000,800"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
    assert 'data-state="ready"' in dom and 'data-picture="loaded"' in dom, dom[:500]
    assert 'data-image="1"' in dom and 'data-region="1"' in dom
    selected = dom.split('id="selected-caption"', 1)[1].split("</p>", 1)[0]
    assert f"2. {second['caption']}" in selected
    assert dom.count('class="box') == 3 and dom.count("box active") == 1
    assert "2.png" in dom.split('id="title"', 1)[1][:200]

    shot = tmp_path / "viewer.png"
    subprocess.run([*flags, f"--screenshot={shot}", url], capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (800, 1000) and pixels.std() > 20  # a rendered page, not a blank one


def test_viewer_keeps_captions_as_text(tmp_path):
    from dam.densecap import write_viewer

    page = write_viewer(tmp_path, [{"name": "a.png", "src": "a.png", "drawn": "a.png.drawn.jpg", "width": 4,
                                    "height": 4, "regions": [{"box": [0, 0, 2, 2], "score": 1.0,
                                                              "caption": "</script><b>x</b>"}]}])
    data = (tmp_path / DATA_FILE).read_text()
    assert "</script>" not in data and "<\\/script>" in data
    html = page.read_text()
    assert "http://" not in html and "https://" not in html  # no network resources
    assert ".textContent" in html and ".innerHTML" not in html


# ---- the scorers against step-by-step references -------------------------------------------


def fcln_reference(model: FclnModel, codes: torch.Tensor, query: str) -> float:
    """log P(query + <end> | code), one LSTM step and one log-softmax at a time."""
    lm = model.language_model
    _, state = lm.lstm(lm.encode_regions(codes[None])[:, None])
    token, total = START_ID, 0.0
    for target in model.vocabulary.encode(query) + [END_ID]:
        hidden, state = lm.lstm(lm.embedding(torch.tensor([[token]])), state)
        total += float(torch.log_softmax(lm.output(hidden[0, -1]), dim=-1)[target])
        token = target
    return total


@torch.no_grad()
@pytest.mark.parametrize("logit_budget", [None, 100])  # 100: logits converted a few rows at a time
def test_fcln_scorer_equals_a_step_by_step_reference(logit_budget, monkeypatch):
    if logit_budget is not None:
        monkeypatch.setattr("dam.densecap.scoring.LOGIT_BUDGET", logit_budget)
    model = tiny_shapes_fcln(seed=2, lstm_layers=2)
    codes = torch.randn(5, model.config.recognition_hidden_size)
    queries = ["a red circle", "square", "a small blue dotted triangle in the bottom right", "zebra red", ""]
    expected = torch.tensor([[fcln_reference(model, code, q) for q in queries] for code in codes])
    for pair_batch_size in (1, 3, 4096):  # region and query blocks that split unevenly
        got = fcln_query_logprobs(model.language_model, model.vocabulary, codes, queries, pair_batch_size)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def dam_reference(describer: DescribeAnything, image: np.ndarray, mask: np.ndarray, query: str) -> float:
    """log P(answer tokens | region), the whole sequence without a cache, one log-softmax per token."""
    encoded = describer.processor.encode(None, 1, query)
    batch = describer.processor([[(image, mask)]], [None])
    embeds = describer.model.embed_inputs(torch.tensor([encoded.input_ids]), batch["pixel_values"],
                                          batch["crop_is_full_image"])
    logits = describer.model.language_model(inputs_embeds=embeds).logits[0]
    total = 0.0
    for position, label in enumerate(encoded.labels):
        if label != -100:
            total += float(torch.log_softmax(logits[position - 1].float(), dim=-1)[label])
    return total


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_dam_scorer_equals_a_step_by_step_reference(template, builtin, monkeypatch):
    # chat: a tiny random DAM whose template closes the answer with </s>; plain: the built-in
    # model, whose answers end with the EOS the processor appends.
    describer = DescribeAnything(tiny_dam(seed=1), tiny_tokenizer()) if template == "chat" else builtin
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    masks = [box_to_mask(box, 40, 56) for box in ([2, 3, 20, 30], [30, 0, 56, 12], [10, 10, 12, 12])]
    queries = ["a red circle", "the small green square on the left of the table", "dog"]
    expected = torch.tensor([[dam_reference(describer, image, m, q) for q in queries] for m in masks])
    answers = [describer.processor.encode(None, 1, q).labels for q in queries]
    assert len({sum(label != -100 for label in labels) for labels in answers}) == 3  # padding is exercised
    assert all(labels[-1] == describer.tokenizer.eos_token_id for labels in answers)  # the end token is scored
    for region_batch_size, pair_batch_size in ((1, 1), (2, 3), (8, 64)):
        if pair_batch_size == 3:  # also convert the logits to float32 a few rows at a time
            monkeypatch.setattr("dam.densecap.scoring.LOGIT_BUDGET", 200)
        got = dam_query_logprobs(describer, [(image, m) for m in masks], queries,
                                 region_batch_size=region_batch_size, pair_batch_size=pair_batch_size)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_scorers_split_scores_per_image(builtin):
    first, second = scene(0, 0), scene(0, 1)
    regions = [Regions(np.array([o.box for o in s.objects], float), np.ones(len(s.objects))) for s in (first, second)]
    queries = [first.objects[0].caption, second.objects[1].caption]
    scores = DamQueryScorer(builtin).score([first.image, second.image], regions, queries)
    assert [s.shape for s in scores] == [(len(first.objects), 2), (len(second.objects), 2)]
    assert scores[0][:, 0].argmax() == 0 and scores[1][:, 1].argmax() == 1
    fcln = tiny_shapes_fcln()
    fcln_scores = FclnQueryScorer(fcln).score([first.image, second.image], regions, queries)
    assert [s.shape for s in fcln_scores] == [s.shape for s in scores]
    assert all(np.isfinite(s).all() and (s < 0).all() for s in fcln_scores)
