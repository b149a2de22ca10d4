"""Stage 1 of DLC-SDP: caption every region of a segmentation dataset with a labeler (a VLM).

    dam-data stage1 --config configs/data/stage1_coco.yaml output.dir=data/coco_s1 [--shard I --num-shards N]
    run_stage1(load_stage1_config("configs/data/stage1_coco.yaml", ["output.dir=data/coco_s1"]))

For each work unit of the source: the source's regions go through the filters
(:mod:`data_pipeline.filters`), the image is decoded once, the labeler is asked for a caption of
each surviving region (in batches of ``batch_size``), and each caption becomes a
``dam.schema.image_row``. A region the labeler gives no caption for (refusal, error, empty) is
not written; it is counted under filter "labeler" by its reason's key (the text before the first
":", so "error: HTTP 500" counts as "error"). A transient failure (a server that errored or timed
out on every retry) also keeps the region's shard from being written, so rerunning the command
asks again (:func:`read_answer`, :func:`data_pipeline.sharding.run_sharded`). Each region's seed is
``region_seed(config.seed, region.id)``, so a rerun asks the labeler the very same questions.

Images are stored as configured by ``output.image_storage``:

- ``path`` (default): the image's path relative to ``output.image_root`` (default
  ``source.images``). When training, set the dataset's ``root`` in dam-train's config
  (``data.datasets[i].root``) to that folder; run.json and the merged manifest.json record it
  as ``image_root``.
- ``bytes``: the image file's bytes in every row (self-contained, no ``root`` needed, but one
  copy of the image per region).

The sharding, resuming and refusal of mixed folders are :func:`data_pipeline.sharding.run_sharded`'s;
this module only supplies the per-unit function (:class:`Stage1Processor`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dam.configio import ConfigError, to_dict
from dam.schema import image_row
from data_pipeline.config import Stage1Config
from data_pipeline.filters import load_filtered_unit
from data_pipeline.labelers import Labeler, LabelRequest, LabelResult, OwnsLabeler, build_labeler, labeler_config
from data_pipeline.seeds import region_seed
from data_pipeline.sharding import RunSummary, UnitResult, Worker, run_sharded
from data_pipeline.sources import Source, SkipLog, UnitSkipped, build_source

logger = logging.getLogger(__name__)

IMAGE_FILTER = "image"
LABELER_FILTER = "labeler"
# Labeler keys that say how to reach or run the labeler, not what it answers: a moved vLLM
# server, another concurrency or retry policy must not block resuming, and no credential may be
# written into run.json.
_OPERATIONAL_LABELER_KEYS = frozenset({
    "api_key", "api_key_env", "base_url", "concurrency", "timeout_s", "max_attempts", "backoff_s", "max_backoff_s",
    "probe_timeout_s", "trust_env", "device", "batch_size",
})


def make_labeler(section: dict[str, Any]) -> Labeler:
    """The labeler of a config's ``labeler:`` section (``data_pipeline.labelers.build_labeler``)."""
    return build_labeler(dict(section))


def _reason_key(reason: str | None) -> str:
    key = (reason or "").split(":", 1)[0].strip()
    return key or "unknown"


def read_answer(answer: LabelResult, what: str, result: UnitResult, log: SkipLog) -> tuple[str | None, str | None]:
    """``(caption, None)`` from a labeler's answer, or ``(None, reason key)`` with the reason logged.

    A transient failure is counted in ``result.transient_failures``: its shard is then left
    unwritten, so a rerun asks for the region again instead of losing it. ``what`` names the
    region in the log ("region 'coco/1/10'").
    """
    caption = answer.caption.strip() if isinstance(answer.caption, str) else ""
    if caption:
        return caption, None
    reason = _reason_key(answer.reason) if answer.caption is None else "empty"
    if answer.transient:
        result.transient_failures += 1
    log.warn(f"labeler:{reason}", f"no caption for {what}: {answer.reason or reason}")
    return None, reason


def _data_defining(value: Any) -> Any:
    """The labeler section without its operational keys (see _OPERATIONAL_LABELER_KEYS), recursively."""
    if isinstance(value, dict):
        return {k: _data_defining(v) for k, v in value.items() if k not in _OPERATIONAL_LABELER_KEYS}
    return value


def image_root_of(config: Stage1Config) -> Path | None:
    """The folder path-mode rows are relative to (None in bytes mode)."""
    if config.output.image_storage == "bytes":
        return None
    return Path(os.path.abspath(config.output.image_root or config.source.images))


