"""Per-row generation inside one batched `generate`: each request keeps its own settings.

- :class:`RowSampler`, a logits processor, samples each sampling row with the row's own
  temperature, top-p and seeded generator and turns the row's logits into a one-hot choice, so
  the (greedy) `generate` picks exactly that token; greedy rows are left alone. A request's
  seed therefore gives the same text whatever it was batched with. It also masks EOS for rows
  below their `min_tokens`.
- :class:`RowTracker`, a stopping criterion called with the (B, n) generated ids after every
  step, appends each row's new token, ends the row at EOS, at its `max_tokens`, at a stop
  string or when its client went away (`generate` stops early once all rows are done), and
  sends streaming rows their new text. Text that may still become a stop string, trailing
  spaces and half-decoded characters are held back, so the streamed pieces add up to the
  final, stripped text.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

from dam.describe import DescribeAnything
from dam.server.jobs import Delta, Failed, Finished, Job, post_events
from dam.server.messages import Sampling

logger = logging.getLogger(__name__)


def eos_ids(describer: DescribeAnything) -> set[int]:
    eos = describer.model.generation_config.eos_token_id
    if eos is None:
        eos = describer.tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}


class RowSampler(LogitsProcessor):
    """Per-row temperature / top-p / seed sampling and min_tokens inside a greedy `generate`."""

    def __init__(self, settings: Sequence[Sampling], eos_ids: set[int]) -> None:
        self.settings = list(settings)
        self.eos_ids = sorted(eos_ids)
        self.sampled = [row for row, s in enumerate(self.settings) if s.temperature > 0]
        self.min_tokens = torch.tensor([s.min_tokens for s in self.settings])
        self.generators: list[torch.Generator | None] = []
        self.start: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # scores: (B, V) logits of the next token
        if self.start is None:
            self.start = input_ids.shape[1]
            for s in self.settings:
                generator = None
                if s.seed is not None:
                    generator = torch.Generator(device=scores.device).manual_seed(s.seed % (1 << 64))
                self.generators.append(generator)
        step = input_ids.shape[1] - self.start
        if self.eos_ids and int(self.min_tokens.max()) > step:
            below = (self.min_tokens > step).to(scores.device)[:, None]  # (B, 1)
            eos = scores[:, self.eos_ids]
            scores[:, self.eos_ids] = torch.where(below, torch.full_like(eos, float("-inf")), eos)
        for row in self.sampled:
            s = self.settings[row]
            probs = torch.softmax(scores[row].float() / s.temperature, dim=-1)  # (V,)
            if s.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs >= s.top_p  # keeps at least the top token
                probs = probs.scatter(0, order[outside], 0.0)
            token = torch.multinomial(probs, 1, generator=self.generators[row])
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores


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


class RowTracker(StoppingCriteria):
    """Ends rows (EOS, max_tokens, stop strings, cancelled) and streams their text."""

    def __init__(self, jobs: Sequence[Job], describer: DescribeAnything, tokenizer_lock: threading.Lock) -> None:
        self.rows = [_Row(job) for job in jobs]
        self.outbox: list[tuple[Job, Delta | Finished | Failed]] = []
        self.tokenizer = describer.tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.eos_ids = eos_ids(describer)

    def _decode(self, rows: list[_Row]) -> list[str]:
        with self.tokenizer_lock:
            return self.tokenizer.batch_decode([row.tokens for row in rows], skip_special_tokens=True)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        # input_ids: (B, n) tokens generated so far; the last column is this step's
        newest = input_ids[:, -1].tolist()
        check: list[_Row] = []
        for row, token in zip(self.rows, newest):
            if row.done:
                continue
            if row.job.cancelled:
                row.done = True
                continue
            row.tokens.append(token)
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
        self.flush()
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)

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
        for row in self.rows:
            if not row.done and not row.job.cancelled:
                self._finish(row, "length")
        self.flush()
