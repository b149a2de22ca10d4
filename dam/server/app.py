"""The FastAPI app: OpenAI chat completions (plain and SSE), models, health, SAM and the demo page.

Routes: POST /v1/chat/completions and /chat/completions (clients whose base_url lacks /v1),
GET /v1/models (and /models), GET /health, POST /v1/segment (box / points -> mask with SAM, for
the demo page), GET / (the demo page, with `ui=True`). Bad requests get HTTP 400 with
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; a full queue gets
503 with Retry-After. No request can take the server down: parsing and image decoding run on
request threads and raise RequestError, and a failed generation fails only the requests it
was generating. /health reports the generation path, queued and running requests, `batches`
(batched calls that started requests) with `mean_batch_size`, `steps` (forward calls that
gave requests a token), `tokens` (the tokens they gave) and `mean_rows_per_step` (their ratio:
requests decoding together, on average).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, AsyncGenerator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from dam.describe import DescribeAnything, GenerationMode
from dam.errors import DamInputError
from dam.server.batching import BatchScheduler, QueueFull, prepare_request
from dam.server.continuous import resolve_generation
from dam.server.jobs import Delta, Failed, Finished, Job
from dam.server.messages import RequestError, decode_data_url, model_sampling, parse_chat_request

logger = logging.getLogger(__name__)

DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 512 * 1024 * 1024
_DISCONNECT_POLL_S = 0.25


@dataclass
class ServerSettings:
    """What `dam serve` configures; the same fields are its command-line options."""

    model_name: str = "dam"
    """The id /v1/models lists and responses carry (the `model` of a request is not checked)."""
    max_batch: int = 32
    """Most requests generating together (1 disables batching)."""
    max_wait_ms: float = 10.0
    """Longest a request waits for others to join its batch once the worker is free."""
    max_queue: int = 256
    """Most requests waiting for the worker; more get 503 with Retry-After."""
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    """Largest image (width x height) a request may send."""
    ui: bool = False
    """Serve the demo page at /."""
    generation: GenerationMode | None = None
    """"fast" (continuous batching on dam.generation: rows leave as they end and waiting
    requests take their slots), "plain" (one transformers `generate` per batch), or "auto"
    (fast wherever the engine supports the model, CPU included); None: the describer's
    `generation` (default "auto"). Both paths give the same texts."""


def _error(status: int, message: str, error_type: str, code: str, param: str | None = None, **headers: str) -> JSONResponse:
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _bad_request(error: RequestError) -> JSONResponse:
    logger.info("400 %s: %s", error.code, error.message)
    return JSONResponse(error.body(), status_code=400)


async def _json_body(request: Request) -> Any:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise RequestError(
            f"the request body has {int(length)} bytes, more than {MAX_BODY_BYTES}; send smaller images",
            None, "body_too_large",
        )
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the request body is not valid JSON ({error}); send a chat-completions JSON object", None, "invalid_json") from None


async def _wait_finished(job: Job, request: Request) -> Finished | Failed | None:
    """The job's last event; None (and the job cancelled) if the client went away first."""
    async def last_event() -> Finished | Failed:
        async for events in job.events():
            if isinstance(events[-1], (Finished, Failed)):
                return events[-1]
        raise RuntimeError("job ended without a result")

    waiter = asyncio.ensure_future(last_event())
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=_DISCONNECT_POLL_S)
            if done:
                return waiter.result()
            if await request.is_disconnected():
                logger.info("client disconnected; request cancelled")
                return None
    finally:
        if not waiter.done():
            waiter.cancel()
        job.cancel()


