"""Judge clients: something that answers one protocol prompt with text.

`OpenAIJudge` talks to any OpenAI-compatible chat-completions endpoint (vLLM, the OpenAI API)
with many requests in flight, which is what makes scoring fast: the reference script waits for
each answer before sending the next question. It posts the chat-completions JSON itself over a
small pool of keep-alive HTTP/1.1 connections on asyncio streams (`_ConnectionPool`), not
through the openai SDK or httpx: their per-request CPU cost (about 3 ms with the SDK, about
1 ms with a bare httpx client, against about 0.2 ms here) is what bounds throughput at 32
requests in flight on a small machine, not the judge (see BENCHMARKS.md). Transient failures
(429, 5xx, timeouts, dropped connections) are retried with exponential backoff; a request the
server rejects for good (other 4xx) or a judge that stays unreachable raises `DamInputError`
naming the URL. Connections go straight to the judge (http or https); proxy variables are not
used.

`bench.dlc.local_judge.TransformersJudge` runs the judge in-process with transformers instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import ssl
import time
from functools import lru_cache
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

from dam.errors import DamInputError

from bench.dlc.protocol import chat_request

logger = logging.getLogger(__name__)


@runtime_checkable
class Judge(Protocol):
    """Answers one DLC-Bench prompt (the full user message) with the judge's raw text."""

    async def answer(self, prompt: str) -> str: ...


def read_api_key(path: str | Path | None) -> str:
    """The API key from `path` (first line), or the OPENAI_API_KEY variable, or a placeholder.

    vLLM accepts any key unless started with --api-key, so a placeholder is a fine default.
    """
    import os

    if path is not None:
        try:
            key = Path(path).read_text().strip().splitlines()
        except OSError as exc:
            raise DamInputError(f"cannot read the judge API key file {path!s}: {exc}") from exc
        if not key or not key[0].strip():
            raise DamInputError(f"the judge API key file {path!s} is empty; put the key on its first line")
        return key[0].strip()
    return os.environ.get("OPENAI_API_KEY", "EMPTY")


@lru_cache(maxsize=1)
def add_client_options(parser: argparse.ArgumentParser, concurrency_help: str) -> None:
    """The `OpenAIJudge` client options of a benchmark's command line (read by `OpenAIJudge.from_args`)."""
    parser.add_argument("--concurrency", type=int, default=32, help=concurrency_help)
    parser.add_argument("--api-key-file", help="file whose first line is the judge API key (else $OPENAI_API_KEY)")
    parser.add_argument("--max-attempts", type=int, default=6, help="tries per request on 429/5xx/timeouts")
    parser.add_argument("--retry-backoff", type=float, default=1.0, help="first retry delay in seconds (doubles)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")


def _ssl_context() -> ssl.SSLContext:
    """The default TLS context (system CA bundle), built once per process: loading the CA
    certificates costs tens of milliseconds, paid by every new client otherwise."""
    return ssl.create_default_context()


class _TransportError(Exception):
    """The request got no complete HTTP response: refused or dropped connection, timeout,
    malformed reply. Retried like a 5xx."""


class _Connection:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = time.monotonic()

    def usable(self, max_idle_s: float) -> bool:
        return (
            not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < max_idle_s
        )

    def close(self) -> None:
        self.writer.close()


