"""Dynamic batching: concurrent requests share one batched `generate` on a worker thread.

Requests wait in a queue; the worker takes up to `max_batch` of them as soon as the batch is
full or the oldest has waited `max_wait_s` (so none waits longer than that once the worker is
free), runs one left-padded `generate` for all of them, and goes back to the queue. Every row
keeps its own generation settings and ends on its own (`dam.server.rows`), so any requests can
share a batch; results cross back to the asyncio side through each job's queue
(`dam.server.jobs`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from dam.describe import DescribeAnything
from dam.errors import DamInputError
from dam.server.jobs import Failed, Job, Prepared, post_events
from dam.server.messages import ChatRequest, RequestError
from dam.server.rows import RowSampler, RowTracker

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` waiting requests; the client should retry later (HTTP 503)."""


def prepare_request(describer: DescribeAnything, request: ChatRequest, tokenizer_lock: threading.Lock) -> Prepared:
    """Prompt ids and focal-prompt tensors of a parsed request (what `DamProcessor.__call__` builds
    for one item); a bad query raises RequestError here, before the request can join a batch."""
    processor = describer.processor
    try:
        with tokenizer_lock:
            input_ids = processor.prompt_ids(request.query, len(request.frames))
    except DamInputError as error:
        raise RequestError(f"the query: {error}", request.query_param, "invalid_query") from None
    prompts = processor.focal_prompts(request.frames)
    return Prepared(
        input_ids=list(input_ids),
        pixel_values=processor.pixel_values(prompts),
        crop_is_full_image=torch.tensor([p.crop_is_full_image for p in prompts], dtype=torch.bool),
        sampling=request.sampling,
        stream=request.stream,
    )


class BatchScheduler:
    """Queue + worker thread running batched generations; see the module docstring."""

    def __init__(self, describer: DescribeAnything, max_batch: int = 32, max_wait_s: float = 0.01, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise DamInputError(
                f"max_batch and max_queue must be >= 1 and max_wait >= 0, got {max_batch}, {max_queue}, {max_wait_s}"
            )
        self.describer = describer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.tokenizer_lock = threading.Lock()
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.rows = 0

    def start(self) -> None:
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="dam-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closing = True
            for job in [*self._pending, *self._running]:
                job.cancel()
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            queued = sum(not job.cancelled for job in self._pending)
            running = sum(not (job.cancelled or job.done) for job in self._running)
        return {
            "queued": queued,
            "running": running,
            "batches": self.batches,
            "mean_batch_size": round(self.rows / self.batches, 2) if self.batches else 0.0,
        }

    def submit(self, prepared: Prepared) -> Job:
        """Queue a request (call on the event loop); raises QueueFull when `max_queue` wait."""
        job = Job(prepared, asyncio.get_running_loop())
        with self._cond:
            while self._pending and self._pending[0].cancelled:
                self._pending.popleft()
            if sum(not j.cancelled for j in self._pending) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._pending.append(job)
            self._cond.notify_all()
        return job

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled:
                    self._pending.popleft()
                if self._closing:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                live = sum(not job.cancelled for job in self._pending)
                remaining = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
                if live >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Job] = []
            while self._pending and len(batch) < self.max_batch:
                job = self._pending.popleft()
                if not job.cancelled:
                    batch.append(job)
            self._running = batch
            return batch

    def _loop(self) -> None:
        while (batch := self._take_batch()) is not None:
            if batch:
                self._run_batch(batch)
            with self._cond:
                self._running = []

    def _run_batch(self, jobs: list[Job]) -> None:
        describer = self.describer
        tracker = RowTracker(jobs, describer, self.tokenizer_lock)
        try:
            input_ids, attention_mask = describer.processor.pad([job.prepared.input_ids for job in jobs], side="left")
            dtype = describer.model.vision.mask_patch_embedding.weight.dtype
            inputs = {
                "input_ids": input_ids,  # (B, L) left-padded
                "attention_mask": attention_mask,
                "pixel_values": torch.cat([job.prepared.pixel_values for job in jobs]).to(dtype),  # (sum F, 8, S, S)
                "crop_is_full_image": torch.cat([job.prepared.crop_is_full_image for job in jobs]),
            }
            settings = [job.prepared.sampling for job in jobs]
            describer.model.generate(
                **{key: value.to(describer.device) for key, value in inputs.items()},
                max_new_tokens=max(s.max_tokens for s in settings),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=describer.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([RowSampler(settings, tracker.eos_ids)]),
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
            tracker.finish_all()
        except Exception as error:  # reported to every waiting client; the worker lives on
            logger.exception("batched generation of %d requests failed", len(jobs))
            tracker.flush()
            post_events([(row.job, Failed(error)) for row in tracker.rows if not row.job.done])
        self.batches += 1
        self.rows += len(jobs)