def create_app(describer: DescribeAnything, settings: ServerSettings | None = None) -> FastAPI:
    """The server app for a loaded model; the batching worker runs while the app is up."""
    settings = settings or ServerSettings()
    scheduler = BatchScheduler(
        describer, settings.max_batch, settings.max_wait_ms / 1000.0, settings.max_queue,
        generation=resolve_generation(describer, settings.generation),
    )
    config = describer.model.config
    allowed_frames = tuple(sorted({1, int(config.num_video_frames)}))
    defaults = model_sampling(describer.model.generation_config)
    sam_lock = threading.Lock()
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        logger.info(
            "serving %s: generation=%s max_batch=%d max_wait_ms=%g max_queue=%d",
            settings.model_name, scheduler.generation, settings.max_batch, settings.max_wait_ms, settings.max_queue,
        )
        yield
        scheduler.stop()

    app = FastAPI(title="Describe Anything (OpenAI-compatible)", lifespan=lifespan)
    app.state.scheduler = scheduler

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return _bad_request(RequestError(f"malformed request: {error.errors()}", None, "invalid_body"))

    def completion_id() -> str:
        return "chatcmpl-" + uuid.uuid4().hex

    def chunk(cid: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        body = {
            "id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": settings.model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        return f"data: {json.dumps(body)}\n\n"

    def usage(event: Finished) -> dict[str, int]:
        return {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
        }

    async def stream(job: Job, include_usage: bool) -> AsyncGenerator[str, None]:
        cid = completion_id()
        try:
            yield chunk(cid, {"role": "assistant", "content": ""})
            async for events in job.events():  # all that arrived meanwhile go out in one write
                out = []
                for event in events:
                    if isinstance(event, Delta):
                        out.append(chunk(cid, {"content": event.text}))
                    elif isinstance(event, Finished):
                        out.append(chunk(cid, {}, event.finish_reason))
                        if include_usage:
                            body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                    "model": settings.model_name, "choices": [], "usage": usage(event)}
                            out.append(f"data: {json.dumps(body)}\n\n")
                    else:
                        error = {"message": f"generation failed: {event.error}", "type": "server_error",
                                 "param": None, "code": None}
                        out.append(f"data: {json.dumps({'error': error})}\n\n")
                yield "".join(out)
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects mid-stream: its row stops at the next step
            job.cancel()

    async def chat_completions(request: Request) -> Response:
        try:
            body = await _json_body(request)
            parsed = await run_in_threadpool(
                parse_chat_request, body,
                max_pixels=settings.max_image_pixels, allowed_frames=allowed_frames, defaults=defaults,
            )
            prepared = await run_in_threadpool(prepare_request, describer, parsed, scheduler.tokenizer_lock)
        except RequestError as error:
            return _bad_request(error)
        try:
            job = scheduler.submit(prepared)
        except QueueFull as full:
            return _error(
                503, f"the server is busy ({full}); retry in {RETRY_AFTER_S} s", "server_error", "queue_full",
                **{"Retry-After": str(RETRY_AFTER_S)},
            )
        if parsed.stream:
            return StreamingResponse(
                stream(job, parsed.include_usage), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        event = await _wait_finished(job, request)
        if event is None:
            return Response(status_code=499)
        if isinstance(event, Failed):
            return _error(500, f"generation failed: {event.error}", "server_error", "generation_failed")
        return JSONResponse({
            "id": completion_id(), "object": "chat.completion", "created": int(time.time()), "model": settings.model_name,
            "choices": [{
                "index": 0, "message": {"role": "assistant", "content": event.text},
                "logprobs": None, "finish_reason": event.finish_reason,
            }],
            "usage": usage(event),
        })

    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)

    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": created, "owned_by": "dam"}]}

    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/models", models, methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok", "model": settings.model_name, "sam": describer.sam is not None,
            "max_batch": settings.max_batch, "video_frames": int(config.num_video_frames), **scheduler.stats(),
        }

    def segment(body: Any) -> dict[str, Any]:
        if describer.sam is None:
            raise RequestError(
                "this server has no segment-anything model: start it with --sam-checkpoint sam_vit_h_4b8939.pth, "
                "or send a painted mask", None, "sam_unavailable",
            )
        if not isinstance(body, dict):
            raise RequestError("the body must be an object {image, box} or {image, points, labels}", None, "invalid_body")
        image = decode_data_url(body.get("image"), "image", settings.max_image_pixels)
        try:
            with sam_lock:
                pixels, mask = describer.resolve_region(
                    image, box=body.get("box"), points=body.get("points"), point_labels=body.get("labels"),
                )
        except DamInputError as error:
            raise RequestError(str(error), None, "invalid_prompt") from None
        buffer = io.BytesIO()
        Image.fromarray(mask.astype(np.uint8) * 255, "L").save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        return {"mask": "data:image/png;base64," + encoded, "area": int(mask.sum()), "size": list(pixels.shape[:2])}

    @app.post("/v1/segment")
    async def segment_route(request: Request) -> Response:
        try:
            return JSONResponse(await run_in_threadpool(segment, await _json_body(request)))
        except RequestError as error:
            return _bad_request(error)

    if settings.ui:
        from dam.server.ui import DEMO_PAGE

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def page() -> str:
            return DEMO_PAGE

    return app
