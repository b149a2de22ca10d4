"""Jobs: a queued request's inputs and the events the batching worker sends back to it.

The worker thread produces events (text deltas, the final result, a failure); the asyncio
side reads them from the job's queue. `post_events` hands over all events of one generation
step with a single `call_soon_threadsafe` per event loop, not one wake-up per row.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import torch

from dam.describe import DescribeAnything
from dam.server.messages import Sampling


@dataclass
class Prepared:
    """One request as model inputs, built on a request thread before it is queued."""

    input_ids: list[int]
    pixel_values: torch.Tensor  # (F, 8, S, S)
    crop_is_full_image: torch.Tensor  # (F,)
    sampling: Sampling
    stream: bool


def model_inputs(describer: DescribeAnything, jobs: Sequence["Job"]) -> dict[str, torch.Tensor]:
    """The left-padded model inputs of `jobs` on the model's device, as `generate` takes them."""
    input_ids, attention_mask = describer.processor.pad([job.prepared.input_ids for job in jobs], side="left")
    dtype = describer.model.vision.mask_patch_embedding.weight.dtype
    inputs = {
        "input_ids": input_ids,  # (B, L) left-padded
        "attention_mask": attention_mask,
        "pixel_values": torch.cat([job.prepared.pixel_values for job in jobs]).to(dtype),  # (sum F, 8, S, S)
        "crop_is_full_image": torch.cat([job.prepared.crop_is_full_image for job in jobs]),
    }
    return {key: value.to(describer.device) for key, value in inputs.items()}


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_tokens reached)."""
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: BaseException


class Job:
    """A queued request: its inputs, its cancel flag and the events the worker sends it."""

    def __init__(self, prepared: Prepared, loop: asyncio.AbstractEventLoop) -> None:
        self.prepared = prepared
        self.loop = loop
        self.enqueued = time.monotonic()
        self.cancelled = False
        self.done = False
        self._events: asyncio.Queue[Delta | Finished | Failed] = asyncio.Queue()

    def cancel(self) -> None:
        """Free the slot: a queued job is dropped, a running row stops at the next step."""
        self.cancelled = True

    async def events(self) -> AsyncIterator[list[Delta | Finished | Failed]]:
        """Lists of the events that arrived since the last one was read (so that a client that
        fell behind gets them in one write); a Finished or Failed event comes last."""
        while True:
            events = [await self._events.get()]
            while not self._events.empty():
                events.append(self._events.get_nowait())
            yield events
            if isinstance(events[-1], (Finished, Failed)):
                return


def _deliver(events: list[tuple[Job, Delta | Finished | Failed]]) -> None:
    for job, event in events:
        job._events.put_nowait(event)


def post_events(events: list[tuple[Job, Delta | Finished | Failed]]) -> None:
    """Hand events to their jobs' event loops (from the worker thread), one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Delta | Finished | Failed]]] = {}
    for job, event in events:
        if isinstance(event, (Finished, Failed)):
            job.done = True
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            for job, _ in batch:
                job.cancelled = True
