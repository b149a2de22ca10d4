"""Per-row generation: each request keeps its own settings, on either generation path.

- :func:`sampling_settings` turns a request's `Sampling` into the fast engine's
  `SamplingSettings`; both paths choose tokens with the engine's `RowChooser` from them, so a
  seeded request gets the same text on either path and whatever it was batched with.
- :class:`RowSampler`, a logits processor for the plain path's one batched (greedy) `generate`,
  turns each row's logits into a one-hot choice made by that `RowChooser` (the row's own
  temperature, top-p, seeded generator and min_tokens), so `generate` picks exactly that token.
- :class:`RowTracker` gets each row's new tokens (from `generate` as a stopping criterion, or
  from the fast engine's `on_tokens`), ends the row at EOS, at its `max_tokens`, at a stop
  string or when its client went away, and sends streaming rows their new text. Text that may
  still become a stop string, trailing spaces and half-decoded characters are held back, so
  the streamed pieces add up to the final, stripped text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from dam.describe import DescribeAnything
from dam.generation import RowChooser, SamplingSettings, row_generator
from dam.server.jobs import Delta, Failed, Finished, Job, post_events
from dam.server.messages import Sampling

logger = logging.getLogger(__name__)


def eos_ids(describer: DescribeAnything) -> set[int]:
    eos = describer.model.generation_config.eos_token_id
    if eos is None:
        eos = describer.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


def sampling_settings(sampling: Sampling, eos: set[int], min_new_tokens: int = 0) -> SamplingSettings:
    """A request's settings for `RowChooser` and the fast engine. `min_new_tokens` is the
    model's own (its generation config's), which the plain `generate` applies to every row."""
    sample = sampling.temperature > 0
    return SamplingSettings(
        max_new_tokens=sampling.max_tokens,
        min_new_tokens=min(sampling.max_tokens, max(sampling.min_tokens, min_new_tokens)),
        do_sample=sample,
        temperature=sampling.temperature if sample else 1.0,
        top_p=sampling.top_p,
        eos_token_ids=tuple(sorted(eos)),
        seed=sampling.seed,
    )


class RowSampler(LogitsProcessor):
    """Per-row temperature / top-p / seed sampling and min_tokens inside a greedy `generate`."""

    def __init__(self, settings: Sequence[SamplingSettings]) -> None:
        self.settings = list(settings)
        self.chooser: RowChooser | None = None
        self.start = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, V) logits of the next token
        if self.chooser is None:
            self.start = input_ids.shape[1]
            generators = [row_generator(s.seed, scores.device) if s.do_sample else None for s in self.settings]
            self.chooser = RowChooser(self.settings, generators, scores.device)
        if not self.chooser.changes_scores:  # all greedy, no min_tokens: generate's argmax is the choice
            return scores
        generated = torch.full((scores.shape[0],), input_ids.shape[1] - self.start, device=scores.device)
        tokens = self.chooser(scores, generated)  # (B,)
        return torch.full_like(scores, float("-inf")).scatter_(1, tokens[:, None], 0.0)


def visible_text(text: str, stops: Sequence[str], final: bool) -> tuple[str, bool]:
    """The part of a row's decoded text that may be shown, and whether a stop string ended it.

    Final texts are stripped (as `describe` returns them) and cut before the first stop string.
    While generating, trailing whitespace, a trailing replacement character (half a UTF-8
    character) and any tail that could grow into a stop string are held back.
    """
    text = text.lstrip()
    cuts = [text.find(stop) for stop in stops if stop in text]
    if cuts:
        return text[: min(cuts)].rstrip(), True
    text = text.rstrip()
    if final:
        return text, False
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:length]):
                hold = length
                break
    return text[: len(text) - hold].rstrip(), False


class _Row:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.tokens: list[int] = []
        self.sent = ""
        self.done = False


@dataclass
class StepCounts:
    """Generation steps (forward calls giving rows a token) and the tokens they gave requests,
    whose ratio is the mean number of requests decoding together (/health)."""

    steps: int = 0
    row_tokens: int = 0


class RowTracker(StoppingCriteria):
    """Ends rows (EOS, max_tokens, stop strings, cancelled) and streams their text.

    Rows are keyed by index: the batch row on the plain path (all given up front), the
    engine's prompt index on the fast path (`add`ed as requests are admitted, dropped by `end`).
    """

    def __init__(
        self,
        jobs: Sequence[Job],
        describer: DescribeAnything,
        tokenizer_lock: threading.Lock,
        counts: StepCounts | None = None,
    ) -> None:
        self.rows: dict[int, _Row] = {index: _Row(job) for index, job in enumerate(jobs)}
        self.outbox: list[tuple[Job, Delta | Finished | Failed]] = []
        self.tokenizer = describer.tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.eos_ids = eos_ids(describer)
        self.counts = counts if counts is not None else StepCounts()

    def add(self, index: int, job: Job) -> None:
        self.rows[index] = _Row(job)

    def _decode(self, rows: list[_Row]) -> list[str]:
        with self.tokenizer_lock:
            return self.tokenizer.batch_decode([row.tokens for row in rows], skip_special_tokens=True)

    def advance(self, produced: Sequence[tuple[int, int]]) -> list[int]:
        """Give rows their new tokens ((index, token) pairs of one step); returns the indices
        of those rows that are done now (finished, or their client went away)."""
        check: list[_Row] = []
        appended = 0
        for index, token in produced:
            row = self.rows[index]
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True
                continue
            row.tokens.append(token)
            appended += 1
            settings = row.job.prepared.sampling
            if token in self.eos_ids:
                self._finish(row, "stop")
            elif len(row.tokens) >= settings.max_tokens:
                self._finish(row, "length")
            elif row.job.prepared.stream or settings.stop:
                check.append(row)
        if check:
            for row, text in zip(check, self._decode(check)):
                shown, stopped = visible_text(text, row.job.prepared.sampling.stop, final=False)
                if stopped:
                    self._finish(row, "stop")
                elif row.job.prepared.stream:
                    self._send(row, shown)
        self.counts.steps += 1
        self.counts.row_tokens += appended
        self.flush()
        return [index for index, _ in produced if self.rows[index].done]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # input_ids: (B, n) tokens generated so far; the last column is this step's
        newest = input_ids[:, -1].tolist()
        self.advance([(index, token) for index, token in enumerate(newest) if not self.rows[index].done])
        done = [self.rows[index].done for index in range(len(newest))]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def end(self, index: int) -> None:
        """The fast engine ended row `index`: forget it (finishing it first, should the engine
        have stopped it on a ground the row did not see)."""
        row = self.rows.pop(index, None)
        if row is not None and not row.done and not row.job.cancelled:
            self._finish(row, "stop" if row.tokens and row.tokens[-1] in self.eos_ids else "length")
            self.flush()

    def _send(self, row: _Row, shown: str) -> None:
        if shown.startswith(row.sent) and len(shown) > len(row.sent):
            self.outbox.append((row.job, Delta(shown[len(row.sent) :])))
            row.sent = shown

    def _finish(self, row: _Row, reason: str) -> None:
        row.done = True
        text, stopped = visible_text(self._decode([row])[0], row.job.prepared.sampling.stop, final=True)
        if stopped:
            reason = "stop"
        if row.job.prepared.stream:
            if not text.startswith(row.sent):
                logger.warning("streamed text diverged from the final decode; the stream ends with what was sent")
            self._send(row, text)
        prepared = row.job.prepared
        self.outbox.append((row.job, Finished(text, reason, len(prepared.input_ids), len(row.tokens))))

    def flush(self) -> None:
        """Send this step's events: one wake-up of the event loop, not one per row."""
        if self.outbox:
            post_events(self.outbox)
            self.outbox = []

    def finish_all(self) -> None:
        """After `generate` returns: rows it ended by its own length limit are done too."""
        for row in self.rows.values():
            if not row.done and not row.job.cancelled:
                self._finish(row, "length")
        self.flush()

    def fail(self, error: BaseException) -> None:
        """A generation failed: every row still waiting for its result gets the error."""
        self.flush()
        post_events([(row.job, Failed(error)) for row in self.rows.values() if not row.job.done])