class _ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one origin, for JSON POSTs to one path.

    The caller bounds the requests in flight (so the pool never holds more connections than
    that). A request on a reused connection that the server closed meanwhile (idle keep-alive
    timeout) is sent again once on a new connection before it counts as a failure; connections
    idle for longer than `max_idle_s` (below uvicorn's 5 s default) are not reused.
    """

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float, max_idle_s: float = 4.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DamInputError(f"{url!r} is not an http:// or https:// URL")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        try:
            self.port = parts.port or (443 if self.tls else 80)
        except ValueError as exc:
            raise DamInputError(f"{url!r} has an invalid port: {exc}") from exc
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"POST {target} HTTP/1.1", f"Host: {host_header}", "User-Agent: dam-bench",
                 "Accept: application/json", *(f"{k}: {v}" for k, v in headers.items())]
        self._head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self.timeout_s = timeout_s
        self.max_idle_s = max_idle_s
        self._idle: list[_Connection] = []

    async def _connect(self) -> _Connection:
        ssl_context = _ssl_context() if self.tls else None
        reader, writer = await asyncio.open_connection(self.host, self.port, ssl=ssl_context)
        return _Connection(reader, writer)

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable(self.max_idle_s):
                return conn
            conn.close()
        return None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """(status, response body) of one POST."""
        try:
            return await asyncio.wait_for(self._post(body), self.timeout_s)
        except asyncio.TimeoutError:
            raise _TransportError(f"no answer within {self.timeout_s:g} s (--timeout)") from None

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        request = self._head + str(len(body)).encode() + b"\r\n\r\n" + body
        conn = self._take_idle()
        reused = conn is not None
        while True:
            if conn is None:
                try:
                    conn = await self._connect()
                except ssl.SSLCertVerificationError:
                    raise
                except OSError as exc:
                    raise _TransportError(f"{type(exc).__name__}: {exc}") from exc
            started = [False]
            try:
                status, data, keep = await self._exchange(conn, request, started)
            except BaseException as exc:
                conn.close()  # its state is unknown (also when cancelled or timed out)
                if not isinstance(exc, (OSError, EOFError, ValueError, asyncio.LimitOverrunError)):
                    raise
                if reused and not started[0]:
                    conn, reused = None, False  # stale keep-alive connection: once more, fresh
                    continue
                raise _TransportError(f"{type(exc).__name__}: {exc}") from exc
            if keep:
                conn.idle_since = time.monotonic()
                self._idle.append(conn)
            else:
                conn.close()
            return status, data

    @staticmethod
    async def _exchange(conn: _Connection, request: bytes, started: list[bool]) -> tuple[int, bytes, bool]:
        """Send `request`, read one response: (status, body, connection reusable)."""
        reader = conn.reader
        conn.writer.write(request)
        await conn.writer.drain()
        while True:
            head = await reader.readuntil(b"\r\n\r\n")  # IncompleteReadError (EOFError) on a closed socket
            started[0] = True
            status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
            version, status_text = status_line.split(" ", 2)[:2]
            if not version.startswith("HTTP/1."):
                raise ValueError(f"not an HTTP/1.x response: {status_line[:80]!r}")
            status = int(status_text)
            if not 100 <= status < 200:
                break  # 1xx responses (e.g. 100 Continue) precede the real one
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = version == "HTTP/1.1" and "close" not in connection
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass  # trailer fields
                    break
                chunks.append((await reader.readexactly(size + 2))[:-2])
            data = b"".join(chunks)
        elif "content-length" in headers:
            data = await reader.readexactly(int(headers["content-length"]))
        elif status in (204, 304):
            data = b""
        else:
            data, keep = await reader.read(), False  # delimited by the server closing
        return status, data, keep

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class _Transient(Exception):
    """A failure worth retrying: 429 or 5xx (with its status code) or a transport error."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.status = status


def _error_message(body: bytes) -> str:
    """The server's error text from an error response (OpenAI and vLLM shapes), else the body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:300]
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if payload.get("message"):
            return str(payload["message"])
    return json.dumps(payload)[:300]


class OpenAIJudge:
    """Async client of an OpenAI-compatible chat-completions judge.

    Args:
        base_url: endpoint root, e.g. "http://localhost:8000/v1" (requests go to
            {base_url}/chat/completions).
        model: the served model name sent with each request.
        concurrency: most requests in flight at once (and keep-alive connections).
        api_key: bearer token (vLLM ignores it unless configured).
        max_attempts: tries per request before giving up on transient errors.
        backoff_s: first retry delay; doubles each attempt (with jitter), capped at max_backoff_s.
        timeout_s: per-request timeout.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        concurrency: int = 32,
        api_key: str = "EMPTY",
        max_attempts: int = 6,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        timeout_s: float = 120.0,
    ) -> None:
        if concurrency < 1:
            raise DamInputError(f"--concurrency must be at least 1, got {concurrency}")
        if max_attempts < 1:
            raise DamInputError(f"max_attempts must be at least 1, got {max_attempts}")
        if not base_url.startswith(("http://", "https://")):
            raise DamInputError(
                f"--base-url {base_url!r} must start with http:// or https://, e.g. http://localhost:8000/v1"
            )
        self.base_url = base_url
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        try:
            _ConnectionPool(self.url, self._headers, timeout_s)  # validates the URL now, not mid-run
        except DamInputError as exc:
            raise DamInputError(f"--base-url: {exc}; e.g. http://localhost:8000/v1") from None
        self._pool: _ConnectionPool | None = None  # created inside the running event loop
        self._semaphore: asyncio.Semaphore | None = None
        self.requests_sent = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "OpenAIJudge":
        """The judge named by `--base-url`, `--judge-model` and the options of `add_client_options`."""
        return cls(
            args.base_url,
            args.judge_model,
            concurrency=args.concurrency,
            api_key=read_api_key(args.api_key_file),
            max_attempts=args.max_attempts,
            backoff_s=args.retry_backoff,
            timeout_s=args.timeout,
        )

    def _ensure_pool(self) -> _ConnectionPool:
        if self._pool is None:
            self._pool = _ConnectionPool(self.url, self._headers, self.timeout_s)
            self._semaphore = asyncio.Semaphore(self.concurrency)
        return self._pool

    async def aclose(self) -> None:
        """Close the HTTP connections (the judge can be used again afterwards)."""
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None
            self._semaphore = None

    async def __aenter__(self) -> "OpenAIJudge":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        # Jitter keeps many concurrent retries from hitting a recovering server in lockstep.
        return base * (0.5 + random.random() / 2)

    async def _post(self, pool: _ConnectionPool, body: bytes) -> str:
        """One request: the answer text, or `_Transient` for what a retry may fix."""
        try:
            status, data = await pool.post(body)
        except _TransportError as exc:
            raise _Transient(str(exc)) from exc
        except ssl.SSLCertVerificationError as exc:
            raise DamInputError(
                f"the judge at {self.base_url} has a TLS certificate this machine does not trust ({exc}); "
                "fix --base-url or the system's CA certificates"
            ) from exc
        if status == 429 or status >= 500:
            raise _Transient(_error_message(data), status)
        if status >= 300:
            raise DamInputError(
                f"the judge at {self.base_url} rejected the request with HTTP {status}: "
                f"{_error_message(data)}. Check --judge-model ({self.model!r}), --base-url and --api-key-file."
            )
        try:
            choices = json.loads(data).get("choices") or []
            content = choices[0]["message"]["content"] if choices else None
        except (ValueError, AttributeError, LookupError, TypeError) as exc:
            raise DamInputError(
                f"the judge at {self.base_url} answered HTTP {status} with something that is not a chat "
                f"completion ({data[:200]!r}); is --base-url an OpenAI-compatible /v1 endpoint?"
            ) from exc
        return content if isinstance(content, str) else ""

    async def answer(self, prompt: str) -> str:
        """The judge's answer text to one prompt, retrying transient failures."""
        pool = self._ensure_pool()
        semaphore = self._semaphore
        assert semaphore is not None
        # The body the openai SDK would send: model, one user message, the protocol's parameters.
        body = json.dumps(chat_request(self.model, prompt)).encode()
        last_error: _Transient | None = None
        for attempt in range(self.max_attempts):
            async with semaphore:
                self.requests_sent += 1
                try:
                    return await self._post(pool, body)
                except _Transient as exc:
                    last_error = exc
            if attempt + 1 < self.max_attempts:
                delay = self._delay(attempt)
                logger.debug("judge request failed (%s); retry %d in %.2fs", last_error, attempt + 1, delay)
                await asyncio.sleep(delay)
        assert last_error is not None
        if last_error.status is not None:
            raise DamInputError(
                f"the judge at {self.base_url} kept failing (HTTP {last_error.status}) after {self.max_attempts} "
                f"attempts (last error: {last_error}); check the server's logs or lower --concurrency."
            ) from last_error
        raise DamInputError(
            f"the judge at {self.base_url} is unreachable after {self.max_attempts} attempts "
            f"({last_error}); start the server (e.g. `vllm serve MODEL`) or fix --base-url."
        ) from last_error
