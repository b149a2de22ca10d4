"""The sharded, resumable driver every pipeline stage runs on: units -> shards -> workers.

    summary = run_sharded(source.units(), process, "out/coco_s1", manifest, shard_size=100,
                          worker=resolve_worker(args.shard, args.num_shards))

Work units (a list of keys, in the source's deterministic order) are cut into fixed-size shards
by index: shard k holds units [k*S, (k+1)*S). Worker i of n processes the shards k with
k % n == i; its identity comes from ``--shard i --num-shards n``, else RANK/WORLD_SIZE
(torchrun, accelerate), else SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT, else
SLURM_PROCID/SLURM_NTASKS, else 0/1. ``process(unit)`` maps one unit to its rows and tally
(:class:`UnitResult`); the driver knows nothing of sources or labelers, so stage 2 and the
video stage plug their own ``process`` in.

Output folder (workers may share it, or each write their own and ``dam-data merge`` joins them):

    run.json                       what defines the data (stage config, sharding, a hash of the unit list)
    shard-00000.parquet            rows of shard 0 (dam.schema.write_shard: atomic)
    shard-00000.report.json        its tally; written last, so it marks the shard complete

A rerun skips complete shards and redoes the others from scratch (first removing the temp
files a killed writer left), so a run killed anywhere and rerun ends with exactly the rows of an
uninterrupted run (a deterministic ``process`` gives identical rows), never duplicates or loses
a unit. A shard in which some region failed transiently (``UnitResult.transient_failures``: a
labeler server that errored or timed out on every attempt) is not written at all, so it stays
incomplete: the run goes on with the other shards, reports the failed ones
(``RunSummary.shards_failed``, ``retry_message``; `dam-data` exits non-zero) and a rerun of the
same command redoes exactly those shards. A folder holds one run: a rerun whose manifest
differs (another config, source files added) is refused, naming the differences.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic
from dam.schema import stale_temp_files, write_shard
from data_pipeline.tally import Tally

logger = logging.getLogger(__name__)

T = TypeVar("T")

RUN_MANIFEST = "run.json"
RUN_FORMAT = "dam-data run"
_MAX_DIFFERENCES = 5  # differing manifest keys named in the refusal


def shard_file(out_dir: str | os.PathLike, shard: int) -> Path:
    """The parquet file of shard ``shard``."""
    return Path(out_dir) / f"shard-{shard:05d}.parquet"


def report_file(out_dir: str | os.PathLike, shard: int) -> Path:
    """The report of shard ``shard``; its presence marks the shard complete."""
    return Path(out_dir) / f"shard-{shard:05d}.report.json"


@dataclass(frozen=True)
class Worker:
    """This process's share of a run: shards k with k % count == index."""

    index: int = 0
    count: int = 1
    origin: str = "default"
    """Where the identity came from ("--shard/--num-shards", "RANK/WORLD_SIZE", ...), for logs."""

    def owns(self, shard: int) -> bool:
        return shard % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def _env_pair(environ: Mapping[str, str], index_key: str, count_key: str, offset_key: str | None = None) -> tuple[int, int] | None:
    if index_key not in environ or count_key not in environ:
        return None
    try:
        index, count = int(environ[index_key]), int(environ[count_key])
        if offset_key and offset_key in environ:  # `--array=1-8` numbers tasks from 1
            index -= int(environ[offset_key])
    except ValueError:
        raise DamInputError(
            f"environment variables {index_key}={environ[index_key]!r} / {count_key}={environ[count_key]!r} are not "
            f"integers; fix them or pass --shard I --num-shards N"
        ) from None
    return index, count


def resolve_worker(shard: int | None = None, num_shards: int | None = None, environ: Mapping[str, str] | None = None) -> Worker:
    """This process's worker identity: explicit arguments, else the launcher's environment, else 0/1."""
    environ = os.environ if environ is None else environ
    if (shard is None) != (num_shards is None):
        raise DamInputError("give --shard I and --num-shards N together (this process is worker I of N), or neither")
    if shard is not None:
        found, origin = (shard, num_shards), "--shard/--num-shards"
    else:
        candidates = [
            ("RANK/WORLD_SIZE", _env_pair(environ, "RANK", "WORLD_SIZE")),
            ("SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT", _env_pair(environ, "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN")),
            ("SLURM_PROCID/SLURM_NTASKS", _env_pair(environ, "SLURM_PROCID", "SLURM_NTASKS")),
        ]
        origin, found = next(((o, f) for o, f in candidates if f is not None), ("default", (0, 1)))
    index, count = found
    if count < 1 or not 0 <= index < count:
        raise DamInputError(f"worker {index} of {count} (from {origin}) is impossible; the index must be in [0, {count})")
    return Worker(int(index), int(count), origin)


