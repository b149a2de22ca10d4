"""FastGenerator: continuous-batching decode of many prompts over a slot KV cache.

The prompts (input embeddings, so image features are already in them) wait in a `PromptQueue`
that embeds them in large chunks (for DAM: one batched vision call per chunk). The generator
keeps up to `max_slots` sequences decoding together:

1. Prefill: waiting prompts go through the language model's ordinary forward, left-padded
   with the plain path's attention mask and position ids and a DynamicCache, several at a time
   (up to `prefill_tokens` padded tokens per call); their keys/values are copied into free
   slots of the SlotKVCache (each row from column 0) and their first token is chosen from the
   prefill logits, as `generate` does.
2. Decode: one step gives every live row one token (`DecodeStep`: eager, CUDA graph or
   compiled), attending over its own columns only; the tokens come back to the host, where
   each row stops on EOS or at max_new_tokens.
3. Refill: while prompts wait, freed slots are refilled once at least `refill_fraction` of the
   slots are free (one prefill call then serves several slots), so finished captions stop
   costing decode compute.
4. Compact: when nothing waits and at most `compact_fraction` of the rows are live, the live
   rows move to the front of the cache and steps run on fewer rows (a power of two under
   CUDA graphs, to bound the number of captured shapes).

The prompt source may also be open (a server's request queue, any `PromptSource`): prompts that
arrive while others decode join at the next refill, the step grows to more rows (up to
`max_slots`) and the cache to more slots or columns when they need it, and `generate` returns
once no row is live and nothing waits. Each prompt may have its own `SamplingSettings` (length
limits, sampling, EOS ids, a seed); `on_tokens` sees every token as it is produced and may end
rows at once (stop strings, clients that went away), which frees their slots for waiting prompts.

Greedy decoding gives the tokens of transformers' `generate` on the same prompts (same
prefill, same positions; only the batch a row shares its steps with differs).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from dam.generation.cache import SlotKVCache
from dam.generation.sampling import RowChooser, SamplingSettings, choose_tokens, row_generator
from dam.generation.steps import DecodeStep, resolve_step_kind

logger = logging.getLogger(__name__)

UPFRONT_COLUMNS = 512
"""With per-prompt settings or an open source, columns allocated past a prompt for its new tokens
(at most its max_new_tokens); a sequence that gets further grows the cache when it needs them,
since every slot has the capacity of the longest and a request may ask for far more tokens than
it will produce (a closed queue with shared settings allocates everything up front instead)."""


class PromptSource(Protocol):
    """Where `FastGenerator.generate` takes its prompts from (`PromptQueue` is one).

    A source may grow while `generate` runs (other threads adding prompts): `generate` reads
    its length before every decode step and returns once no row is live and it is empty.
    """

    def __len__(self) -> int:
        """Prompts waiting now."""
        ...

    def take(self, count: int) -> list[tuple[int, torch.Tensor]]:
        """Up to `count` waiting prompts as (index, (L, D) input embeddings); fewer, even none,
        is allowed (prompts withdrawn meanwhile). Indices identify prompts in callbacks and
        order the results; they must be unique within one `generate` call."""
        ...


class PromptQueue:
    """Prompts waiting for a slot, embedded `chunk_size` at a time when first needed.

    `embed(indices)` returns the input embeddings of those prompts, one (L_i, D) tensor each.
    With `prepare`, a chunk is `embed(prepare(indices))` and `prepare` (the CPU part: image
    decoding, resizing, tokenising) of the next chunk runs on a background thread while the
    current one decodes, so the accelerator does not wait for it. Close the queue (or use it as
    a context manager) to stop that thread.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        embed: Callable[[Any], Sequence[torch.Tensor]],
        chunk_size: int,
        prepare: Callable[[list[int]], Any] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if any(length < 1 for length in lengths):
            raise ValueError("every prompt needs at least one token")
        self.lengths = list(lengths)
        self.embed = embed
        self.prepare = prepare
        self.chunk_size = chunk_size
        self._next = 0  # first index of the next chunk to embed
        self._ready: list[tuple[int, torch.Tensor]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._prepared: Future | None = None  # prepare() of the chunk starting at self._next

    def __len__(self) -> int:
        return len(self._ready) + len(self.lengths) - self._next

    def __enter__(self) -> "PromptQueue":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._prepared = None, None

    @property
    def max_length(self) -> int:
        return max(self.lengths, default=1)

    def _chunk(self, start: int) -> list[int]:
        return list(range(start, min(start + self.chunk_size, len(self.lengths))))

    def _embed_next_chunk(self) -> None:
        indices = self._chunk(self._next)
        if self.prepare is None:
            embedded = self.embed(indices)
        else:
            prepared = self._prepared.result() if self._prepared is not None else self.prepare(indices)
            self._prepared = None
            following = self._chunk(indices[-1] + 1)
            if following:  # overlaps with embedding and decoding this chunk
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dam-prepare")
                self._prepared = self._executor.submit(self.prepare, following)
            embedded = self.embed(prepared)
        for index, embeds in zip(indices, embedded, strict=True):
            if embeds.shape[0] != self.lengths[index]:
                raise ValueError(
                    f"prompt {index} was announced with {self.lengths[index]} tokens but embeds to {embeds.shape[0]}"
                )
        self._ready.extend(zip(indices, embedded))
        self._next = indices[-1] + 1

    def take(self, count: int) -> list[tuple[int, torch.Tensor]]:
        """The next `count` prompts (fewer at the end) as (index, (L, D) embeddings)."""
        while len(self._ready) < count and self._next < len(self.lengths):
            self._embed_next_chunk()
        taken, self._ready = self._ready[:count], self._ready[count:]
        return taken


@dataclass
class GenerationStats:
    """What the last `generate` did; times are host wall-clock (the step loop syncs every step)."""

    prompts: int = 0
    decode_steps: int = 0
    live_row_steps: int = 0
    """Sum over steps of the live rows (a step's useful tokens)."""
    computed_row_steps: int = 0
    """Sum over steps of the rows computed (live + finished rows not yet compacted/refilled)."""
    kv_tokens_read: int = 0
    """Sum over steps and live rows of the tokens attended (the KV-cache reads a step needs)."""
    prefill_calls: int = 0
    refills: int = 0
    compactions: int = 0
    growths: int = 0
    """Times the buffers grew during the call (more rows, or more columns) and were copied."""
    prefill_seconds: float = 0.0
    """Prefill forwards, first-token choice and KV copies (the prompt embedding excluded)."""
    decode_seconds: float = 0.0
    embed_seconds: float = 0.0
    """Time the loop spent getting prompt embeddings (for DAM: the vision tower and projector,
    plus any preprocessing the background thread had not finished)."""
    step_shapes: set[tuple[int, int]] = field(default_factory=set)

    @property
    def mean_live_batch(self) -> float:
        return self.live_row_steps / self.decode_steps if self.decode_steps else 0.0

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_seconds / self.decode_steps if self.decode_steps else 0.0

    @property
    def mean_kv_tokens_per_step(self) -> float:
        return self.kv_tokens_read / self.decode_steps if self.decode_steps else 0.0


@dataclass
class _Row:
    index: int
    length: int
    """Tokens whose keys/values are in the cache (the prompt, then all but the newest token)."""
    tokens: list[int]
    settings: SamplingSettings
    generator: torch.Generator | None = None
    """The row's own generator (settings with a seed), else None."""

    def is_done(self, token: int) -> bool:
        return token in self.settings.eos_token_ids or len(self.tokens) >= self.settings.max_new_tokens


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


def unsupported_reason(language_model: nn.Module) -> str | None:
    """Why `language_model` cannot use fast generation, or None when it can."""
    config = language_model.config
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("sdpa", "eager"):
        return f"attention implementation {implementation!r} (fast generation needs 'sdpa' or 'eager' for its masks)"
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted({kind for kind in layer_types if kind != "full_attention"})
    if other:
        return f"layer types {other} (fast generation handles full-attention layers only)"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention (fast generation handles full-attention layers only)"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder language model"
    return None


class FastGenerator:
    """Generates for many prompts with a slot KV cache, refill and compaction (see module doc).

    Args:
        language_model: a transformers causal LM (the DAM's `language_model`).
        max_slots: sequences decoded together (the decode batch).
        decode_step: "auto" (CUDA graphs on CUDA, eager elsewhere), "eager", "cuda_graph", "compile".
        refill: refill freed slots with waiting prompts (else prompts start only when all rows are done).
        refill_fraction: refill once this fraction of the slots is free.
        compact_fraction: with nothing waiting, compact once at most this fraction of rows is live.
        prefill_tokens: padded prompt tokens per prefill call (bounds its activation memory).
        width_bucket: attention widths are rounded up to a multiple of this (default 64 on CUDA
            or with compile, 8 otherwise: fewer shapes to capture vs less masked work).
        power_of_two_rows: run steps on a power-of-two number of rows (default: with CUDA
            graphs or compile, to bound the shapes captured).

    The KV buffers stay allocated between calls (and with them the captured graphs); `release()`
    frees them. Calls are serialised by a lock.
    """

    def __init__(
        self,
        language_model: nn.Module,
        *,
        max_slots: int = 64,
        decode_step: str = "auto",
        refill: bool = True,
        refill_fraction: float = 0.25,
        compact_fraction: float = 0.5,
        prefill_tokens: int = 16384,
        width_bucket: int | None = None,
        power_of_two_rows: bool | None = None,
    ) -> None:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if not 0 < refill_fraction <= 1 or not 0 <= compact_fraction < 1:
            raise ValueError("refill_fraction must be in (0, 1] and compact_fraction in [0, 1)")
        self.language_model = language_model
        self.max_slots = max_slots
        self.device = next(language_model.parameters()).device
        self.requested_step = decode_step
        self.step_kind = resolve_step_kind(decode_step, self.device)
        self.refill = refill
        self.refill_fraction = refill_fraction
        self.compact_fraction = compact_fraction
        self.prefill_tokens = prefill_tokens
        captured = self.step_kind != "eager"
        # CUDA attention kernels want mask rows aligned to 16 elements anyway.
        self.width_bucket = width_bucket or (64 if captured or self.device.type == "cuda" else 8)
        self.power_of_two_rows = captured if power_of_two_rows is None else power_of_two_rows
        self._cache: SlotKVCache | None = None
        self._step: DecodeStep | None = None
        self._lock = threading.Lock()
        self.stats = GenerationStats()
        if self.step_kind == "compile":
            # Step shapes change with the (rows, width) bucket; past dynamo's default limit of 8
            # recompilations it would silently run the step uncompiled.
            # torch < 2.7 calls the same limit cache_size_limit.
            dynamo = torch._dynamo.config
            name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
            setattr(dynamo, name, max(getattr(dynamo, name), 256))

    def release(self) -> None:
        """Free the KV buffers and captured graphs (the next call allocates again)."""
        with self._lock:
            self._cache, self._step = None, None

    # ---- buffers ------------------------------------------------------------------------

    def _buffers(self, like: DynamicCache, slots: int, capacity: int) -> tuple[SlotKVCache, DecodeStep]:
        if self._step is not None and self._step.kind == "eager":
            self.step_kind = "eager"  # a step that fell back once is not retried (nor warned about) again
        if self._cache is None or not self._cache.fits(like, slots, capacity):
            if self._cache is not None:
                slots, capacity = max(slots, self._cache.slots), max(capacity, self._cache.capacity)
            self._cache, self._step = None, None  # free the old buffers before allocating
            self._cache = SlotKVCache(like, slots, capacity)
            self._step = DecodeStep(self.language_model, self._cache, self.step_kind)
            logger.debug("allocated a slot KV cache of %d slots x %d columns", slots, capacity)
        assert self._step is not None
        return self._cache, self._step

    # ---- prefill ------------------------------------------------------------------------

    def _prefill(self, prompts: Sequence[tuple[int, torch.Tensor]]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Left-padded prompts through the model, as `generate`'s first step: (k, V) logits of
        the next token, the prefill's cache and the (k,) prompt lengths."""
        lengths = torch.tensor([embeds.shape[0] for _, embeds in prompts], device=self.device)
        padded = int(lengths.max())
        first = prompts[0][1]
        inputs_embeds = first.new_zeros((len(prompts), padded, first.shape[-1]))  # (k, Lp, D)
        attention_mask = torch.zeros((len(prompts), padded), dtype=torch.long, device=self.device)  # (k, Lp)
        for row, (_, embeds) in enumerate(prompts):
            inputs_embeds[row, padded - embeds.shape[0] :] = embeds
            attention_mask[row, padded - embeds.shape[0] :] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)  # as generate
        cache = DynamicCache(config=self.language_model.config)
        output = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1], cache, lengths  # (k, V)

    def _prefill_groups(self, prompts: list[tuple[int, torch.Tensor]]) -> list[list[tuple[int, torch.Tensor]]]:
        """Consecutive groups of at most `prefill_tokens` padded tokens (at least one prompt each)."""
        groups: list[list[tuple[int, torch.Tensor]]] = []
        for prompt in prompts:
            if groups:
                group = groups[-1]
                longest = max(prompt[1].shape[0], *(embeds.shape[0] for _, embeds in group))
                if longest * (len(group) + 1) <= self.prefill_tokens:
                    group.append(prompt)
                    continue
            groups.append([prompt])
        return groups

    def _grow(self, keep_rows: int, slots: int, capacity: int) -> tuple[SlotKVCache, DecodeStep]:
        """Larger buffers holding the first `keep_rows` rows of the current ones (their keys,
        values, positions and next input ids), for a run whose rows or prompts outgrew them."""
        old, old_step = self._cache, self._step
        assert old is not None and old_step is not None
        if old_step.kind == "eager":
            self.step_kind = "eager"  # as in _buffers: a step that fell back is not retried
        slots, capacity = max(slots, old.slots), max(capacity, old.capacity)
        self._cache, self._step = None, None
        cache = SlotKVCache(old, slots, capacity)
        for mine, theirs in zip(cache.layers, old.layers):
            mine.keys[:keep_rows, :, : old.capacity] = theirs.keys[:keep_rows]
            mine.values[:keep_rows, :, : old.capacity] = theirs.values[:keep_rows]
        cache.positions[:keep_rows] = old.positions[:keep_rows]
        step = DecodeStep(self.language_model, cache, self.step_kind)  # new addresses: graphs are recaptured
        step.input_ids[:keep_rows] = old_step.input_ids[:keep_rows]
        self._cache, self._step = cache, step
        logger.debug("grew the slot KV cache to %d slots x %d columns", slots, capacity)
        return cache, step

    # ---- the loop -----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        queue: PromptSource,
        settings: SamplingSettings | Callable[[int], SamplingSettings],
        *,
        generator: torch.Generator | None = None,
        on_finish: Callable[[int, list[int]], None] | None = None,
        on_tokens: Callable[[list[tuple[int, int]]], Iterable[int] | None] | None = None,
        max_slots: int | None = None,
    ) -> list[list[int]]:
        """New tokens of every prompt taken from `queue`, in index order (EOS included when produced).

        `settings` applies to every prompt, or is a function of a prompt's index giving that
        prompt's own settings (read once, when the prompt is taken). Sampling draws from
        `generator` (None: torch's global generator, so `torch.manual_seed` makes it
        reproducible); such draws depend on which prompts share a step, so a seed reproduces a
        result for the same prompts, order and max_slots. A prompt whose settings have a `seed`
        draws from a generator of its own instead and gets the same tokens however it is batched.

        `on_tokens(produced)` is called after each prefill and decode step with (index, token)
        for every row that got a token (its last one included) and may return indices of live
        rows to end at once, as if they had reached EOS. `on_finish(index, tokens)` is called as
        each sequence ends, for whatever reason. `max_slots` overrides the constructor's for
        this call.
        """
        if max_slots is not None and max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        with self._lock:
            run = _Run(self, queue, settings, generator, on_finish, on_tokens, max_slots or self.max_slots)
            return run.loop()

    def _row_count(self, wanted: int, max_slots: int) -> int:
        """Rows a step runs on to serve `wanted` sequences (a power of two under graphs)."""
        wanted = min(max_slots, wanted)
        return min(max_slots, _next_power_of_two(wanted)) if self.power_of_two_rows else wanted


