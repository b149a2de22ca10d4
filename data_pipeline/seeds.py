"""Per-region seeds: everything random about a region depends on (run seed, region id) only.

A labeler's prompt variant, a sampled subset of regions, ... must come out the same on a rerun,
on another worker and in another shard layout, so they are seeded from a hash of the run seed and
the region's stable id, never from a running random state.
"""

from __future__ import annotations

import hashlib


def region_seed(seed: int, region_id: str) -> int:
    """A 63-bit seed from (run seed, region id), stable across runs, processes and machines."""
    digest = hashlib.sha256(f"{int(seed)}\x00{region_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1