@dataclass
class UnitResult:
    """What processing one work unit gave: its rows and what was kept/rejected where."""

    rows: list[dict] = field(default_factory=list)
    tally: Tally = field(default_factory=Tally)
    regions: int = 0
    """Regions looked at (drives the progress bar's regions/s)."""
    transient_failures: int = 0
    """Regions the labeler failed on in a way a later try may not (``LabelResult.transient``): the
    shard holding this unit is not written, so a rerun asks for them again."""


@dataclass
class RunSummary:
    """The outcome of one worker's ``run_sharded`` call (its own shards only)."""

    out_dir: Path
    worker: Worker
    num_units: int
    num_shards: int
    shards_written: list[int]
    shards_skipped: list[int]
    """Shards found complete from an earlier run and left as they were."""
    rows: int
    tally: Tally
    shards_failed: dict[int, int] = field(default_factory=dict)
    """Shards left unwritten because some of their regions failed transiently: shard -> such regions."""

    def retry_message(self) -> str | None:
        """What to tell the user when shards were left for a rerun (None when there are none)."""
        if not self.shards_failed:
            return None
        regions = sum(self.shards_failed.values())
        return (
            f"{len(self.shards_failed)} shard(s) of {self.out_dir} not written: {regions} region(s) got no answer from the "
            f"labeler (errors or timeouts after every retry) in shard(s) {sorted(self.shards_failed)}; rerun the same "
            f"command to retry them (complete shards are skipped)"
        )


class _TransientFailures(Exception):
    """Raised at the end of a shard's rows so that ``write_shard`` discards the shard."""

    def __init__(self, regions: int) -> None:
        super().__init__(f"{regions} region(s) failed transiently")
        self.regions = regions


