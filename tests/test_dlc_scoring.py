"""DLC-Bench region scores and totals on constructed cases, with a deterministic fake judge."""

import json

import pytest

from bench.dlc.scoring import main, score_dlc, score_region
from bench.dlc.protocol import recognition_question
from dam.errors import DamInputError

POS = {"question": "Color?", "choices": [["Red.", 1], ["Blue.", 0.5], ["Green.", -1]], "type": "positive"}
POS2 = {"question": "Handle?", "choices": [["Has a handle.", 1], ["No handle.", -1]], "type": "positive"}
NEG = {"question": "Text?", "choices": [["No text.", 1], ["Has text.", -1]], "type": "negative", "subtype": "x"}


class ScriptedJudge:
    """Answers by looking up the question line of the prompt in a table; counts requests."""

    def __init__(self, table):
        self.table = table
        self.requests = 0

    async def answer(self, prompt: str) -> str:
        self.requests += 1
        for key, value in self.table.items():
            if key in prompt:
                return value
        raise AssertionError(f"unexpected prompt {prompt!r}")


def test_region_score_plain():
    qs = [recognition_question("mug"), POS, POS2, NEG]
    entry = score_region("A red mug.", qs, ["Yes", "A", "b. no handle.", "Has text."])
    assert entry["recognition_result"] == "correct"
    assert entry["score_pos"] == pytest.approx((1 + -1) / 2)
    assert entry["score_neg"] == pytest.approx(-1)
    assert entry["score"] == pytest.approx((1 - 1 - 1) / 3)
    assert entry["neg_valid_num"] == 1
    assert len(entry["prompt"]) == 4 and entry["response"][0] == "Yes"
    assert entry["details_negatives"][0]["subtype"] == "x"


def test_recognition_no_clamps_scores_to_at_most_zero():
    qs = [recognition_question("mug"), POS, POS2, NEG]
    entry = score_region("A red mug.", qs, ["No", "Red.", "No handle.", "No text."])
    assert entry["recognition_result"] == "incorrect"
    assert [d["score"] for d in entry["details_positives"]] == [0, -1]
    assert entry["score_pos"] == pytest.approx(-0.5)
    assert entry["score_neg"] == pytest.approx(0)


def test_unparseable_answer_scores_zero_and_unanswered_recognition_does_not_clamp():
    qs = [recognition_question("mug"), POS]
    entry = score_region("A red mug.", qs, ["maybe", "purple"])
    assert entry["recognition_result"] is None
    assert entry["details_positives"][0]["score"] == 0
    assert entry["score_neg"] is None and entry["neg_valid_num"] == 0


def _data():
    qa = {"1": [POS, NEG], "2": [POS2]}
    names = {"1": "mug", "2": "cups"}
    preds = {"1": "A red mug.", "2": "Cups with handles.", "query": "describe"}
    return qa, names, preds


def test_totals_and_eval_json(tmp_path):
    qa, names, preds = _data()
    judge = ScriptedJudge({"object in the description is a mug": "Yes", "objects in the description are cups": "No",
                           "Color?": "Red.", "Text?": "B", "Handle?": "Has a handle."})
    out = tmp_path / "eval.json"
    result = score_dlc(preds, qa, names, judge, out, progress=False)
    # Region 1: pos 1, neg -1. Region 2: recognised wrongly, pos 1 clamped to 0, no negatives.
    assert result.pos == pytest.approx(0.5)
    assert result.neg == pytest.approx(-1)
    assert result.avg == pytest.approx(-0.25)
    assert result.summary() == "DLC-Bench: pos=0.500 neg=-1.000 avg=-0.250"
    data = json.loads(out.read_text())
    assert list(data) == ["1", "2", "avg_pos", "avg_neg"]
    assert data["avg_pos"] == pytest.approx(0.5) and data["avg_neg"] == pytest.approx(-1)
    assert set(data["1"]) == {
        "pred", "details_positives", "details_negatives", "details_recognition", "prompt", "response",
        "score", "score_pos", "score_neg", "neg_valid_num", "recognition_result",
    }
    assert judge.requests == 5

    # Rerun: every response comes from eval.json.
    again = ScriptedJudge({})
    result2 = score_dlc(preds, qa, names, again, out, progress=False)
    assert again.requests == 0 and result2.pos == result.pos and result2.neg == result.neg


def test_missing_prediction_is_an_error_unless_default(tmp_path):
    qa, names, preds = _data()
    del preds["2"]
    judge = ScriptedJudge({"": "Yes"})
    with pytest.raises(DamInputError, match="no prediction.*--default-prediction"):
        score_dlc(preds, qa, names, judge, None, progress=False)
    result = score_dlc(preds, qa, names, judge, None, default_prediction="Nothing.", progress=False)
    assert result.regions["2"]["pred"] == "Nothing."


def test_cli_needs_data_source(tmp_path, capsys):
    qa, names, preds = _data()
    (tmp_path / "p.json").write_text(json.dumps(preds))
    with pytest.raises(SystemExit) as exc:
        main(["--pred", str(tmp_path / "p.json"), "--base-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
              "--out", str(tmp_path / "e.json"), "--no-progress"])
    assert exc.value.code == 2
    assert "--data-root" in capsys.readouterr().err
