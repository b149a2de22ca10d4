"""Decode steps: one token for each row of a SlotKVCache, run eagerly, CUDA-graph-replayed or compiled.

A step reads only persistent buffers (the token ids, the cache's positions and key/value
buffers; the attention mask is computed inside the step from the positions) and writes the
cache in place, so it can be captured once per (rows, width) shape and replayed: on a GPU that
removes the per-kernel launch cost that dominates a small-batch decode step of an eagerly run
transformers model. Steps are idempotent (the same inputs rewrite the same key/value at the
same position), which makes the warm-up runs of a capture harmless.

Kinds:
- "eager": the language model's own forward, every step (CPU default; the reference).
- "cuda_graph": that forward captured in one CUDA graph per (rows, width) bucket (CUDA default).
- "compile": `torch.compile` of the step (inductor), plus CUDA graphs on a GPU.
A capture or compile that fails logs one warning and the generator continues eagerly.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from dam.generation.cache import SlotKVCache

logger = logging.getLogger(__name__)

DecodeStepKind = Literal["auto", "eager", "cuda_graph", "compile"]
DECODE_STEP_KINDS: tuple[str, ...] = ("auto", "eager", "cuda_graph", "compile")


def resolve_step_kind(kind: str, device: torch.device) -> str:
    """"auto" -> "cuda_graph" on CUDA, "eager" elsewhere; "cuda_graph" off CUDA -> "eager"."""
    if kind not in DECODE_STEP_KINDS:
        raise ValueError(f"decode_step must be one of {DECODE_STEP_KINDS}, got {kind!r}")
    if kind == "auto":
        return "cuda_graph" if device.type == "cuda" else "eager"
    if kind == "cuda_graph" and device.type != "cuda":
        logger.info("decode_step='cuda_graph' needs a CUDA device (model is on %s): decoding eagerly", device)
        return "eager"
    return kind


class DecodeStep:
    """Runs one decode step of `language_model` over a SlotKVCache; returns (rows, V) logits.

    The step's inputs live in persistent buffers: `input_ids` (S, 1), and the cache's
    `positions` (S,), where each row's new token is written and which it attends up to.
    """

    def __init__(self, language_model: nn.Module, cache: SlotKVCache, kind: str = "eager") -> None:
        self.language_model = language_model
        self.cache = cache
        self.input_ids = torch.zeros((cache.slots, 1), dtype=torch.long, device=cache.positions.device)
        self.columns = torch.arange(cache.capacity, device=cache.positions.device)
        self.mask_dtype = cache.layers[0].keys.dtype
        self.kind = kind
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._forward = self._eager_forward
        if kind == "compile":
            try:
                # Automatic dynamic shapes: the second (rows, width) seen makes them symbolic, so
                # a few compilations serve every bucket instead of one per bucket.
                self._forward = torch.compile(self._eager_forward)
            except Exception as error:  # no dynamo on this platform / Python
                self._fall_back(error)

    def _eager_forward(self, rows: int, width: int) -> torch.Tensor:
        self.cache.begin_step(rows, width)
        positions = self.cache.positions[:rows]  # (R,)
        # Row r attends to its own columns 0..positions[r] (its new token included). Additive,
        # as both sdpa and eager attention take it; the dtype's minimum rather than -inf, as
        # transformers' masks, so that no row can turn into NaNs.
        visible = (self.columns[:width][None, :] <= positions[:, None])[:, None, None, :]  # (R, 1, 1, W)
        mask = torch.zeros(visible.shape, dtype=self.mask_dtype, device=visible.device)
        mask.masked_fill_(~visible, torch.finfo(self.mask_dtype).min)
        output = self.language_model(
            input_ids=self.input_ids[:rows],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.logits[:, -1]  # (R, V)

    def __call__(self, rows: int, width: int) -> torch.Tensor:
        if self.kind == "eager":
            return self._eager_forward(rows, width)
        try:
            if self.cache.positions.device.type == "cuda":
                return self._replay(rows, width)
            return self._forward(rows, width)
        except Exception as error:  # a model or torch version that cannot be captured / compiled
            self._fall_back(error)
            if self.cache.positions.device.type == "cuda":
                torch.cuda.synchronize()
            return self._eager_forward(rows, width)

    def _fall_back(self, error: Exception) -> None:
        message = str(error).splitlines()[0] if str(error) else ""
        logger.warning("decode_step=%r failed (%s: %s); decoding eagerly", self.kind, type(error).__name__, message)
        self.kind, self._graphs, self._forward = "eager", {}, self._eager_forward

    def _replay(self, rows: int, width: int) -> torch.Tensor:
        key = (rows, width)
        if key not in self._graphs:
            self._graphs[key] = self._capture(rows, width)
        graph, logits = self._graphs[key]
        graph.replay()
        return logits

    def _capture(self, rows: int, width: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up on a side stream (lazy initialisation, compilation, cuBLAS workspaces) as
        # CUDA graph capture requires; the runs are idempotent, so the cache is unchanged.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(rows, width)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (a server's) may use CUDA meanwhile.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            logits = self._forward(rows, width)
        logger.debug("captured a decode step of %d rows x %d columns", rows, width)
        return graph, logits