def units_fingerprint(keys: Sequence[str]) -> str:
    """sha256 of the unit list: a changed source (files added, reordered) changes every shard."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _differences(found: Any, asked: Any, prefix: str = "") -> list[str]:
    if isinstance(found, dict) and isinstance(asked, dict):
        out = []
        for key in list(found) + [k for k in asked if k not in found]:
            out += _differences(found.get(key), asked.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if found == asked else [f"{prefix or 'manifest'}={found!r} (now {asked!r})"]


def claim_folder(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Record ``manifest`` in ``out_dir/run.json``, or check the folder already holds this same run.

    Safe when several workers start at once: the first to create the file wins (a hard link
    cannot overwrite), the others compare against it.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DamInputError(f"output {str(out)!r} is a file; pass a folder")
    path = out / RUN_MANIFEST
    if not path.exists():
        if any(out.glob("*.parquet")):
            raise DamInputError(f"{str(out)!r} holds parquet shards but no {RUN_MANIFEST}, so they are not from this run; write to another (empty) folder")
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_MANIFEST}.{uuid.uuid4().hex}.tmp"
        write_json_atomic(tmp, manifest)
        try:
            os.link(tmp, path)
            return
        except FileExistsError:
            pass  # another worker created it first: compare below
        except OSError:  # a filesystem without hard links
            os.replace(tmp, path)
            return
        finally:
            tmp.unlink(missing_ok=True)
    found = read_json(path, "run manifest")
    differences = _differences(found, manifest)
    if differences:
        shown = "; ".join(differences[:_MAX_DIFFERENCES]) + (f"; and {len(differences) - _MAX_DIFFERENCES} more" if len(differences) > _MAX_DIFFERENCES else "")
        raise DamInputError(
            f"{str(out)!r} holds a run with another config ({shown}); rerun with the config recorded in "
            f"{str(path)!r} to resume it, or write to another folder (output.dir)"
        )


def read_report(out_dir: str | os.PathLike, shard: int) -> dict[str, Any] | None:
    """The report of a complete shard (report present, parquet with its row count), else None."""
    import pyarrow.parquet as pq

    path, parquet = report_file(out_dir, shard), shard_file(out_dir, shard)
    if not path.is_file():
        return None
    try:
        report = read_json(path, "shard report")
        Tally.from_json(report["tally"])
        rows = pq.read_metadata(parquet).num_rows
    except Exception as exc:  # any damage means "not complete": the shard is redone
        logger.warning("shard %d in %s is not usable (%s); it will be redone", shard, out_dir, exc)
        return None
    if report.get("shard") != shard or report.get("rows") != rows:
        logger.warning("shard %d in %s: report and parquet disagree; it will be redone", shard, out_dir)
        return None
    return report


def run_sharded(
    units: Sequence[T],
    process: Callable[[T], UnitResult],
    out_dir: str | os.PathLike,
    manifest: dict[str, Any],
    *,
    shard_size: int,
    worker: Worker | None = None,
    progress: bool = True,
    desc: str = "regions",
    unit_key: Callable[[T], str] = str,
) -> RunSummary:
    """Process this worker's shards of ``units`` into ``out_dir`` (see the module docstring).

    ``manifest``: plain JSON data defining the output (config, source); recorded in run.json
    with the sharding, and compared on reruns. ``dam-data merge`` and ``stats`` read its keys
    ``source`` (the rows' source name, required), ``image_storage`` ("path" / "bytes") and
    ``image_root`` (the folder path-mode rows are relative to), so every stage records them. ``process`` must be deterministic for reruns to
    reproduce rows; it may raise to stop the run (the shard in progress is left incomplete), or
    report transient failures in its results (the shard is not written, the run goes on).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise DamInputError(f"shard_size must be an integer >= 1, got {shard_size!r}")
    worker = worker or Worker()
    out = Path(out_dir)
    num_units = len(units)
    num_shards = -(-num_units // shard_size)
    sharding = {"shard_size": shard_size, "num_units": num_units, "num_shards": num_shards,
                "units_sha256": units_fingerprint([unit_key(u) for u in units])}
    claim_folder(out, {"format": RUN_FORMAT, **manifest, "sharding": sharding})
    mine = [k for k in range(num_shards) if worker.owns(k)]
    summary = RunSummary(out, worker, num_units, num_shards, [], [], 0, Tally())
    todo = []
    for k in mine:
        report = read_report(out, k)
        if report is None:
            todo.append(k)
        else:
            summary.shards_skipped.append(k)
            summary.tally.add(Tally.from_json(report["tally"]))
    logger.info(
        "worker %s (%s): %d of %d shards are mine, %d complete already, %d to do", worker, worker.origin,
        len(mine), num_shards, len(summary.shards_skipped), len(todo),
    )
    todo_units = sum(len(range(k * shard_size, min((k + 1) * shard_size, num_units))) for k in todo)
    with tqdm(disable=not progress, unit="region", desc=desc, dynamic_ncols=True) as bar:
        done = 0
        for k in todo:
            start = time.monotonic()
            tally = Tally()
            for path in (shard_file(out, k), report_file(out, k)):  # a run killed mid-write leaves its temp files
                for stale in stale_temp_files(path):
                    stale.unlink(missing_ok=True)

            def rows(indices: range) -> Any:
                nonlocal done
                failures = 0
                for i in indices:
                    result = process(units[i])
                    tally.add(result.tally)
                    failures += result.transient_failures
                    done += 1
                    bar.update(result.regions)
                    bar.set_postfix_str(f"unit {done}/{todo_units}, shard {k}", refresh=False)
                    yield from result.rows
                if failures:  # every unit was asked (a full count for the log); the rows so far are discarded
                    raise _TransientFailures(failures)

            try:
                count = write_shard(rows(range(k * shard_size, min((k + 1) * shard_size, num_units))), shard_file(out, k))
            except _TransientFailures as failed:
                logger.warning(
                    "shard %d: %d region(s) got no answer from the labeler (errors or timeouts after every retry); the shard "
                    "is not written, so a rerun of the same command retries it", k, failed.regions,
                )
                summary.shards_failed[k] = failed.regions
                continue
            tally.rows = count
            write_json_atomic(report_file(out, k), {
                "shard": k, "units": [k * shard_size, min((k + 1) * shard_size, num_units)], "rows": count,
                "tally": tally.to_json(), "worker": str(worker), "seconds": round(time.monotonic() - start, 3),
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
            summary.shards_written.append(k)
            summary.tally.add(tally)
    summary.rows = summary.tally.rows
    logger.info(
        "worker %s: %d rows in %d shards (%d written now, %d complete before) in %s", worker, summary.rows,
        len(mine), len(summary.shards_written), len(summary.shards_skipped), out,
    )
    if summary.shards_failed:
        logger.warning("worker %s: %s", worker, summary.retry_message())
    return summary
