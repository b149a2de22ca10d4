"""Judge clients: something that answers one protocol prompt with text.

`OpenAIJudge` talks to any OpenAI-compatible chat-completions endpoint (vLLM, the OpenAI API)
with many requests in flight, which is what makes scoring fast: the reference script waits for
each answer before sending the next question. Transient failures (429, 5xx, timeouts, dropped
connections) are retried with exponential backoff; a request the server rejects for good
(other 4xx) or a judge that stays unreachable raises `DamInputError` naming the URL.

A local transformers judge only has to implement the `Judge` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Protocol, runtime_checkable

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


class OpenAIJudge:
    """Async client of an OpenAI-compatible chat-completions judge.

    Args:
        base_url: endpoint root, e.g. "http://localhost:8000/v1".
        model: the served model name sent with each request.
        concurrency: most requests in flight at once.
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
        self.base_url = base_url
        self.model = model
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.timeout_s = timeout_s
        self._api_key = api_key
        self._client = None  # created lazily inside the running event loop
        self._semaphore: asyncio.Semaphore | None = None
        self.requests_sent = 0

    def _ensure_client(self):
        import httpx2
        import openai

        if self._client is None:
            # Our own retry loop (below) replaces the SDK's, so the backoff is one policy we
            # control; the pool must allow as many connections as requests in flight.
            limits = httpx2.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._api_key,
                max_retries=0,
                timeout=self.timeout_s,
                http_client=httpx2.AsyncClient(limits=limits, timeout=self.timeout_s),
            )
            self._semaphore = asyncio.Semaphore(self.concurrency)
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP connections (the judge can be used again afterwards)."""
        if self._client is not None:
            await self._client.close()
            self._client = None
            self._semaphore = None

    async def __aenter__(self) -> "OpenAIJudge":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _delay(self, attempt: int) -> float:
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        # Jitter keeps many concurrent retries from hitting a recovering server in lockstep.
        return base * (0.5 + random.random() / 2)

    async def answer(self, prompt: str) -> str:
        """The judge's answer text to one prompt, retrying transient failures."""
        import openai

        client = self._ensure_client()
        assert self._semaphore is not None
        last_error: Exception | None = None
        for attempt in range(self.max_attempts):
            async with self._semaphore:
                try:
                    self.requests_sent += 1
                    completion = await client.chat.completions.create(**chat_request(self.model, prompt))
                    content = completion.choices[0].message.content if completion.choices else None
                    return content or ""
                except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                    last_error = exc
                except openai.APIStatusError as exc:
                    if exc.status_code != 429 and exc.status_code < 500:
                        raise DamInputError(
                            f"the judge at {self.base_url} rejected the request with HTTP {exc.status_code}: "
                            f"{exc.message}. Check --judge-model ({self.model!r}), --base-url and --api-key-file."
                        ) from exc
                    last_error = exc
            if attempt + 1 < self.max_attempts:
                delay = self._delay(attempt)
                logger.debug("judge request failed (%s); retry %d in %.2fs", last_error, attempt + 1, delay)
                await asyncio.sleep(delay)
        if isinstance(last_error, openai.APIStatusError):
            raise DamInputError(
                f"the judge at {self.base_url} kept failing (HTTP {last_error.status_code}) after "
                f"{self.max_attempts} attempts; check the server's logs or lower --concurrency."
            ) from last_error
        raise DamInputError(
            f"the judge at {self.base_url} is unreachable after {self.max_attempts} attempts "
            f"({type(last_error).__name__}: {last_error}); start the server (e.g. `vllm serve MODEL`) "
            "or fix --base-url."
        ) from last_error
