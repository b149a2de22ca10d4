"""SlotKVCache: a pre-allocated KV cache whose rows are slots, each with its own length.

Every layer holds keys and values of shape (slots, kv_heads, capacity, head_dim), allocated once
and then only written in place, so their addresses never change (what CUDA graphs and
torch.compile need). Unlike transformers' StaticCache, whose rows share one write position,
each row here holds one sequence from column 0 and a decode step writes each row's new key and
value at that row's own position (`positions`, a device tensor). That is what lets a finished
row be refilled with a new prompt of any length while the others keep decoding, and it keeps
position ids equal to those of the plain path (the first real token is position 0).

A decode step attends over the first `width` columns only (columns past a row's length are
masked by the caller), so attention costs what the longest live sequence needs, rounded up to
a bucket, not the full capacity.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _SlotLayer(CacheLayerMixin):
    """One layer's buffers; writes through the owning cache's per-row positions."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "SlotKVCache", keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.owner = owner
        self.keys = keys  # (S, H, C, Dk)
        self.values = values  # (S, H, C, Dv)
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise RuntimeError("SlotKVCache layers are allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write (R, H, 1, D) states at each row's position; return the (R, H, width, D) views."""
        rows, width = self.owner.rows, self.owner.width
        if key_states.shape[0] != rows or key_states.shape[2] != 1:
            raise RuntimeError(
                f"SlotKVCache takes one new token for each of its {rows} rows, got states of shape "
                f"{tuple(key_states.shape)} (prefill goes through a DynamicCache, then `load_rows`)"
            )
        index = self.owner.positions[:rows].view(rows, 1, 1, 1)  # (R, 1, 1, 1)
        keys, values = self.keys[:rows], self.values[:rows]
        keys.scatter_(2, index.expand_as(key_states), key_states.to(keys.dtype))
        values.scatter_(2, index.expand_as(value_states), value_states.to(values.dtype))
        return keys[:, :, :width], values[:, :, :width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.width, 0

    def get_seq_length(self) -> int:
        return self.owner.width

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class SlotKVCache(Cache):
    """Per-slot KV buffers of `num_layers` layers, shaped after a prefill's DynamicCache."""

    def __init__(self, like: Cache, slots: int, capacity: int) -> None:
        layers = []
        for source in like.layers:
            keys, values = source.keys, source.values  # (B, H, L, D) of a prefill
            layers.append(
                _SlotLayer(
                    self,
                    keys.new_zeros((slots, keys.shape[1], capacity, keys.shape[3])),
                    values.new_zeros((slots, values.shape[1], capacity, values.shape[3])),
                )
            )
        super().__init__(layers=layers)
        self.slots, self.capacity = slots, capacity
        self.positions = torch.zeros(slots, dtype=torch.long, device=layers[0].device)
        """(S,) where each row writes its next key/value: the row's current length."""
        self.rows, self.width = slots, capacity
        """Rows taking part in the next decode step, and the columns it attends over."""

    def fits(self, like: Cache, slots: int, capacity: int) -> bool:
        """Whether these buffers can serve a generation shaped like `like` with these sizes."""
        if slots > self.slots or capacity > self.capacity or len(like.layers) != len(self.layers):
            return False
        for mine, theirs in zip(self.layers, like.layers):
            if mine.keys.shape[1::2] != theirs.keys.shape[1::2] or mine.keys.dtype != theirs.keys.dtype:
                return False
            if mine.values.shape[1::2] != theirs.values.shape[1::2] or mine.keys.device != theirs.keys.device:
                return False
        return True

    def begin_step(self, rows: int, width: int) -> None:
        """Size the next decode step: the first `rows` rows, attending over `width` columns."""
        if rows > self.slots or width > self.capacity:
            raise ValueError(
                f"step of {rows} rows x {width} columns exceeds the cache ({self.slots} x {self.capacity})"
            )
        self.rows, self.width = rows, width

    @torch.no_grad()
    def load_rows(self, prefill: Cache, slots: torch.Tensor, lengths: torch.Tensor) -> None:
        """Copy a left-padded prefill's keys/values into `slots`, each row from column 0.

        `prefill` holds (k, H, Lp, D) per layer for k prompts left-padded to Lp; `lengths` (k,)
        are their real lengths. Columns past a row's length get copies of its last real column
        rather than padding states (they are masked anyway, and so cannot hold NaNs).
        """
        first = prefill.layers[0].keys
        count, padded = first.shape[0], first.shape[2]
        columns = torch.arange(padded, device=first.device)
        source = (columns[None, :] + (padded - lengths.to(first.device))[:, None]).clamp_(max=padded - 1)  # (k, Lp)
        slots = slots.to(self.positions.device)
        for mine, theirs in zip(self.layers, prefill.layers):
            for target, states in ((mine.keys, theirs.keys), (mine.values, theirs.values)):
                index = source.view(count, 1, padded, 1).expand(-1, states.shape[1], -1, states.shape[3])
                aligned = states.gather(2, index)  # (k, H, Lp, D), row i's tokens from column 0
                target[:, :, :padded].index_copy_(0, slots, aligned.to(target.dtype))
        self.positions.index_copy_(0, slots, lengths.to(self.positions))

    @torch.no_grad()
    def move_rows(self, order: torch.Tensor, columns: int) -> None:
        """Rows `order` become rows 0..len(order)-1 (the first `columns` columns are moved)."""
        count = order.shape[0]
        order = order.to(self.positions.device)
        for layer in self.layers:
            for buffer in (layer.keys, layer.values):
                buffer[:count, :, :columns] = buffer[order, :, :columns]  # the gather copies first
        self.positions[:count] = self.positions[order]
