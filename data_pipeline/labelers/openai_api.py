"""The ``openai`` labeler: a VLM behind an OpenAI-compatible chat-completions endpoint (vLLM).

Each region becomes one chat request with two image parts (the focal crop and the full image
with the region highlighted, as JPEG data URLs, see :mod:`data_pipeline.views`) and one text
part (a prompt variant chosen by the region's seed, with its category). Requests run on
asyncio with at most ``concurrency`` in flight, each with a total deadline of ``timeout_s``;
429, 5xx, timeouts and dropped connections are retried ``max_attempts`` times in all with
exponential backoff and jitter, then the region gets ``LabelResult(None, "timeout")`` or
``LabelResult(None, "error: ...")``, both ``transient`` (the stage leaves its shard for a rerun
to retry). A 400-class rejection of one request (an image the server
will not take, a prompt too long) is that region's error, not retried. Answers are cleaned
(:mod:`data_pipeline.cleaning`) and a rejected one (refusal, empty, self-reference) is asked
again with the next prompt variant, ``rejection_retries`` times.

What raises ``DamInputError`` instead, because it would fail every region: no server at
``base_url`` when the labeler is built (one ``GET /models`` probe), a model it does not serve,
an API key it refuses (401/403) or a path it does not have (404), and a server that stops
answering mid-run (a request that failed to connect on every attempt, and a failed re-probe).

The HTTP client is the openai SDK's ``AsyncOpenAI`` (its own retries off: the loop above
decides) on an event loop in a background thread owned by the labeler, so ``label`` is a plain
blocking call that also works where an event loop is already running (a notebook), and
keep-alive connections survive from one ``label`` call to the next. Its per-request CPU cost
(a few ms) is small next to a VLM's seconds per region. The images of a region are encoded in
a worker thread just before it is sent, at most ``2 * concurrency`` regions ahead, so memory
stays bounded for any number of requests.

Sampling: ``temperature`` (default 0.2) with the region's seed (plus the re-ask number) sent as
the request's ``seed``, so vLLM samples reproducibly per region.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import urllib.error
import urllib.request
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dam.errors import DamInputError

from data_pipeline.labelers.base import (
    Generated,
    LabelRequest,
    LabelResult,
    VlmLabelerConfig,
    check_request,
    error_result,
    finish,
)
from data_pipeline.cleaning import RETRYABLE_REASONS
from data_pipeline.prompts import PROMPT_VARIANTS, build_prompt, check_templates
from data_pipeline.views import describe_views, render_views, to_data_url

logger = logging.getLogger(__name__)

__all__ = ["OpenAILabelerConfig", "OpenAILabeler", "probe_server"]

_START_HINT = "start the VLM server (e.g. `vllm serve Qwen/Qwen2.5-VL-7B-Instruct --port 8000`) or fix labeler.base_url"
T = TypeVar("T")


@dataclass(kw_only=True)
class OpenAILabelerConfig(VlmLabelerConfig):
    """``labeler:`` section with ``type: openai``."""

    base_url: str
    """Root of the OpenAI-compatible API, e.g. http://localhost:8000/v1."""
    model: str | None = None
    """Served model name; null: the one model the server lists."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key (vLLM without --api-key accepts any)."""
    concurrency: int = 16
    """Most requests in flight at once."""
    timeout_s: float = 120.0
    """Total deadline of one request."""
    max_attempts: int = 4
    """Tries per request on 429 / 5xx / timeouts / connection errors."""
    backoff_s: float = 1.0
    """First retry delay; doubles per attempt (with jitter)."""
    max_backoff_s: float = 30.0
    """Cap of the retry delay."""
    temperature: float = 0.2
    top_p: float | None = None
    max_tokens: int = 512
    send_seed: bool = True
    """Send the region's seed as the request's sampling seed."""
    extra_body: dict[str, Any] = field(default_factory=dict)
    """Extra request fields for the server (vLLM: top_k, repetition_penalty, ...)."""
    probe_timeout_s: float = 10.0
    """Deadline of the GET /models probe when the labeler is built."""
    trust_env: bool = False
    """Use the HTTP(S)_PROXY environment variables (off: the server is usually on the cluster)."""

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise DamInputError(
                f"labeler.base_url {self.base_url!r} must start with http:// or https://, e.g. http://localhost:8000/v1"
            )
        for name in ("concurrency", "max_attempts", "max_tokens"):
            if getattr(self, name) < 1:
                raise DamInputError(f"labeler.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise DamInputError(f"labeler.{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise DamInputError("labeler.backoff_s and labeler.max_backoff_s must be >= 0")
        if self.temperature < 0:
            raise DamInputError(f"labeler.temperature must be >= 0, got {self.temperature}")
        if self.rejection_retries < 0:
            raise DamInputError(f"labeler.rejection_retries must be >= 0, got {self.rejection_retries}")
        if self.prompts is not None:
            check_templates(self.prompts)


def probe_server(
    base_url: str, api_key: str, *, timeout_s: float = 10.0, trust_env: bool = False, key_env: str = "OPENAI_API_KEY"
) -> list[str]:
    """The model ids the server at ``base_url`` lists (GET /models), or DamInputError saying
    why the server cannot be used and how to fix it."""
    url = base_url.rstrip("/") + "/models"
    handlers = [] if trust_env else [urllib.request.ProxyHandler({})]
    opener = urllib.request.build_opener(*handlers)
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}", "Accept": "application/json"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:
        if error.code in (401, 403):
            raise DamInputError(
                f"the labeler server at {base_url} refused the API key (HTTP {error.code}); put the key in "
                f"${key_env} (or name another variable in labeler.api_key_env)"
            ) from None
        raise DamInputError(
            f"the labeler server at {base_url} answered GET {url} with HTTP {error.code}; labeler.base_url must be "
            f"the root of an OpenAI-compatible API, usually ending in /v1 (e.g. http://localhost:8000/v1)"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise DamInputError(f"no labeler server answers at {base_url} ({reason}); {_START_HINT}") from None
    try:
        listed = json.loads(body)["data"]
        return [str(entry["id"]) for entry in listed]
    except (ValueError, KeyError, TypeError):
        raise DamInputError(
            f"GET {url} did not return an OpenAI model list ({body[:120]!r}); is labeler.base_url an "
            f"OpenAI-compatible /v1 endpoint?"
        ) from None


def _resolve_model(requested: str | None, served: list[str], base_url: str) -> str:
    if requested is None:
        if len(served) == 1:
            return served[0]
        if not served:
            raise DamInputError(f"the labeler server at {base_url} lists no models; set labeler.model")
        raise DamInputError(
            f"the labeler server at {base_url} serves several models ({', '.join(served)}); set labeler.model to one"
        )
    if served and requested not in served:
        raise DamInputError(
            f"the labeler server at {base_url} does not serve model {requested!r}; it serves: {', '.join(served)}. "
            f"Set labeler.model to one of them"
        )
    return requested


class _Retry(Exception):
    """One attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str, *, connection: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.connection = connection


class OpenAILabeler:
    """Labels regions with a VLM behind an OpenAI-compatible API; see the module docstring.

    Use as a context manager, or call ``close()``, to end its connections and thread (they
    are daemonic, so forgetting costs nothing at exit). ``calls`` counts HTTP requests sent.
    """

    def __init__(self, config: OpenAILabelerConfig, *, probe: bool = True) -> None:
        self.config = config
        try:
            import openai  # an optional dependency: missing, say so before any work starts
        except ImportError:
            raise DamInputError("the openai labeler needs the openai package: pip install openai") from None
        self._openai: Any = openai
        self.base_url = config.base_url.rstrip("/")
        self.api_key = os.environ.get(config.api_key_env) or "EMPTY"
        if probe:
            served = probe_server(
                self.base_url, self.api_key, timeout_s=config.probe_timeout_s,
                trust_env=config.trust_env, key_env=config.api_key_env,
            )
            self.model = _resolve_model(config.model, served, self.base_url)
        elif config.model is None:
            raise DamInputError("labeler.model is needed when the server is not probed")
        else:
            self.model = config.model
        self.templates = check_templates(config.prompts) if config.prompts else PROMPT_VARIANTS
        self.views_text = describe_views(config.views)
        self.calls = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._in_flight: asyncio.Semaphore | None = None
        self._encoding: asyncio.Semaphore | None = None
        self._lock = threading.Lock()
        logger.info("openai labeler: model %s at %s, %d in flight", self.model, self.base_url, config.concurrency)

    # ---- the background event loop ----------------------------------------------------------

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="openai-labeler", daemon=True)
                self._thread.start()
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller: stop the requests too
            raise

    def close(self) -> None:
        """Close the HTTP connections and stop the event loop (``label`` restarts them)."""
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = None
            self._in_flight = self._encoding = None
        if loop is None:
            return
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> "OpenAILabeler":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _ensure_client(self) -> Any:
        """The AsyncOpenAI client and semaphores, created in the loop they are used from."""
        if self._client is None:
            openai = self._openai
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self.api_key,
                max_retries=0,  # retries are ours: counted, logged, and bounded by timeout_s
                timeout=self.config.timeout_s + 5.0,  # a backstop; asyncio.wait_for is the deadline
                http_client=openai.DefaultAsyncHttpxClient(trust_env=self.config.trust_env),
            )
            self._in_flight = asyncio.Semaphore(self.config.concurrency)
            self._encoding = asyncio.Semaphore(2 * self.config.concurrency)
        return self._client

    # ---- labeling -------------------------------------------------------------------------

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        """One result per request, in order (see the module docstring for what raises)."""
        requests = list(requests)
        if not requests:
            return []
        return self._run(self._label_all(requests))

    async def _label_all(self, requests: list[LabelRequest]) -> list[LabelResult]:
        self._ensure_client()
        tasks = [asyncio.create_task(self._label_one(request)) for request in requests]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if pending:  # one task raised (the server went away): stop the rest, raise its error
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise next(task.exception() for task in done if task.exception() is not None)
        return [task.result() for task in tasks]

    def _encode(self, request: LabelRequest) -> list[str]:
        views = render_views(request.image, request.mask, self.config.views)
        fmt, quality = self.config.views.image_format, self.config.views.jpeg_quality
        return [to_data_url(views.crop, fmt, quality), to_data_url(views.full, fmt, quality)]

    async def _label_one(self, request: LabelRequest) -> LabelResult:
        problem = check_request(request)
        if problem is not None:
            logger.warning("region %s cannot be labeled: %s", request.region_id, problem)
            return error_result(problem)
        assert self._encoding is not None
        async with self._encoding:
            try:
                image_urls = await asyncio.to_thread(self._encode, request)
            except DamInputError as error:
                return error_result(str(error))
            result = LabelResult(None, "empty")
            for attempt in range(self.config.rejection_retries + 1):
                prompt = build_prompt(
                    request.category, request.seed, attempt, views=self.views_text, templates=self.templates
                )
                answer = await self._complete(request, image_urls, prompt, attempt)
                if isinstance(answer, LabelResult):
                    return answer
                result = finish(answer, request, self.config.cleaning)
                if result.caption is not None or result.reason not in RETRYABLE_REASONS:
                    return result
            return result

    def _delay(self, retry: int) -> float:
        base = min(self.config.max_backoff_s, self.config.backoff_s * (2**retry))
        # Jitter keeps many requests that failed together from retrying in lockstep.
        return base * (0.5 + random.random() / 2)

    async def _complete(
        self, request: LabelRequest, image_urls: list[str], prompt: str, attempt: int
    ) -> Generated | LabelResult:
        """One chat completion with retries: the answer, or the region's failure."""
        config = self.config
        content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
        content.append({"type": "text", "text": prompt})
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
        }
        if config.top_p is not None:
            kwargs["top_p"] = config.top_p
        if config.send_seed:
            # A re-ask after a rejection samples anew; servers take 32-bit seeds.
            kwargs["seed"] = (int(request.seed) + 1_000_003 * attempt) % 2**31
        if config.extra_body:
            kwargs["extra_body"] = dict(config.extra_body)
        assert self._in_flight is not None
        failure = _Retry("error: no attempt made")
        for retry in range(config.max_attempts):
            if retry:
                delay = self._delay(retry - 1)
                logger.debug("region %s: %s; retry %d in %.2f s", request.region_id, failure.reason, retry, delay)
                await asyncio.sleep(delay)
            async with self._in_flight:
                self.calls += 1
                try:
                    return await self._attempt(kwargs)
                except _Retry as error:
                    failure = error
                except _Fatal as error:
                    return error_result(str(error))
        if failure.connection and not await self._reachable():
            raise DamInputError(
                f"the labeler server at {self.base_url} stopped answering ({failure.reason}); restart it and rerun "
                f"(finished regions are kept)"
            )
        logger.warning("region %s: giving up after %d attempts (%s)", request.region_id, config.max_attempts, failure.reason)
        # Timeouts, 5xx and 429 may pass: the stage keeps this region's shard unwritten so a rerun asks again.
        if failure.reason == "timeout":
            return LabelResult(None, "timeout", transient=True)
        return error_result(failure.reason.removeprefix("error: "), transient=True)

    async def _attempt(self, kwargs: dict[str, Any]) -> Generated:
        openai = self._openai
        try:
            response = await asyncio.wait_for(self._client.chat.completions.create(**kwargs), self.config.timeout_s)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            raise _Retry("timeout") from None
        except openai.APIConnectionError as error:
            raise _Retry(f"error: connection failed ({error})", connection=True) from None
        except openai.APIStatusError as error:
            status = error.status_code
            message = _status_message(error)
            if status == 429 or status >= 500:
                raise _Retry(f"error: HTTP {status}: {message}") from None
            if status in (401, 403):
                raise DamInputError(
                    f"the labeler server at {self.base_url} refused the API key (HTTP {status}: {message}); "
                    f"put the key in ${self.config.api_key_env}"
                ) from None
            if status == 404:
                raise DamInputError(
                    f"the labeler server at {self.base_url} answered HTTP 404 to a chat completion ({message}); "
                    f"check labeler.model ({self.model!r}) and that labeler.base_url ends in /v1"
                ) from None
            raise _Fatal(f"HTTP {status}: {message}") from None
        except openai.APIError as error:  # a 200 whose body is not a chat completion
            raise _Fatal(f"bad response: {error}") from None
        try:
            choice = response.choices[0]
            text = choice.message.content or ""
        except (AttributeError, IndexError, TypeError):
            raise _Fatal(f"bad response: no choices in {str(response)[:100]}") from None
        return Generated(text, choice.finish_reason == "length")

    async def _reachable(self) -> bool:
        try:
            await asyncio.wait_for(self._client.models.list(), self.config.probe_timeout_s)
        except Exception:  # noqa: BLE001 - any failure means "not reachable" here
            return False
        return True


class _Fatal(Exception):
    """One attempt failed in a way retrying will not fix (a 400-class rejection of this request)."""


def _status_message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if body.get("message"):
            return str(body["message"])
    return str(getattr(error, "message", error))
