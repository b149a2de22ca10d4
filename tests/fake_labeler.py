"""A deterministic OpenAI-compatible VLM on loopback, for the stage-1 labeler tests.

``POST /v1/chat/completions`` answers from the request alone: the category named in the text
part (the first of ``categories`` that appears in it) and a hash of the image parts, so the
same region gets the same caption whatever the order, concurrency or retries
(``fake_caption`` computes it for the tests). ``GET /v1/models`` lists ``model``.

Failures are chosen per request, by category or by arrival order (the first N calls): HTTP 500
(``fail_*``), a hang past any client timeout (``hang_*``), a refusal (``refuse_*``), an empty
answer (``empty_*``), HTTP 400 (``reject_categories``). ``delay_s`` models a VLM's latency.
The server counts calls, per category too, keeps the request bodies and records the most
requests in flight at once.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REFUSAL = "I'm sorry, but I cannot determine what the highlighted region contains."
_COLORS = ("red", "green", "blue", "brown", "gray", "white", "black", "yellow")
_FINISHES = ("matte", "glossy", "rough", "smooth", "worn", "polished")


def fake_caption(category: str | None, image_urls: Iterable[str]) -> str:
    """The fake VLM's answer for a region: depends on its category and its images only."""
    digest = hashlib.sha256("\n".join(image_urls).encode()).digest()
    color, finish = _COLORS[digest[0] % len(_COLORS)], _FINISHES[digest[1] % len(_FINISHES)]
    return f"A {color} {category or 'thing'} with a {finish} surface and small marks near its edges (tag {digest.hex()[:8]})."


def request_parts(body: dict[str, Any]) -> tuple[str, list[str]]:
    """(text, image URLs) of the last user message of a chat-completions body."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content, []
    text = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
    urls = [part["image_url"]["url"] for part in content if part.get("type") == "image_url"]
    return text, urls


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # dozens of clients connect at once


class FakeLabelerServer:
    """A threaded fake VLM server on 127.0.0.1; use as a context manager (see the module docstring)."""

    def __init__(
        self,
        *,
        model: str = "fake-vlm",
        categories: Iterable[str] = (),
        delay_s: float = 0.0,
        hang_s: float = 30.0,
        fail_first: int = 0,
        fail_categories: Iterable[str] = (),
        hang_first: int = 0,
        hang_categories: Iterable[str] = (),
        refuse_first: int = 0,
        refuse_categories: Iterable[str] = (),
        empty_categories: Iterable[str] = (),
        reject_categories: Iterable[str] = (),
    ) -> None:
        self.model = model
        self.delay_s = delay_s
        self.hang_s = hang_s
        self.fail_first, self.hang_first, self.refuse_first = fail_first, hang_first, refuse_first
        self.fail_categories = set(fail_categories)
        self.hang_categories = set(hang_categories)
        self.refuse_categories = set(refuse_categories)
        self.empty_categories = set(empty_categories)
        self.reject_categories = set(reject_categories)
        named = [*categories, *self.fail_categories, *self.hang_categories, *self.refuse_categories,
                 *self.empty_categories, *self.reject_categories]
        # Longest first, so that "teddy bear" wins over "bear".
        self.categories = sorted(set(named), key=len, reverse=True)
        self.lock = threading.Lock()
        self.calls = 0
        self.calls_by_category: Counter[str | None] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def category_of(self, text: str) -> str | None:
        for name in self.categories:
            if re.search(rf"\b{re.escape(name)}\b", text):
                return name
        return None

    def _plan(self, n: int, category: str | None) -> str:
        if n < self.fail_first or category in self.fail_categories:
            return "500"
        if n < self.hang_first or category in self.hang_categories:
            return "hang"
        if category in self.reject_categories:
            return "400"
        if n < self.refuse_first or category in self.refuse_categories:
            return "refusal"
        if category in self.empty_categories:
            return "empty"
        return "ok"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as vLLM
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
                pass

            def setup(self) -> None:
                super().setup()
                with fake.lock:
                    fake._connections.add(self.connection)

            def finish(self) -> None:
                with fake.lock:
                    fake._connections.discard(self.connection)
                super().finish()

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on this request (its timeout)

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:  # noqa: N802 - stdlib naming
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                text, urls = request_parts(body)
                category = fake.category_of(text)
                with fake.lock:
                    n = fake.calls
                    fake.calls += 1
                    fake.calls_by_category[category] += 1
                    fake.bodies.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    self._answer(fake._plan(n, category), body, category, urls, n)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _answer(self, plan: str, body: dict[str, Any], category: str | None, urls: list[str], n: int) -> None:
                if plan == "500":
                    self._send(500, {"error": {"message": "injected failure", "type": "server_error"}})
                    return
                if plan == "400":
                    self._send(400, {"error": {"message": "image too large", "type": "invalid_request_error"}})
                    return
                if plan == "hang":
                    fake._stopping.wait(fake.hang_s)
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                content = {"refusal": REFUSAL, "empty": ""}.get(plan, fake_caption(category, urls))
                self._send(200, _completion(body.get("model", fake.model), content, n))

        return Handler

    def start(self) -> "FakeLabelerServer":
        # A short poll interval: shutdown() waits for the loop to notice (0.5 s by default).
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # release hanging handlers
        self._server.shutdown()
        self._server.server_close()
        # A stopped server also drops its keep-alive connections, as a crashed vLLM would.
        with self.lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the client

    def __enter__(self) -> "FakeLabelerServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _completion(model: str, content: str, n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }
