"""A deterministic OpenAI-compatible judge on loopback, for tests and the speed benchmark.

`POST /v1/chat/completions` answers from the prompt alone (same prompt, same answer), so
scores do not depend on request order, concurrency or retries. It can wait per request (to
model a real judge's latency), fail a fixed share of requests with HTTP 500 by a counter, and
it records how many requests were in flight at once (`GET /v1/stats` reports the counters).

`FakeJudgeServer` serves from threads of the calling process (tests read its counters
directly); `FakeJudgeProcess` runs the same server in a child process, so that timing a client
does not also time the server's Python work under the client's GIL (the speed benchmark uses
it). Standalone, as a judge to point `dam-bench dlc-score` at:

    python bench/dlc/fake_judge.py --port 8000 --delay-ms 20
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_CHOICE_LINE = re.compile(r"^([A-Z])\. (.*)$")


class _Server(ThreadingHTTPServer):
    # The default listen backlog (5) refuses connections when dozens of clients connect at once.
    request_queue_size = 256


def fake_answer(prompt: str) -> str:
    """The fake judge's answer: a choice picked by a hash of the prompt, in one of several styles
    (so the parser's main rules are exercised end to end)."""
    choices = [m.groups() for line in prompt.splitlines() if (m := _CHOICE_LINE.match(line))]
    if not choices:
        return "I cannot tell."
    digest = int(hashlib.sha256(prompt.encode()).hexdigest(), 16)
    letter, text = choices[digest % len(choices)]
    style = (digest // len(choices)) % 3
    return [f"{letter}. {text}", text, letter][style]


class FakeJudgeServer:
    """A threaded HTTP judge on 127.0.0.1; use as a context manager.

    Args:
        delay_s: seconds each successful request waits before answering.
        fail_share: share of requests (by arrival counter, so deterministic) answered with 500.
    """

    def __init__(self, delay_s: float = 0.0, fail_share: float = 0.0, port: int = 0) -> None:
        self.delay_s = delay_s
        self.fail_share = fail_share
        self.lock = threading.Lock()
        self.requests = 0
        self.failures = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self.keep_bodies = True
        self._server = _Server(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def _should_fail(self, n: int) -> bool:
        # Fail requests whose counter falls in the first `fail_share` of each block of 10.
        return (n % 10) < round(self.fail_share * 10)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real server does
            # Headers and body go out in separate writes; without TCP_NODELAY, Nagle plus delayed
            # ACKs add ~40 ms to every keep-alive request.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass  # keep test output quiet

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (cancelled); nothing to answer
            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                if self.path.rstrip("/") != "/v1/stats":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                self._send(200, judge.stats())

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with judge.lock:
                    n = judge.requests
                    judge.requests += 1
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                    if judge.keep_bodies:
                        judge.bodies.append(body)
                try:
                    if self.path.rstrip("/") != "/v1/chat/completions":
                        self._send(404, {"error": {"message": f"no route {self.path}"}})
                        return
                    if judge._should_fail(n):
                        with judge.lock:
                            judge.failures += 1
                        self._send(500, {"error": {"message": "injected failure", "type": "server_error"}})
                        return
                    if judge.delay_s:
                        time.sleep(judge.delay_s)
                    prompt = body["messages"][-1]["content"]
                    self._send(200, _completion(body.get("model", "fake"), fake_answer(prompt), n))
                finally:
                    with judge.lock:
                        judge.in_flight -= 1

        return Handler

    def stats(self) -> dict[str, int]:
        """The counters: requests received, failures injected, most requests in flight at once."""
        with self.lock:
            return {"requests": self.requests, "failures": self.failures, "max_in_flight": self.max_in_flight}

    def start(self) -> "FakeJudgeServer":
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "FakeJudgeServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class FakeJudgeProcess:
    """The fake judge served by a child Python process (this file run as a script, which
    imports only the standard library, so it starts in a fraction of a second); use as a
    context manager. Same arguments as `FakeJudgeServer`; `stats()` fetches its counters.
    """

    def __init__(self, delay_s: float = 0.0, fail_share: float = 0.0, port: int = 0) -> None:
        self.delay_s = delay_s
        self.fail_share = fail_share
        self.port = port
        self._proc: subprocess.Popen[str] | None = None
        self._port: int | None = None

    @property
    def base_url(self) -> str:
        if self._port is None:
            raise RuntimeError("the fake judge process is not running; use it as a context manager")
        return f"http://127.0.0.1:{self._port}/v1"

    def start(self) -> "FakeJudgeProcess":
        # -I: isolated mode, so the script's folder (bench/dlc) does not shadow stdlib modules.
        cmd = [sys.executable, "-I", str(Path(__file__).resolve()), "--port", str(self.port),
               "--delay-ms", repr(self.delay_s * 1000), "--fail-share", repr(self.fail_share), "--exit-on-stdin-eof"]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().strip()  # "" if the child died before listening
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"the fake judge process did not start (first line {line!r})")
        self._port = int(line.split()[1])
        return self

    def stats(self) -> dict[str, int]:
        # No proxies: the judge is on loopback whatever http_proxy says.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"{self.base_url}/stats", timeout=10) as response:
            return json.loads(response.read())

    @property
    def requests(self) -> int:
        return self.stats()["requests"]

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()  # the child exits when its stdin closes
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None
        self._port = None

    def __enter__(self) -> "FakeJudgeProcess":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _completion(model: str, content: str, n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def main(argv: list[str] | None = None) -> int:
    """Serve the fake judge until Ctrl-C (or, with --exit-on-stdin-eof, until stdin closes);
    prints "port N" once listening."""
    p = argparse.ArgumentParser(description="A deterministic OpenAI-compatible fake judge on 127.0.0.1.")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free port)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="wait per successful request")
    p.add_argument("--fail-share", type=float, default=0.0, help="share of requests answered with HTTP 500")
    p.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (a parent's pipe)")
    args = p.parse_args(argv)
    server = FakeJudgeServer(delay_s=args.delay_ms / 1000, fail_share=args.fail_share, port=args.port)
    server.keep_bodies = False  # a long-running judge must not grow without bound
    with server:
        sys.stdout.write(f"port {server._server.server_address[1]}\n")
        sys.stdout.flush()
        try:
            if args.exit_on_stdin_eof:
                sys.stdin.read()
            else:
                threading.Event().wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
