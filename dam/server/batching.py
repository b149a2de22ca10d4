"""Dynamic batching: concurrent requests share batched generation on a worker thread.

Requests wait in a queue; once the worker is free it starts as soon as `max_batch` of them
wait or the oldest has waited `max_wait_s` (so none waits longer than that). Then, by
`generation`:
- "plain": it takes up to `max_batch` requests, runs one left-padded transformers `generate`
  for all of them, and goes back to the queue; a row that ends early idles until the batch ends.
- "fast": continuous batching on the fast engine (`dam.server.continuous`): up to `max_batch`
  requests decode together, each leaving as it ends, and waiting requests, also those that
  arrive meanwhile, take the freed slots at once.
Every row keeps its own generation settings and ends on its own (`dam.server.rows`), so any
requests can share a batch, with the same texts on both paths; results cross back to the
asyncio side through each job's queue (`dam.server.jobs`).
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
from dam.server.continuous import ContinuousBatcher, ServedGeneration
from dam.server.jobs import Job, Prepared, model_inputs
from dam.server.messages import ChatRequest, RequestError
from dam.server.rows import RowSampler, RowTracker, StepCounts, eos_ids, sampling_settings

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

    def __init__(
        self,
        describer: DescribeAnything,
        max_batch: int = 32,
        max_wait_s: float = 0.01,
        max_queue: int = 256,
        generation: ServedGeneration = "plain",
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise DamInputError(
                f"max_batch and max_queue must be >= 1 and max_wait >= 0, got {max_batch}, {max_queue}, {max_wait_s}"
            )
        if generation not in ("plain", "fast"):
            raise DamInputError(f"the scheduler's generation must be 'plain' or 'fast', got {generation!r}")
        self.describer = describer
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.generation = generation
        self.tokenizer_lock = threading.Lock()
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._closing = False
        self._thread: threading.Thread | None = None
        self._continuous = ContinuousBatcher(self) if generation == "fast" else None
        self.batches = 0
        """Batched calls that started requests: plain `generate`s, or fast-path admissions."""
        self.rows = 0
        """Requests those calls started."""
        self.counts = StepCounts()

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
        counts = self.counts
        return {
            "generation": self.generation,
            "queued": queued,
            "running": running,
            "batches": self.batches,
            "mean_batch_size": round(self.rows / self.batches, 2) if self.batches else 0.0,
            "steps": counts.steps,
            "tokens": counts.row_tokens,
            "mean_rows_per_step": round(counts.row_tokens / counts.steps, 2) if counts.steps else 0.0,
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

    # ---- the worker ---------------------------------------------------------------------

    def _await_batch(self) -> bool:
        """(Holding `_cond`.) Wait until a batch should start; False when the server closes."""
        while True:
            while self._pending and self._pending[0].cancelled:
                self._pending.popleft()
            if self._closing:
                return False
            if not self._pending:
                self._cond.wait()
                continue
            live = sum(not job.cancelled for job in self._pending)
            remaining = self._pending[0].enqueued + self.max_wait_s - time.monotonic()
            if live >= self.max_batch or remaining <= 0:
                return True
            self._cond.wait(remaining)

    def _pop(self, count: int) -> list[Job]:
        """(Holding `_cond`.) Up to `count` waiting requests, now running."""
        jobs: list[Job] = []
        while self._pending and len(jobs) < count:
            job = self._pending.popleft()
            if not job.cancelled:
                jobs.append(job)
        # A fast run admits requests for as long as they come: forget those already over.
        self._running = [job for job in self._running if not (job.done or job.cancelled)] + jobs
        return jobs

    def waiting(self) -> int:
        """Requests waiting for a slot (the fast path's prompt source reads this every step)."""
        with self._cond:
            return sum(not job.cancelled for job in self._pending)

    def admit(self, count: int) -> list[Job]:
        """Up to `count` waiting requests for free slots of the fast path's running batch."""
        with self._cond:
            jobs = self._pop(count)
        if jobs:
            self.batches += 1
            self.rows += len(jobs)
        return jobs

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self._await_batch():
                    return
                batch = self._pop(self.max_batch) if self._continuous is None else []
            if self._continuous is not None:
                self._continuous.run(self.counts, self.tokenizer_lock)
            elif batch:
                self._run_batch(batch)
            with self._cond:
                self._running = []

    def _run_batch(self, jobs: list[Job]) -> None:
        describer = self.describer
        tracker = RowTracker(jobs, describer, self.tokenizer_lock, self.counts)
        try:
            settings = [job.prepared.sampling for job in jobs]
            eos = eos_ids(describer)
            describer.model.generate(
                **model_inputs(describer, jobs),
                max_new_tokens=max(s.max_tokens for s in settings),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=describer.tokenizer.pad_token_id,
                logits_processor=LogitsProcessorList([RowSampler([sampling_settings(s, eos) for s in settings])]),
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
            tracker.finish_all()
        except Exception as error:  # reported to every waiting client; the worker lives on
            logger.exception("batched generation of %d requests failed", len(jobs))
            tracker.fail(error)
        self.batches += 1
        self.rows += len(jobs)
