"""DLC-Bench against a fake OpenAI-compatible judge on loopback: concurrency, resume, retries,
rejected requests, an unreachable judge, and the HTTP/1.1 client against other server styles."""

import asyncio
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


# ---- the HTTP/1.1 client against servers that answer in other ways ------------------------

def _reply(body: dict, *, chunked=False, close=False, keep_alive_then_close=False) -> bytes:
    data = json.dumps(body).encode()
    if chunked:
        half = len(data) // 2
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (data[:half], data[half:]))
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-Trailer: 1\r\n\r\n"
    if close:
        return b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + data
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data


async def _serve_raw(mode: str, seen: list):
    async def handle(reader, writer):
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next(l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")))
                body = json.loads(await reader.readexactly(length))
                if mode == "stale" and answered:
                    break  # a kept-alive connection the server drops as the next request arrives
                answered += 1
                seen.append((head.split(b"\r\n")[0].decode(), body))
                if mode == "silent":
                    await asyncio.sleep(10)
                content = {"choices": [{"message": {"role": "assistant", "content": f"B. {mode}"}}]}
                writer.write(_reply(content, chunked=mode == "chunked", close=mode == "close"))
                await writer.drain()
                if mode == "close":
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test's event loop is ending
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/"


@pytest.mark.parametrize("mode", ["chunked", "close", "stale"])
def test_client_reads_chunked_and_closing_servers_and_survives_stale_connections(mode):
    async def run():
        seen = []
        server, url = await _serve_raw(mode, seen)
        # max_attempts=1: a dropped keep-alive connection must be replaced, not count as a failure.
        judge = OpenAIJudge(url, "m", concurrency=1, max_attempts=1, api_key="k")
        try:
            answers = []
            for prompt in ("first", "second", "third"):
                answers.append(await judge.answer(prompt))
        finally:
            await judge.aclose()
            server.close()
        return answers, seen

    answers, seen = asyncio.run(run())
    assert answers == [f"B. {mode}"] * 3
    assert [line for line, _ in seen] == ["POST /v1/chat/completions HTTP/1.1"] * 3
    assert [body["messages"][0]["content"] for _, body in seen] == ["first", "second", "third"]
    assert seen[0][1]["model"] == "m" and seen[0][1]["max_tokens"] == 300


def test_timeout_is_retried_then_reported():
    async def run():
        server, url = await _serve_raw("silent", [])
        judge = OpenAIJudge(url, "m", max_attempts=2, backoff_s=0.01, timeout_s=0.2)
        try:
            await judge.answer("hi")
        finally:
            await judge.aclose()
            server.close()

    start = time.monotonic()
    with pytest.raises(DamInputError, match=r"unreachable after 2 attempts \(no answer within 0.2 s"):
        asyncio.run(run())
    assert time.monotonic() - start < 3


def test_bad_base_url_and_missing_judge_model_are_clear_errors(tmp_path, capsys):
    with pytest.raises(DamInputError, match="must start with http"):
        OpenAIJudge("localhost:8000/v1", "m")
    _write(tmp_path, 1)
    with pytest.raises(SystemExit):
        main(["--pred", str(tmp_path / "preds.json"), "--data-root", str(tmp_path), "--base-url",
              "http://127.0.0.1:9/v1", "--out", str(tmp_path / "e.json"), "--no-progress"])
    assert "--judge-model" in capsys.readouterr().err


def test_fake_judge_process_serves_and_counts():
    from bench.dlc.fake_judge import FakeJudgeProcess

    qa, names, preds = _dataset(3)
    with FakeJudgeServer() as local:
        ref = score_dlc(preds, qa, names, OpenAIJudge(local.base_url, "fake"), None, progress=False)
    with FakeJudgeProcess(delay_s=0.01) as server:
        got = score_dlc(preds, qa, names, OpenAIJudge(server.base_url, "fake", concurrency=4), None, progress=False)
        stats = server.stats()
    assert stats["requests"] == 3 * 4 and 1 < stats["max_in_flight"] <= 4
    assert {a: r["response"] for a, r in got.regions.items()} == {a: r["response"] for a, r in ref.regions.items()}


def test_speed_dlc_runs_and_scores_agree(capsys):
    from bench.speed_dlc import main as speed_main

    assert speed_main(["--regions", "3", "--questions", "2", "--delay-ms", "1", "--concurrency", "4"]) == 0
    out = capsys.readouterr().out
    assert "scores identical: True" in out and "speed-up:" in out
