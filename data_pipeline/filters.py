"""Region filters applied before labeling (cheap, on annotations only), each counted in the tally.

In order: ``min_area``, ``max_area_fraction``, ``min_predicted_iou``, ``min_stability_score``
(regions without that field pass: the filter is about SAM masks), ``max_regions_per_unit``
(keeps the regions with the smallest hash of (seed, region id), so the choice is the same on
every rerun and worker). Filters set to null are off and absent from the report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from data_pipeline.config import FilterConfig
from data_pipeline.seeds import region_seed
from data_pipeline.sources.base import Region, SkipLog, Source, WorkUnit, load_unit
from data_pipeline.tally import Tally

if TYPE_CHECKING:
    from data_pipeline.sharding import UnitResult


def _at_least(field: str, threshold: float) -> Callable[[Region], bool]:
    def keep(region: Region) -> bool:
        value = region.extra.get(field)
        return value is None or float(value) >= threshold

    return keep


def filter_regions(unit: WorkUnit, config: FilterConfig, seed: int, tally: Tally) -> list[Region]:
    """The regions of ``unit`` that pass every filter of ``config``, in their original order."""
    height, width = unit.size
    steps: list[tuple[str, str, Callable[[Region], bool]]] = [("min_area", "too_small", lambda r: r.area >= config.min_area)]
    if config.max_area_fraction is not None:
        limit = config.max_area_fraction * height * width
        steps.append(("max_area_fraction", "too_large", lambda r: r.area <= limit))
    if config.min_predicted_iou is not None:
        steps.append(("min_predicted_iou", "low_predicted_iou", _at_least("predicted_iou", config.min_predicted_iou)))
    if config.min_stability_score is not None:
        steps.append(("min_stability_score", "low_stability_score", _at_least("stability_score", config.min_stability_score)))
    regions = list(unit.regions)
    for name, reason, keep in steps:
        passed = [r for r in regions if keep(r)]
        _count(tally, name, reason, len(passed), len(regions) - len(passed))
        regions = passed
    cap = config.max_regions_per_unit
    if cap is not None:
        # Salted, so the chosen regions' own seeds (prompt variants...) are not biased towards small values.
        chosen = {r.id for r in sorted(regions, key=lambda r: region_seed(seed, f"{r.id}#max_regions_per_unit"))[:cap]}
        passed = [r for r in regions if r.id in chosen]
        _count(tally, "max_regions_per_unit", "over_cap", len(passed), len(regions) - len(passed))
        regions = passed
    return regions


def load_filtered_unit(
    source: Source, key: str, config: FilterConfig, seed: int, result: "UnitResult", log: SkipLog
) -> tuple[WorkUnit, list[Region]] | None:
    """The unit ``key`` and its regions that pass the filters, counted in ``result``; None when
    the unit is unusable or no region is left (then the image is never decoded)."""
    unit = load_unit(source, key, result.tally, log)
    if unit is None:
        return None
    result.regions = len(unit.regions)
    regions = filter_regions(unit, config, seed, result.tally)
    return (unit, regions) if regions else None


def _count(tally: Tally, name: str, reason: str, kept: int, rejected: int) -> None:
    tally.keep(name, kept)  # also when 0, so an active filter always shows in the report
    if rejected:
        tally.reject(name, reason, rejected)
