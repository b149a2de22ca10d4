"""DLC-Bench against a fake OpenAI-compatible judge on loopback: concurrency, resume, retries,
rejected requests and an unreachable judge."""

import json
import socket
import time

import pytest

from bench.dlc.fake_judge import FakeJudgeServer
from bench.dlc.judge import OpenAIJudge
from bench.dlc.scoring import main, score_dlc
from dam.errors import DamInputError


def _dataset(n: int = 12):
    qa, names, preds = {}, {}, {}
    for i in range(n):
        a = str(1000 + i)
        qa[a] = [
            {"question": f"Q{i} color?", "choices": [["Red.", 1], ["Blue.", 0], ["Green.", -1]], "type": "positive"},
            {"question": f"Q{i} size?", "choices": [["Small.", 1], ["Large.", -1]], "type": "positive"},
            {"question": f"Q{i} text?", "choices": [["No text.", 1], ["Text.", -1]], "type": "negative"},
        ]
        names[a] = "mug" if i % 2 else "cups"
        preds[a] = f"Caption {i}: a mug."
    return qa, names, preds


def _write(tmp_path, n=12):
    qa, names, preds = _dataset(n)
    for name, obj in (("qa.json", qa), ("class_names.json", names), ("preds.json", preds)):
        (tmp_path / name).write_text(json.dumps(obj))
    return tmp_path


def _cli(tmp_path, url, out, *extra):
    return main(["--pred", str(tmp_path / "preds.json"), "--data-root", str(tmp_path), "--base-url", url,
                 "--judge-model", "fake", "--out", str(out), "--no-progress", "--retry-backoff", "0.01", *extra])


def test_concurrency_resume_and_request_params(tmp_path, capsys):
    _write(tmp_path)
    out = tmp_path / "eval.json"
    with FakeJudgeServer(delay_s=0.02) as server:
        assert _cli(tmp_path, server.base_url, out, "--concurrency", "8") == 0
        first = capsys.readouterr().out.strip().splitlines()[-1]
        assert first.startswith("DLC-Bench: pos=")
        assert server.requests == 12 * 4
        assert server.max_in_flight > 1
        assert server.max_in_flight <= 8
        body = server.bodies[0]
        assert body["temperature"] == 0 and body["max_tokens"] == 300 and body["top_p"] == 1
        assert body["frequency_penalty"] == 0 and body["presence_penalty"] == 0
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"

        # Resume: same command, zero new requests, same result line.
        assert _cli(tmp_path, server.base_url, out, "--concurrency", "8") == 0
        assert server.requests == 12 * 4
        assert capsys.readouterr().out.strip().splitlines()[-1] == first


def test_resume_only_asks_for_unfinished_regions(tmp_path):
    qa, names, preds = _dataset(6)
    out = tmp_path / "eval.json"
    with FakeJudgeServer() as server:
        judge = OpenAIJudge(server.base_url, "fake", concurrency=4)
        full = score_dlc(preds, qa, names, judge, out, progress=False)
        data = json.loads(out.read_text())
        del data["1003"], data["avg_pos"], data["avg_neg"]  # as if interrupted
        out.write_text(json.dumps(data))
        before = server.requests
        judge = OpenAIJudge(server.base_url, "fake", concurrency=4)
        resumed = score_dlc(preds, qa, names, judge, out, progress=False)
        assert server.requests - before == 4
        assert (resumed.pos, resumed.neg) == (full.pos, full.neg)


def test_retries_on_500_give_identical_scores(tmp_path):
    qa, names, preds = _dataset(10)
    with FakeJudgeServer() as clean:
        ref = score_dlc(preds, qa, names, OpenAIJudge(clean.base_url, "fake", concurrency=8), None, progress=False)
    with FakeJudgeServer(fail_share=0.3) as flaky:
        judge = OpenAIJudge(flaky.base_url, "fake", concurrency=8, backoff_s=0.005, max_attempts=10)
        got = score_dlc(preds, qa, names, judge, None, progress=False)
        assert flaky.failures > 0
    assert (got.pos, got.neg) == (ref.pos, ref.neg)
    assert {a: r["response"] for a, r in got.regions.items()} == {a: r["response"] for a, r in ref.regions.items()}


def test_persistent_500_is_a_clear_error():
    qa, names, preds = _dataset(1)
    with FakeJudgeServer(fail_share=1.0) as server:
        judge = OpenAIJudge(server.base_url, "fake", concurrency=2, backoff_s=0.001, max_attempts=3)
        with pytest.raises(DamInputError, match=r"kept failing \(HTTP 500\)"):
            score_dlc(preds, qa, names, judge, None, progress=False)


def test_other_4xx_is_not_retried(tmp_path):
    qa, names, preds = _dataset(1)
    with FakeJudgeServer() as server:
        bad_url = server.base_url.replace("/v1", "/wrong")
        judge = OpenAIJudge(bad_url, "fake", concurrency=1, backoff_s=0.001)
        with pytest.raises(DamInputError, match="rejected the request with HTTP 404"):
            score_dlc(preds, qa, names, judge, None, progress=False)
        # Retrying would send at least max_attempts (6) requests for the first question; each of
        # the region's 4 questions may be asked at most once before the error stops the run.
        assert server.requests <= 4


def test_unreachable_judge_fails_fast_naming_the_url(tmp_path, capsys):
    _write(tmp_path, 2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block exits: nothing listens there
    url = f"http://127.0.0.1:{port}/v1"
    start = time.monotonic()
    with pytest.raises(SystemExit) as exc:
        _cli(tmp_path, url, tmp_path / "eval.json", "--max-attempts", "3")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert url in err and "unreachable" in err
    assert time.monotonic() - start < 5