class _Run:
    """The state of one `FastGenerator.generate` call: which prompt each row of the cache holds,
    the buffers of the step and the per-row settings; `loop` runs it (see the module doc)."""

    def __init__(
        self,
        owner: FastGenerator,
        queue: PromptSource,
        settings: SamplingSettings | Callable[[int], SamplingSettings],
        generator: torch.Generator | None,
        on_finish: Callable[[int, list[int]], None] | None,
        on_tokens: Callable[[list[tuple[int, int]]], Iterable[int] | None] | None,
        max_slots: int,
    ) -> None:
        self.owner, self.queue, self.device = owner, queue, owner.device
        self.generator, self.on_finish, self.on_tokens = generator, on_finish, on_tokens
        self.max_slots = max_slots
        shared = settings if isinstance(settings, SamplingSettings) else None
        self.settings_of: Callable[[int], SamplingSettings] = (
            settings if shared is None else lambda _index: shared  # type: ignore[assignment]
        )
        # One set of settings without a seed: the vectorised `choose_tokens` (with its shared
        # generator); otherwise a RowChooser built for the rows of each step.
        self.uniform = shared if shared is not None and shared.seed is None else None
        self.eos_ids: torch.Tensor | None = None
        if self.uniform is not None and self.uniform.eos_token_ids:
            self.eos_ids = torch.tensor(self.uniform.eos_token_ids, device=self.device)
        self.stats = owner.stats = GenerationStats()
        self.results: dict[int, list[int]] = {}
        # Columns every prompt of a closed queue needs, known up front so that the buffers
        # are allocated once; otherwise they grow with the prompts taken.
        longest = getattr(queue, "max_length", None) if shared is not None else None
        self.capacity = longest + shared.max_new_tokens if longest is not None and shared is not None else 1
        self.rows = owner._row_count(max(1, len(queue)), max_slots)
        self.table: list[_Row | None] = [None] * self.rows
        self.cache: SlotKVCache | None = None
        self.step: DecodeStep | None = None
        self.generated: torch.Tensor | None = None  # (S,) tokens generated so far, per row
        self.live: torch.Tensor | None = None  # (S,) 1 for rows still generating
        self.chooser: RowChooser | None = None  # per-row choice for the current rows; None: rebuild

    # ---- the loop -----------------------------------------------------------------------

    def loop(self) -> list[list[int]]:
        owner, stats = self.owner, self.stats
        while True:
            free = [r for r in range(self.rows) if self.table[r] is None]
            live_count = self.rows - len(free)
            waiting = len(self.queue)
            if waiting > len(free) and self.cache is not None and owner.refill and self._expand(live_count + waiting):
                continue
            if waiting and free:
                wanted = max(1, math.ceil(owner.refill_fraction * self.rows))
                if live_count == 0 or (owner.refill and len(free) >= min(wanted, waiting)):
                    if self._fill(free):
                        stats.refills += live_count > 0
                        continue
            if live_count == 0:
                break
            if not waiting and self.rows > 1 and live_count <= owner.compact_fraction * self.rows:
                if self._compact(live_count):
                    continue
            self._decode(live_count)
        return [self.results[index] for index in sorted(self.results)]

    def _take(self, count: int) -> list[tuple[int, torch.Tensor]]:
        started = time.perf_counter()
        taken = self.queue.take(count)
        self.stats.embed_seconds += time.perf_counter() - started
        self.stats.prompts += len(taken)
        return taken

    def _fill(self, free: list[int]) -> int:
        """Prefill waiting prompts into the `free` rows (ascending); returns how many were taken."""
        owner, stats = self.owner, self.stats
        prompts = self._take(len(free))
        started = time.perf_counter()
        for group in owner._prefill_groups(prompts):
            logits, prefill_cache, lengths = owner._prefill(group)
            rows = []
            for index, embeds in group:
                settings = self.settings_of(index)
                own = row_generator(settings.seed, self.device) if settings.do_sample else None
                rows.append(_Row(index, embeds.shape[0], [], settings, own))
            need = max(row.length + min(row.settings.max_new_tokens, UPFRONT_COLUMNS) for row in rows)
            capacity = _round_up(max(need, self.capacity), owner.width_bucket)
            cache, step, generated, live = self._buffers(prefill_cache, capacity)
            none_yet = generated.new_zeros(len(group))
            if self.uniform is not None:
                first = choose_tokens(logits, none_yet, self.uniform, self.eos_ids, self.generator)
            else:
                chooser = RowChooser([row.settings for row in rows], [row.generator for row in rows], self.device)
                first = chooser(logits, none_yet, self.generator)
            targets = [free.pop(0) for _ in group]
            slots = torch.tensor(targets, device=self.device)
            cache.load_rows(prefill_cache, slots, lengths)
            step.input_ids.index_copy_(0, slots, first[:, None])
            generated.index_fill_(0, slots, 1)
            live.index_fill_(0, slots, 1)
            stats.prefill_calls += 1
            for target, row in zip(targets, rows):
                self.table[target] = row
            self.chooser = None
            free.extend(self._advance(list(zip(targets, first.tolist()))))
            free.sort()
        stats.prefill_seconds += time.perf_counter() - started
        return len(prompts)

    def _buffers(
        self, like: DynamicCache | None, capacity: int
    ) -> tuple[SlotKVCache, DecodeStep, torch.Tensor, torch.Tensor]:
        """The cache, step and row buffers, allocated (first prefill, shaped like its cache
        `like`) or grown to at least `capacity` columns."""
        owner = self.owner
        if self.cache is None:
            assert like is not None
            self.cache, self.step = owner._buffers(like, self.rows, capacity)
            self.cache.positions.zero_()  # rows no prompt fills then attend to column 0 only
            self.step.input_ids.zero_()
            self.generated = torch.zeros(self.cache.slots, dtype=torch.long, device=self.device)
            self.live = torch.zeros(self.cache.slots, dtype=torch.long, device=self.device)
        elif capacity > self.cache.capacity:
            # Grow by a quarter at least, so that a run of ever longer requests copies rarely.
            capacity = _round_up(max(capacity, self.cache.capacity * 5 // 4), owner.width_bucket)
            self.cache, self.step = owner._grow(self.rows, self.cache.slots, capacity)
            self.stats.growths += 1
        self.capacity = max(self.capacity, capacity)
        assert self.step is not None and self.generated is not None and self.live is not None
        return self.cache, self.step, self.generated, self.live

    def _expand(self, wanted: int) -> bool:
        """Run steps on more rows (prompts wait and every row is taken); False if it cannot."""
        rows = self.owner._row_count(wanted, self.max_slots)
        if rows <= self.rows:
            return False
        assert self.cache is not None and self.step is not None and self.generated is not None and self.live is not None
        if rows > self.cache.slots:
            # Doubling bounds the copies of a server whose load rises request by request.
            slots = min(max(rows, 2 * self.cache.slots), max(self.max_slots, self.cache.slots))
            self.cache, self.step = self.owner._grow(self.rows, slots, self.cache.capacity)
            self.stats.growths += 1
            for name in ("generated", "live"):
                old = getattr(self, name)
                grown = torch.zeros(self.cache.slots, dtype=old.dtype, device=old.device)
                grown[: self.rows] = old[: self.rows]
                setattr(self, name, grown)
        new = slice(self.rows, rows)  # rows left by earlier prompts or a compaction: reset
        self.cache.positions[new] = 0
        self.step.input_ids[new] = 0
        self.generated[new] = 0
        self.live[new] = 0
        self.table.extend([None] * (rows - self.rows))
        self.rows = rows
        self.chooser = None
        return True

    def _compact(self, live_count: int) -> bool:
        """Move the live rows to the front and step on fewer rows; False if no fewer would do."""
        owner = self.owner
        target_rows = _next_power_of_two(live_count) if owner.power_of_two_rows else live_count
        if target_rows >= self.rows:
            return False
        cache, step, generated, live = self.cache, self.step, self.generated, self.live
        assert cache is not None and step is not None and generated is not None and live is not None
        order = [r for r in range(self.rows) if self.table[r] is not None]
        index = torch.tensor(order, device=self.device)
        width = _round_up(max(row.length for row in self.table if row is not None) + 1, owner.width_bucket)
        cache.move_rows(index, min(width, cache.capacity))
        for buffer in (step.input_ids, generated, live):
            buffer[: len(order)] = buffer[index]
            buffer[len(order) : self.rows] = 0  # stale copies must not advance
        self.table = [self.table[r] for r in order] + [None] * (target_rows - len(order))
        self.rows = target_rows
        self.chooser = None
        self.stats.compactions += 1
        return True

    def _choose(self, logits: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        if self.uniform is not None:
            return choose_tokens(logits, generated, self.uniform, self.eos_ids, self.generator)
        if self.chooser is None:
            rows = self.table[: self.rows]
            self.chooser = RowChooser(
                [row.settings if row is not None else None for row in rows],
                [row.generator if row is not None else None for row in rows],
                self.device,
            )
        return self.chooser(logits, generated, self.generator)

    def _decode(self, live_count: int) -> None:
        """One decode step for every row; live rows get their next token."""
        stats, rows = self.stats, self.rows
        longest = max(row.length for row in self.table if row is not None)
        # Each live row writes its new key/value at column `length`.
        cache, step, generated, live = self._buffers(None, longest + 1)
        width = min(_round_up(longest + 1, self.owner.width_bucket), cache.capacity)
        started = time.perf_counter()
        logits = step(rows, width)  # (R, V)
        tokens = self._choose(logits, generated[:rows])
        step.input_ids[:rows, 0] = tokens
        cache.positions[:rows] += live[:rows]
        generated[:rows] += live[:rows]
        host_tokens = tokens.tolist()  # the step's one host sync
        stats.decode_seconds += time.perf_counter() - started
        stats.decode_steps += 1
        stats.computed_row_steps += rows
        stats.live_row_steps += live_count
        stats.step_shapes.add((rows, width))
        produced = []
        for r, row in enumerate(self.table):
            if row is None:
                continue
            stats.kv_tokens_read += row.length + 1
            row.length += 1
            produced.append((r, host_tokens[r]))
        self._advance(produced)

    def _advance(self, produced: list[tuple[int, int]]) -> list[int]:
        """Append each (row, token), end the rows that are done or that `on_tokens` ends;
        returns the rows freed."""
        table = self.table
        ended = []
        for r, token in produced:
            row = table[r]
            assert row is not None
            row.tokens.append(token)
            if row.is_done(token):
                ended.append(r)
        if self.on_tokens is not None:
            stop = self.on_tokens([(table[r].index, token) for r, token in produced])  # type: ignore[union-attr]
            if stop:
                stop = set(stop)
                ended = sorted(set(ended) | {r for r, row in enumerate(table) if row is not None and row.index in stop})
        for r in ended:
            row = table[r]
            assert row is not None
            self.results[row.index] = row.tokens
            table[r] = None
            if self.on_finish is not None:
                self.on_finish(row.index, row.tokens)
        if ended:
            assert self.live is not None
            self.live.index_fill_(0, torch.tensor(ended, device=self.device), 0)
            self.chooser = None
        return ended