def stored_image(path: Path, image_root: Path | None) -> str | bytes:
    """What a row stores of the file at ``path``: its path relative to ``image_root``, or (root None) its bytes."""
    if image_root is None:
        return path.read_bytes()
    absolute = Path(os.path.abspath(path))  # abspath, not resolve: symlinked trees stay under their root
    try:
        return absolute.relative_to(image_root).as_posix()
    except ValueError:
        raise ConfigError(
            f"output.image_root: image {str(absolute)!r} is not under {str(image_root)!r}; set output.image_root to a folder "
            f"holding every file (or output.image_storage=bytes)"
        ) from None


def stage1_manifest(config: Stage1Config, source: Source) -> dict[str, Any]:
    """What defines a stage-1 output (recorded in run.json; a rerun must match it)."""
    root = image_root_of(config)
    return {
        "stage": "stage1", "source": source.name, "kind": source.kind,
        "image_storage": config.output.image_storage, "image_root": None if root is None else str(root),
        "config": {
            "source": to_dict(config.source.resolved()), "filters": to_dict(config.filters),
            "labeler": _data_defining(config.labeler), "seed": config.seed,
        },
    }


class Stage1Processor(OwnsLabeler):
    """One work unit -> its captioned rows and tally; plugged into ``run_sharded``.

    The labeler is built on first use (``labeler_factory``), so a rerun with every shard complete,
    or a folder that refuses the config, never loads a model.
    """

    def __init__(self, source: Source, config: Stage1Config, labeler_factory: Callable[[], Labeler]) -> None:
        self.source, self.config = source, config
        self.image_root = image_root_of(config)
        self._labeler_factory = labeler_factory
        self.log = SkipLog()

    def __call__(self, key: str) -> UnitResult:
        result = UnitResult()
        tally = result.tally
        loaded = load_filtered_unit(self.source, key, self.config.filters, self.config.seed, result, self.log)
        if loaded is None:
            return result
        unit, regions = loaded
        try:
            image = unit.load_image()
            stored = stored_image(unit.path, self.image_root)
        except (UnitSkipped, OSError) as exc:
            reason = exc.reason if isinstance(exc, UnitSkipped) else "unreadable_image"
            tally.skip_unit(reason)
            tally.reject(IMAGE_FILTER, reason, len(regions))
            self.log.warn(reason, str(exc))
            return result
        tally.keep(IMAGE_FILTER, len(regions))
        size = self.config.batch_size
        for start in range(0, len(regions), size):
            batch = regions[start:start + size]
            requests = [
                LabelRequest(region_id=r.id, image=image, mask=r.decode_mask(), category=r.category, seed=region_seed(self.config.seed, r.id))
                for r in batch
            ]
            answers = self.labeler.label(requests)
            if len(answers) != len(requests):
                raise RuntimeError(f"the labeler returned {len(answers)} results for {len(requests)} requests; it must return one per request")
            for region, answer in zip(batch, answers):
                caption, reason = read_answer(answer, f"region {region.id!r}", result, self.log)
                if caption is None:
                    tally.reject(LABELER_FILTER, reason)
                    continue
                tally.keep(LABELER_FILTER)
                result.rows.append(image_row(region.id, stored, region.mask, caption, unit.source, region.category))
        return result


def run_stage1(
    config: Stage1Config, *, worker: Worker | None = None, labeler: Labeler | None = None, progress: bool = True,
) -> RunSummary:
    """Run (or resume) this worker's share of stage 1; ``labeler`` overrides the config's ``labeler:`` section.

    A labeler built from the config is checked before any shard starts, built on first use and
    closed at the end (when it has ``close()``, as the HTTP labeler does).
    """
    config.validate()
    if labeler is None:
        labeler_config(config.labeler)  # bad labeler keys stop the run before any work
    source = build_source(config.source)
    if source.kind != "image":
        raise ConfigError(f"source.type {config.source.type!r} gives videos; stage1 captions image regions")
    factory = (lambda: labeler) if labeler is not None else (lambda: make_labeler(config.labeler))
    processor = Stage1Processor(source, config, factory)
    try:
        return run_sharded(
            source.units(), processor, config.output.dir, stage1_manifest(config, source),
            shard_size=config.output.shard_size, worker=worker, progress=progress, desc=f"stage1 {source.name}",
        )
    finally:
        if labeler is None:
            processor.close()
