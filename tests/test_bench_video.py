"""Video benchmarks: VideoRefer-Bench-D against a loopback judge (concurrency, resume, retries,
robust score parsing) and HC-STVG captions through the caption metrics."""

import hashlib
import json
import re
import shutil

import pytest

import bench.dlc.fake_judge as fake_judge
from bench.cli import main as bench_main
from bench.dlc.fake_judge import FakeJudgeServer
from bench.dlc.judge import OpenAIJudge
from bench.video_bench import (
    DIMENSIONS,
    build_judge_prompt,
    hcstvg_references,
    parse_dimension_scores,
    score_videorefer_d,
    video_key,
    videorefer_references,
)
from dam.errors import DamInputError


@pytest.mark.parametrize(
    "response, expected",
    [
        ("SC: 4\nAD: 3\nTD: 2\nHD: 5", (4, 3, 2, 5)),
        ("**Subject Correspondence**: 4/5\n**Appearance Description**: 3/5\n**Temporal Description**: 2/5\n"
         "**Hallucination Detection**: 1/5", (4, 3, 2, 1)),
        ('{"SC": 1, "AD": 2, "TD": 3, "HD": 4}', (1, 2, 3, 4)),
        ("1. Subject Correspondence (SC): 5\n2. Appearance Description (AD): 4", (5, 4, None, None)),
        ("| SC | 4 |\n| AD | 3 |\n| TD | 3 |\n| HD | 2 |", (4, 3, 3, 2)),
        ("The subject matches. SC: 2 ... on reflection, final scores: SC: 4 AD: 1 TD: 0 HD: 3", (4, 1, 0, 3)),
        ("Scores: 4, 3, 2, 1", (4, 3, 2, 1)),  # no names: four numbers in order
        ("SC: 7\nAD: 3\nTD: -\nHD: 4.5", (None, 3, None, 4.5)),  # out of range / absent -> missing
        ("I cannot tell.", (None, None, None, None)),
        ("an ad appears; sc 3", (None, None, None, None)),  # lower-case words are no labels
        ("", (None, None, None, None)),
        (None, (None, None, None, None)),
    ],
)
def test_parse_dimension_scores(response, expected):
    assert parse_dimension_scores(response) == dict(zip(DIMENSIONS, expected))


def test_prompt_carries_the_published_answer_layout():
    prompt = build_judge_prompt(" a man walks left ", "A man in red walks to the left.")
    assert "##Correct answer: A man in red walks to the left.\n##Predicted answer: a man walks left\n" in prompt
    for name in ("Subject Correspondence (SC)", "Appearance Description (AD)", "Temporal Description (TD)",
                 "Hallucination Detection (HD)"):  # fmt: skip
        assert name in prompt
    assert prompt.endswith("SC: <score>\nAD: <score>\nTD: <score>\nHD: <score>")


def _scores_for(prompt):
    digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    return [(digest >> (4 * i)) % 6 for i in range(4)]


def fake_dimension_answer(prompt: str) -> str:
    """A deterministic judge: scores from a hash of the prompt, in one of three answer styles."""
    sc, ad, td, hd = _scores_for(prompt)
    style = int(hashlib.md5(prompt.encode()).hexdigest(), 16) % 3
    if style == 0:
        return f"SC: {sc}\nAD: {ad}\nTD: {td}\nHD: {hd}"
    if style == 1:
        return json.dumps({"SC": sc, "AD": ad, "TD": td, "HD": hd})
    return (f"Subject Correspondence: {sc}/5. Appearance Description: {ad}/5. "
            f"Temporal Description: {td}/5. Hallucination Detection: {hd}/5.")  # fmt: skip


@pytest.fixture
def dimension_judge(monkeypatch):
    # The loopback server of the DLC tests, answering with four dimension scores instead.
    monkeypatch.setattr(fake_judge, "fake_answer", fake_dimension_answer)
    return FakeJudgeServer


def _data(n=10):
    anno = [{"id": i, "video": f"v{i}.mp4", "caption": f"A person in a {['red', 'blue'][i % 2]} coat walks, item {i}."}
            for i in range(n)]  # fmt: skip
    preds = {str(i): f"Someone in a coat walking (item {i})." for i in range(n)}
    return anno, preds


def _expected_averages(anno, preds):
    rows = [_scores_for(build_judge_prompt(preds[str(r["id"])], r["caption"])) for r in anno]
    return {d: sum(row[k] for row in rows) / len(rows) for k, d in enumerate(DIMENSIONS)}


def _cli(tmp_path, url, *extra):
    return bench_main(["video", "videorefer-d", "--pred", str(tmp_path / "preds.json"), "--anno",
                       str(tmp_path / "anno.json"), "--base-url", url, "--judge-model", "fake", "--out",
                       str(tmp_path / "eval.json"), "--no-progress", "--retry-backoff", "0.01", *extra])  # fmt: skip


