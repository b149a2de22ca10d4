"""`dam-data merge`: stage outputs (one folder per worker, or one shared folder) -> one dataset folder.

    dam-data merge --inputs data/coco_s1 data/lvis_s1 --out data/sdp_stage1 [--allow-partial]

Inputs are stage output folders (run.json + shard-*.parquet + shard-*.report.json, see
:mod:`data_pipeline.sharding`) or datasets merged before. Folders holding the same run (the same
run.json: e.g. the folders of the workers of one job) are checked together: every shard of the
run must be complete in exactly one of them. An incomplete run is refused, naming the shards,
unless ``allow_partial``; a row id found twice across inputs is refused, naming it.

The output folder, in the ``dam.schema`` layout that ``load_dataset_dir`` and dam-train read:

    shard-00000.parquet, ...   the inputs' non-empty shards (hard-linked when possible, else copied)
    manifest.json              sources, inputs and their configs, shard list, row count, image_root
    report.json                regions kept / rejected per filter, summed ("total" and "by_source")

Path-mode rows are relative to ``image_root`` (manifest.json): set dam-train's dataset ``root``
to it. Inputs with different image roots cannot share a dataset folder and are refused. The
folder is built beside ``out`` and renamed into place at the end, so ``out`` never holds half a
merge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic
from dam.schema import DATASET_MANIFEST, SCHEMA_VERSION
from data_pipeline.sharding import RUN_MANIFEST, read_report, shard_file
from data_pipeline.tally import Tally

logger = logging.getLogger(__name__)

DATASET_REPORT = "report.json"
DATASET_FORMAT = "dam-data dataset"
_NAMED = 10  # incomplete shards named in a refusal


@dataclass
class _Shard:
    path: Path
    rows: int
    source: str
    tally: Tally | None  # None for shards of merged inputs (their report is per dataset)


@dataclass
class _Input:
    path: Path
    record: dict[str, Any]  # what manifest.json says about this input
    shards: list[_Shard]
    image_storage: str
    image_root: str | None
    tally: dict[str, Tally]  # by source


@dataclass
class MergeSummary:
    out: Path
    rows: int
    shards: int
    inputs: int
    partial: bool


def _run_inputs(folders: list[Path], manifests: list[dict]) -> tuple[list[_Input], list[str]]:
    """Inputs of stage folders sharing one run.json, and the names of the run's incomplete shards."""
    num_shards = manifests[0]["sharding"]["num_shards"]
    owner: dict[int, Path] = {}
    inputs, missing = [], []
    for folder, manifest in zip(folders, manifests):
        shards, tally = [], Tally()
        for k in range(num_shards):
            report = read_report(folder, k)
            if report is None:
                continue
            if k in owner:
                raise DamInputError(
                    f"shard {k} of one run is complete in both {str(owner[k])!r} and {str(folder)!r} (the same rows twice); "
                    f"pass each worker's folder once"
                )
            owner[k] = folder
            shard_tally = Tally.from_json(report["tally"])
            shards.append(_Shard(shard_file(folder, k), report["rows"], manifest["source"], shard_tally))
            tally.add(shard_tally)
        record = {"path": str(folder), **{k: v for k, v in manifest.items() if k != "format"}}
        inputs.append(_Input(folder, record, shards, manifest.get("image_storage", "path"), manifest.get("image_root"), {manifest["source"]: tally}))
    for k in range(num_shards):
        if k not in owner:
            where = " or ".join(repr(str(shard_file(f, k))) for f in folders)
            missing.append(f"shard {k} ({where}: no report, so unfinished or never run)")
    return inputs, missing


def _merged_input(folder: Path, manifest: dict) -> _Input:
    report = read_json(folder / DATASET_REPORT, "dataset report") if (folder / DATASET_REPORT).is_file() else {}
    tally = {source: Tally.from_json(t) for source, t in (report.get("by_source") or {}).items()}
    shards = []
    for entry in manifest.get("shards", []):
        path = folder / entry["file"]
        if not path.is_file():
            raise DamInputError(f"merged dataset {str(folder)!r} lists {entry['file']!r} but the file is missing; merge it again")
        shards.append(_Shard(path, int(entry["rows"]), entry.get("source", "?"), None))
    record = {"path": str(folder), "merged": True, **{k: manifest.get(k) for k in ("sources", "rows", "inputs")}}
    return _Input(folder, record, shards, manifest.get("image_storage", "path"), manifest.get("image_root"), tally)


