"""Continuous batching of requests on the fast engine (`dam serve --generation fast`).

While the engine decodes, the scheduler's queue is its open prompt source (`JobQueue`): a
request that arrives mid-decode waits only for a free slot, and is then embedded (one batched
vision call for all taken together), prefilled into that slot and decoded with the others. A
row ends at EOS, at its max_tokens, at a stop string or when its client goes away, and its
slot is free for the next waiting request at once, instead of computing until the longest
request of its batch ends. Each row keeps its own settings (`dam.server.rows.sampling_settings`,
chosen by the same `RowChooser` as on the plain path, so a seed gives the same text on both
paths however requests are batched), and streams its text step by step through the same
`RowTracker` as the plain path. The engine returns when no row is live and nothing waits; the
next request starts the next run (buffers and captured graphs are kept in between).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Literal

import torch

from dam.describe import GENERATION_MODES, DescribeAnything
from dam.errors import DamInputError
from dam.generation import FastGenerator, SamplingSettings, unsupported_reason
from dam.server.jobs import model_inputs
from dam.server.rows import RowTracker, StepCounts, eos_ids, sampling_settings

if TYPE_CHECKING:
    from dam.server.batching import BatchScheduler

logger = logging.getLogger(__name__)

ServedGeneration = Literal["plain", "fast"]


def _model_settings(describer: DescribeAnything) -> SamplingSettings | str:
    """What the model's generation config adds to every request on the plain path (which calls
    `generate` greedily with per-row choices), or why the fast path cannot do the same."""
    return SamplingSettings.resolve(
        describer.model.generation_config,
        dict(max_new_tokens=1, do_sample=False, temperature=None, top_p=None, top_k=None),
    )


def resolve_generation(describer: DescribeAnything, requested: str | None) -> ServedGeneration:
    """The path a server uses: `requested` ("auto", "plain", "fast"; None: the describer's own
    `generation`). "auto" is "fast" wherever the engine supports the model, on a CPU too (unlike
    `describe_batch`'s "auto"): serving the tiny model on a CPU, continuous batching answered as
    many requests per second as one `generate` per batch at one request in flight and more at
    32 (bench/speed_serve.py), and a short request no longer waits for a long one to end. "fast"
    on a model or generation config the engine cannot reproduce falls back to "plain" with a
    warning ("auto": an info line)."""
    mode = requested or describer.generation
    if mode not in GENERATION_MODES:
        raise DamInputError(f"generation must be one of {GENERATION_MODES}, got {mode!r}")
    if mode == "plain":
        return "plain"
    settings = _model_settings(describer)
    reason = unsupported_reason(describer.model.language_model) or (settings if isinstance(settings, str) else None)
    if reason is not None:
        level = logging.WARNING if mode == "fast" else logging.INFO
        logger.log(level, "fast generation is off for %s; serving with transformers generate", reason)
        return "plain"
    return "fast"


class JobQueue:
    """The scheduler's waiting requests as the engine's `PromptSource`.

    `take` admits requests (each gets the next prompt index and a row of the tracker) and embeds
    them with one batched vision call; the engine reads each one's settings once, then.
    """

    def __init__(self, scheduler: "BatchScheduler", tracker: RowTracker, min_new_tokens: int) -> None:
        self.scheduler = scheduler
        self.describer = scheduler.describer
        self.tracker = tracker
        self.min_new_tokens = min_new_tokens
        self.eos = eos_ids(self.describer)
        self._next = 0
        self._settings: dict[int, SamplingSettings] = {}

    def __len__(self) -> int:
        return self.scheduler.waiting()

    def take(self, count: int) -> list[tuple[int, torch.Tensor]]:
        jobs = self.scheduler.admit(count)
        if not jobs:
            return []
        indices = list(range(self._next, self._next + len(jobs)))
        self._next += len(jobs)
        for index, job in zip(indices, jobs):
            self.tracker.add(index, job)  # before embedding: a failure then reaches its client
            self._settings[index] = sampling_settings(job.prepared.sampling, self.eos, self.min_new_tokens)
        inputs = model_inputs(self.describer, jobs)
        embeds = self.describer.model.embed_inputs(
            inputs["input_ids"], inputs["pixel_values"], inputs["crop_is_full_image"]
        )  # (B, L, D), left-padded
        width = embeds.shape[1]
        return [
            (index, embeds[row, width - len(job.prepared.input_ids) :])  # (L_i, D): the padding dropped
            for row, (index, job) in enumerate(zip(indices, jobs))
        ]

    def settings_of(self, index: int) -> SamplingSettings:
        return self._settings.pop(index)


class ContinuousBatcher:
    """Runs the fast engine over a scheduler's queue, one run per busy period (see module doc)."""

    def __init__(self, scheduler: "BatchScheduler") -> None:
        describer = scheduler.describer
        self.scheduler = scheduler
        settings = _model_settings(describer)
        self.min_new_tokens = settings.min_new_tokens if isinstance(settings, SamplingSettings) else 0
        # Its own engine, not the describer's: a run lasts as long as requests keep coming, and
        # `describe` calls from other threads would wait for it behind the engine's lock.
        self.engine = FastGenerator(
            describer.model.language_model, max_slots=scheduler.max_batch, decode_step=describer.decode_step
        )

    def run(self, counts: StepCounts, tokenizer_lock: threading.Lock) -> None:
        """Serve waiting requests until none is left and no row is live."""
        tracker = RowTracker([], self.scheduler.describer, tokenizer_lock, counts)
        queue = JobQueue(self.scheduler, tracker, self.min_new_tokens)
        try:
            self.engine.generate(
                queue, queue.settings_of, on_tokens=tracker.advance, on_finish=lambda index, _: tracker.end(index)
            )
        except Exception as error:  # reported to every admitted client; the worker lives on
            logger.exception("continuous batching of %d running requests failed", len(tracker.rows))
            tracker.fail(error)
