"""Counts of what a pipeline stage kept and rejected, per filter and reason: the shard reports.

A region passes a funnel of named filters in order ("source", "min_area", ..., "labeler");
each filter counts the regions it kept and, per reason, those it rejected, so that for two
consecutive filters ``kept(prev) == kept(next) + rejected(next)`` and a report says exactly
where the regions went. Work units (images, videos) that could not be read at all are counted
separately under ``units``. Tallies add up (shards -> worker -> merged dataset) and round-trip
through JSON; filter order is kept (first appearance), so reports read as a funnel.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


class Tally:
    """Kept / rejected counts of units and of regions per filter (see the module docstring)."""

    def __init__(self) -> None:
        self.units_seen = 0
        self.units_skipped: Counter[str] = Counter()
        self.filters: dict[str, dict[str, Any]] = {}  # name -> {"kept": int, "rejected": Counter}
        self.rows = 0

    def _filter(self, name: str) -> dict[str, Any]:
        if name not in self.filters:
            self.filters[name] = {"kept": 0, "rejected": Counter()}
        return self.filters[name]

    def keep(self, name: str, count: int = 1) -> None:
        """``count`` regions passed filter ``name``."""
        self._filter(name)["kept"] += count

    def reject(self, name: str, reason: str, count: int = 1) -> None:
        """``count`` regions were dropped by filter ``name`` because of ``reason``."""
        self._filter(name)["rejected"][reason] += count

    def skip_unit(self, reason: str) -> None:
        """A whole work unit (image, video) was unusable (corrupt file, ...)."""
        self.units_skipped[reason] += 1

    def kept(self, name: str) -> int:
        return self.filters[name]["kept"] if name in self.filters else 0

    def rejected(self, name: str) -> int:
        return sum(self.filters[name]["rejected"].values()) if name in self.filters else 0

    def add(self, other: "Tally") -> "Tally":
        """Add ``other``'s counts to this tally (in place); returns self."""
        self.units_seen += other.units_seen
        self.units_skipped.update(other.units_skipped)
        for name, counts in other.filters.items():
            mine = self._filter(name)
            mine["kept"] += counts["kept"]
            mine["rejected"].update(counts["rejected"])
        self.rows += other.rows
        return self

    def to_json(self) -> dict[str, Any]:
        return {
            "units": {"seen": self.units_seen, "skipped": dict(sorted(self.units_skipped.items()))},
            "filters": {
                name: {"kept": c["kept"], "rejected": dict(sorted(c["rejected"].items()))}
                for name, c in self.filters.items()
            },
            "rows": self.rows,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Tally":
        """Inverse of :meth:`to_json`; raises ValueError/KeyError/TypeError on malformed data."""
        tally = cls()
        tally.units_seen = int(data["units"]["seen"])
        tally.units_skipped = Counter({str(k): int(v) for k, v in data["units"]["skipped"].items()})
        for name, counts in data["filters"].items():
            entry = tally._filter(str(name))
            entry["kept"] = int(counts["kept"])
            entry["rejected"] = Counter({str(k): int(v) for k, v in counts["rejected"].items()})
        tally.rows = int(data["rows"])
        return tally

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tally) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"Tally({self.to_json()!r})"