def _read_inputs(paths: Sequence[str | os.PathLike]) -> tuple[list[_Input], list[str]]:
    runs: dict[str, tuple[list[Path], list[dict]]] = {}
    inputs, missing = [], []
    seen = set()
    for raw in paths:
        folder = Path(os.path.abspath(raw))
        if folder in seen:  # the same folder twice (e.g. workers sharing one folder, passed per worker)
            continue
        seen.add(folder)
        if not folder.is_dir():
            raise DamInputError(f"input {str(raw)!r} is not a folder; pass stage output folders (holding {RUN_MANIFEST}) or merged datasets")
        if (folder / RUN_MANIFEST).is_file():
            manifest = read_json(folder / RUN_MANIFEST, "run manifest")
            if not isinstance(manifest, dict) or "sharding" not in manifest or "source" not in manifest:
                raise DamInputError(f"{str(folder / RUN_MANIFEST)!r} is not a dam-data run manifest; was it written by dam-data?")
            identity = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
            runs.setdefault(identity, ([], []))
            runs[identity][0].append(folder)
            runs[identity][1].append(manifest)
        elif (folder / DATASET_MANIFEST).is_file():
            manifest = read_json(folder / DATASET_MANIFEST, "dataset manifest")
            if not isinstance(manifest, dict) or manifest.get("format") != DATASET_FORMAT:
                raise DamInputError(f"{str(folder / DATASET_MANIFEST)!r} is not a dam-data dataset manifest")
            inputs.append(_merged_input(folder, manifest))
        else:
            raise DamInputError(
                f"input {str(raw)!r} has neither {RUN_MANIFEST} (a stage output) nor {DATASET_MANIFEST} (a merged dataset); "
                f"pass folders written by dam-data"
            )
    for folders, manifests in runs.values():
        run_inputs, run_missing = _run_inputs(folders, manifests)
        inputs += run_inputs
        missing += run_missing
    return inputs, missing


def _check_ids(shards: list[_Shard]) -> None:
    """Refuse a row id that occurs twice among the shards, naming it and where it is."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    tables = []
    for index, shard in enumerate(shards):
        ids = pq.read_table(shard.path, columns=["id"]).column("id")
        tables.append(pa.table({"id": ids, "shard": pa.array([index] * len(ids), pa.int32())}))
    if not tables:
        return
    table = pa.concat_tables(tables)
    counts = table.group_by("id").aggregate([("shard", "count")])
    repeated = counts.filter(pc.greater(counts["shard_count"], 1))
    if repeated.num_rows:
        row_id = repeated["id"][0].as_py()
        where = sorted({str(shards[i].path) for i in table.filter(pc.equal(table["id"], row_id))["shard"].to_pylist()})
        raise DamInputError(
            f"row id {row_id!r} occurs more than once ({repeated.num_rows} ids repeat), in {', '.join(map(repr, where))}; "
            f"merge each run once (the same source under two names gives distinct ids)"
        )


def _place(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # shards are never rewritten in place (write_shard renames), so a link is safe
    except OSError:
        shutil.copyfile(src, dst)


def merge_datasets(
    inputs: Sequence[str | os.PathLike], out: str | os.PathLike, allow_partial: bool = False, progress: bool = True,
) -> MergeSummary:
    """Merge stage outputs / datasets ``inputs`` into the dataset folder ``out`` (see the module docstring)."""
    if not inputs:
        raise DamInputError("merge needs at least one input folder (--inputs DIR [DIR ...])")
    out = Path(os.path.abspath(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DamInputError(f"output {str(out)!r} exists and is not an empty folder; remove it or choose another --out")
    found, missing = _read_inputs(inputs)
    if missing and not allow_partial:
        shown = "; ".join(missing[:_NAMED]) + (f"; and {len(missing) - _NAMED} more" if len(missing) > _NAMED else "")
        raise DamInputError(
            f"{len(missing)} shard(s) are incomplete: {shown}. Finish them by rerunning the same stage command (the same "
            f"--shard/--num-shards), or pass --allow-partial to merge what is complete"
        )
    roots = {i.image_root for i in found if i.image_storage == "path" and any(s.rows for s in i.shards)}
    if len(roots) > 1:
        raise DamInputError(
            f"inputs store image paths relative to different roots ({', '.join(sorted(map(repr, map(str, roots))))}); dam-train "
            f"resolves one root per dataset: merge them into separate datasets, or rerun with a common output.image_root"
        )
    shards = [s for i in found for s in i.shards if s.rows > 0]  # 0-row shards hold nothing (and datasets cannot read them)
    _check_ids(shards)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.merge-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        listing = []
        for index, shard in enumerate(tqdm(shards, desc="merge", unit="shard", disable=not progress)):
            name = f"shard-{index:05d}.parquet"
            _place(shard.path, staging / name)
            listing.append({"file": name, "rows": shard.rows, "source": shard.source, "from": str(shard.path)})
        by_source: dict[str, Tally] = defaultdict(Tally)
        for i in found:
            for source, tally in i.tally.items():
                by_source[source].add(tally)
        total = Tally()
        for tally in by_source.values():
            total.add(tally)
        rows = sum(s.rows for s in shards)
        storages = sorted({i.image_storage for i in found if i.shards})
        write_json_atomic(staging / DATASET_MANIFEST, {
            "format": DATASET_FORMAT, "schema_version": SCHEMA_VERSION, "rows": rows,
            "sources": sorted({s.source for s in shards}),
            "image_storage": storages[0] if len(storages) == 1 else "mixed",
            "image_root": next(iter(roots)) if roots else None,
            "partial": bool(missing), "missing_shards": missing,
            "inputs": [i.record for i in found], "shards": listing,
        })
        write_json_atomic(staging / DATASET_REPORT, {
            "total": total.to_json(), "by_source": {s: t.to_json() for s, t in sorted(by_source.items())},
        })
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if missing:
        logger.warning("merged a partial dataset: %d shard(s) incomplete (listed in %s)", len(missing), out / DATASET_MANIFEST)
    logger.info("merged %d rows in %d shards from %d inputs into %s", rows, len(shards), len(found), out)
    return MergeSummary(out, rows, len(shards), len(found), bool(missing))