def test_videorefer_d_concurrent_scores_and_resume(tmp_path, dimension_judge, capsys):
    anno, preds = _data()
    (tmp_path / "anno.json").write_text(json.dumps(anno))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    expected = _expected_averages(anno, preds)
    with dimension_judge(delay_s=0.02) as server:
        assert _cli(tmp_path, server.base_url, "--concurrency", "4") == 0
        first = capsys.readouterr().out.strip().splitlines()[-1]
        assert server.requests == len(anno)
        assert 1 < server.max_in_flight <= 4
        eval_json = json.loads((tmp_path / "eval.json").read_text())
        assert eval_json["averages"] == pytest.approx(expected)
        assert eval_json["avg"] == pytest.approx(sum(expected.values()) / 4)
        item = eval_json["0"]
        assert item["reference"] == anno[0]["caption"] and item["pred"] == preds["0"]
        assert item["scores"] == dict(zip(DIMENSIONS, map(float, _scores_for(item["prompt"]))))
        want = " ".join(f"{d}={v:.3f}" for d, v in expected.items())
        assert first == f"VideoRefer-Bench-D: {want} avg={sum(expected.values()) / 4:.3f}"

        # Rerun: every stored response is reused, no request is sent, same line.
        assert _cli(tmp_path, server.base_url) == 0
        assert server.requests == len(anno)
        assert capsys.readouterr().out.strip().splitlines()[-1] == first

        # A changed prediction is judged again; the others are not.
        preds["3"] = "A different description."
        (tmp_path / "preds.json").write_text(json.dumps(preds))
        assert _cli(tmp_path, server.base_url) == 0
        assert server.requests == len(anno) + 1


def test_videorefer_d_retries_give_the_same_scores(dimension_judge):
    anno, preds = _data(8)
    refs = videorefer_references(anno, "anno.json")
    with dimension_judge() as clean:
        good = score_videorefer_d(preds, refs, OpenAIJudge(clean.base_url, "fake"), progress=False)
    with dimension_judge(fail_share=0.3) as flaky:
        again = score_videorefer_d(preds, refs, OpenAIJudge(flaky.base_url, "fake", backoff_s=0.01), progress=False)
        assert flaky.failures > 0
    assert again.averages == good.averages == pytest.approx(_expected_averages(anno, preds))


def test_videorefer_d_input_errors(tmp_path, capsys):
    anno, preds = _data(3)
    del preds["2"]
    (tmp_path / "anno.json").write_text(json.dumps(anno))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    assert _cli(tmp_path, "http://127.0.0.1:9/v1") == 2
    assert "1 of 3 VideoRefer-Bench-D items have no prediction (e.g. id '2')" in capsys.readouterr().err
    assert videorefer_references({"a": "ref a", "b": {"caption": "ref b"}}, "x") == {"a": "ref a", "b": "ref b"}
    assert videorefer_references([{"caption": "first"}, {"caption": "second"}], "x") == {"0": "first", "1": "second"}
    with pytest.raises(DamInputError, match="has no \"caption\" string"):
        videorefer_references([{"video": "a.mp4"}], "anno.json")
    with pytest.raises(DamInputError, match="repeat id '1'"):
        videorefer_references([{"id": 1, "caption": "a"}, {"id": 1, "caption": "b"}], "anno.json")


def test_hcstvg_reference_formats():
    assert video_key("abc.mp4") == "abc" and video_key("abc") == "abc" and video_key(7) == "7"
    anno = {"v1.mp4": {"img_num": 300, "English": "The man in black turns around."}, "v2.mp4": {"caption": "A woman sits."}}
    assert hcstvg_references(anno, "a") == {"v1": ["The man in black turns around."], "v2": ["A woman sits."]}
    assert hcstvg_references([{"vid": "v3", "sentence": "x"}], "a") == {"v3": ["x"]}
    with pytest.raises(DamInputError, match="no reference sentence"):
        hcstvg_references({"v1.mp4": {"img_num": 3}}, "a")
    with pytest.raises(DamInputError, match="has no video id"):
        hcstvg_references([{"English": "x"}], "a")


@pytest.mark.skipif(shutil.which("java") is None, reason="java is not installed")
def test_hcstvg_cli_scores_captions(tmp_path, capsys):
    anno = {
        "v1.mp4": {"English": "The man in the black coat turns around and walks to the door."},
        "v2.mp4": {"English": "The woman in the white dress sits down on the chair."},
    }
    preds = {"v1": "The man in the black coat turns around and walks to the door.", "v2.mp4": "A woman stands up."}
    (tmp_path / "anno.json").write_text(json.dumps(anno))
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    out = tmp_path / "result.json"
    argv = ["video", "hcstvg", "--pred", str(tmp_path / "preds.json"), "--anno", str(tmp_path / "anno.json"),
            "--out", str(out)]  # fmt: skip
    assert bench_main(argv) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("HC-STVG Caption metrics (x100): BLEU-1=")
    assert re.search(r"SPICE: unavailable \(pass --spice-jars", last)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "hc-stvg" and result["num_items"] == 2
    assert result["items"]["v1"]["scores"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert 0 < result["METEOR"] < 1 and result["items"]["v2"]["scores"]["BLEU-4"] < 0.01
