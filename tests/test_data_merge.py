"""DLC-SDP sharding over workers, `dam-data merge` and `dam-data stats`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("datasets")

from tests.sdp_fixtures import DeterministicLabeler, coco_config, make_coco  # noqa: E402

from dam.errors import DamInputError  # noqa: E402
from dam.schema import load_dataset_dir  # noqa: E402
from data_pipeline import stage1  # noqa: E402
from data_pipeline.cli import main  # noqa: E402
from data_pipeline.merge import merge_datasets  # noqa: E402
from data_pipeline.sharding import UnitResult, Worker, report_file, resolve_worker, run_sharded  # noqa: E402
from data_pipeline.stage1 import run_stage1  # noqa: E402
from data_pipeline.stats import dataset_stats  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                  "SLURM_PROCID", "SLURM_NTASKS")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"))


@pytest.fixture(scope="module")
def reference(coco, tmp_path_factory) -> Path:
    """One uninterrupted single-worker run (shard_size 1: 5 shards)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_stage1(coco_config(coco, out), labeler=DeterministicLabeler(refuse=["coco/2/21"]), progress=False)
    return out


@pytest.fixture
def cli(coco, monkeypatch):
    monkeypatch.setattr(stage1, "make_labeler", lambda section: DeterministicLabeler(refuse=["coco/2/21"]))
    for name in _LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)

    def run(out: Path, *extra: str) -> int:
        return main(["stage1", "--config", str(REPO / "configs/data/stage1_coco.yaml"), "--no-progress",
                     f"source.annotations={coco.annotations}", f"source.images={coco.images}", f"output.dir={out}",
                     "output.shard_size=1", "filters.min_area=10", "seed=3", "batch_size=2", *extra])

    return run


def _pairs(path: Path, tmp_path: Path) -> list[tuple[str, str]]:
    return sorted((r["id"], r["caption"]) for r in load_dataset_dir(path, cache_dir=tmp_path / "hf-cache"))


def _shards_with_reports(out: Path) -> list[int]:
    return sorted(int(p.name[6:11]) for p in out.glob("shard-*.report.json"))


def test_resolve_worker_sources():
    assert resolve_worker(environ={}) == Worker(0, 1, "default")
    assert resolve_worker(2, 3, environ={"RANK": "0", "WORLD_SIZE": "8"}) == Worker(2, 3, "--shard/--num-shards")
    env = {"RANK": "5", "WORLD_SIZE": "8", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    assert resolve_worker(environ=env) == Worker(5, 8, "RANK/WORLD_SIZE")
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}
    assert resolve_worker(environ=env) == Worker(2, 4, "SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT")
    assert resolve_worker(environ={"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}) == Worker(1, 2, "SLURM_PROCID/SLURM_NTASKS")
    with pytest.raises(DamInputError, match="together"):
        resolve_worker(1, None, environ={})
    with pytest.raises(DamInputError, match=r"worker 4 of 4 \(from RANK/WORLD_SIZE\) is impossible"):
        resolve_worker(environ={"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(DamInputError, match="not integers"):
        resolve_worker(environ={"RANK": "x", "WORLD_SIZE": "4"})


def test_driver_splits_units_into_shards_by_index(tmp_path):
    seen: list[str] = []

    def process(unit: str) -> UnitResult:
        seen.append(unit)
        return UnitResult()

    units = [f"u{i}" for i in range(7)]
    summary = run_sharded(units, process, tmp_path / "a", {"stage": "test"}, shard_size=3, worker=Worker(1, 2), progress=False)
    assert summary.num_shards == 3 and summary.shards_written == [1] and seen == ["u3", "u4", "u5"]
    report = json.loads(report_file(tmp_path / "a", 1).read_text())
    assert report["units"] == [3, 6] and report["rows"] == 0
    with pytest.raises(DamInputError, match=r"sharding\.num_units=7 \(now 8\)"):  # the source grew: shards would shift
        run_sharded(units + ["u7"], process, tmp_path / "a", {"stage": "test"}, shard_size=3, progress=False)
    with pytest.raises(DamInputError, match=r"sharding\.units_sha256="):
        run_sharded(units[::-1], process, tmp_path / "a", {"stage": "test"}, shard_size=3, progress=False)


def test_three_workers_by_flags_cover_every_region_once_and_merge(cli, coco, reference, tmp_path, capsys):
    folders = [tmp_path / f"w{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        assert cli(folder, "--shard", str(i), "--num-shards", "3") == 0
        assert _shards_with_reports(folder) == [k for k in range(5) if k % 3 == i]
    ids = [row_id for folder in folders for row_id, _ in _pairs(folder, tmp_path)]
    assert sorted(ids) == [row_id for row_id, _ in _pairs(reference, tmp_path)] and len(set(ids)) == len(ids)
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", "--inputs", *map(str, folders), "--out", str(merged), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"merged 4 rows in 2 shards from 3 inputs into {merged}"  # 0-row shards are left out
    assert _pairs(merged, tmp_path) == _pairs(reference, tmp_path)
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["rows"] == 4 and manifest["sources"] == ["coco"] and manifest["image_root"] == str(coco_images(reference))
    assert manifest["partial"] is False and len(manifest["shards"]) == 2 and len(manifest["inputs"]) == 3
    assert manifest["inputs"][0]["config"]["filters"]["min_area"] == 10
    report = json.loads((merged / "report.json").read_text())
    expected = run_stage1(coco_config(coco, reference), labeler=DeterministicLabeler(), progress=False).tally.to_json()  # all complete: read back
    assert report["total"] == expected and report["by_source"]["coco"] == expected
    assert sorted(p.name for p in merged.iterdir()) == ["manifest.json", "report.json", "shard-00000.parquet", "shard-00001.parquet"]


def coco_images(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["image_root"]


@pytest.mark.parametrize("env", [
    lambda i: {"RANK": str(i), "WORLD_SIZE": "3"},
    lambda i: {"SLURM_ARRAY_TASK_ID": str(i + 1), "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "3"},
    lambda i: {"SLURM_PROCID": str(i), "SLURM_NTASKS": "3"},
], ids=["torchrun", "slurm-array", "slurm-tasks"])
def test_three_workers_by_environment_share_one_folder(cli, reference, tmp_path, monkeypatch, env):
    out = tmp_path / "shared"
    for i in range(3):
        with monkeypatch.context() as m:
            for name, value in env(i).items():
                m.setenv(name, value)
            assert cli(out) == 0
        assert _shards_with_reports(out) == [k for k in range(5) if k % 3 <= i]
    assert _pairs(out, tmp_path) == _pairs(reference, tmp_path)
    merged = tmp_path / "merged"
    merge_datasets([out], merged, progress=False)
    assert _pairs(merged, tmp_path) == _pairs(reference, tmp_path)


def test_merge_refuses_incomplete_runs_unless_allowed(cli, reference, tmp_path, capsys):
    folders = [tmp_path / f"w{i}" for i in range(3)]
    for i in (0, 1):
        assert cli(folders[i], "--shard", str(i), "--num-shards", "3") == 0
    capsys.readouterr()
    merged = tmp_path / "merged"
    assert main(["merge", "--inputs", str(folders[0]), str(folders[1]), "--out", str(merged), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "1 shard(s) are incomplete: shard 2 (" in err and "--allow-partial" in err
    assert not merged.exists()
    assert main(["merge", "--inputs", str(folders[0]), str(folders[1]), "--out", str(merged), "--allow-partial", "--no-progress"]) == 0
    manifest = json.loads((merged / "manifest.json").read_text())
    assert manifest["partial"] is True and manifest["missing_shards"][0].startswith("shard 2 ")
    assert [i for i, _ in _pairs(merged, tmp_path)] == [i for i, _ in _pairs(reference, tmp_path) if not i.startswith("coco/3/")]
    report_file(folders[1], 1).unlink()  # a shard whose rows exist but whose report does not: unfinished
    with pytest.raises(DamInputError, match=r"shard 1 \(.*w1/shard-00001\.parquet"):
        merge_datasets(folders[:2], tmp_path / "merged2", progress=False)


def test_merge_refuses_duplicates_and_mixed_roots(coco, reference, tmp_path):
    other_seed = coco_config(coco, tmp_path / "seed4")
    other_seed.seed = 4  # another run (another run.json) over the same regions: the same ids
    run_stage1(other_seed, labeler=DeterministicLabeler(), progress=False)
    with pytest.raises(DamInputError, match=r"row id 'coco/\d/\d+' occurs more than once \(4 ids repeat\)"):
        merge_datasets([reference, tmp_path / "seed4"], tmp_path / "merged", progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in reference.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    with pytest.raises(DamInputError, match=r"shard 0 of one run is complete in both"):
        merge_datasets([reference, copy], tmp_path / "merged", progress=False)
    renamed = coco_config(coco, tmp_path / "root")
    renamed.source.name, renamed.output.image_root = "paco", str(coco.root)
    run_stage1(renamed, labeler=DeterministicLabeler(), progress=False)
    with pytest.raises(DamInputError, match="different roots"):
        merge_datasets([reference, tmp_path / "root"], tmp_path / "merged", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("")
    with pytest.raises(DamInputError, match="not an empty folder"):
        merge_datasets([reference], tmp_path / "busy", progress=False)
    with pytest.raises(DamInputError, match="neither run.json"):
        merge_datasets([tmp_path / "busy"], tmp_path / "merged", progress=False)


def test_merged_datasets_merge_again(coco, reference, tmp_path):
    first = tmp_path / "first"
    merge_datasets([reference], first, progress=False)
    paco = coco_config(coco, tmp_path / "paco", image_storage="bytes")
    paco.source.name = "paco"
    run_stage1(paco, labeler=DeterministicLabeler(), progress=False)
    both = tmp_path / "both"
    summary = merge_datasets([first, tmp_path / "paco"], both, progress=False)
    assert summary.rows == 4 + 5
    manifest = json.loads((both / "manifest.json").read_text())
    assert manifest["sources"] == ["coco", "paco"] and manifest["image_storage"] == "mixed"
    assert manifest["image_root"] == coco_images(reference)
    report = json.loads((both / "report.json").read_text())
    assert set(report["by_source"]) == {"coco", "paco"} and report["total"]["rows"] == 9


def test_stats(reference, tmp_path, capsys):
    merged = tmp_path / "merged"
    merge_datasets([reference], merged, progress=False)
    stats = dataset_stats(merged)
    captions = [c for _, c in _pairs(reference, tmp_path)]
    words = sorted(len(c.split()) for c in captions)
    assert stats["rows"] == 4 and stats["images"] == 2 and stats["sources"] == {"coco": 4}
    assert stats["caption_words"]["min"] == words[0] and stats["caption_words"]["max"] == words[-1]
    assert stats["caption_words"]["mean"] == pytest.approx(sum(words) / 4, abs=0.01)
    assert stats["top_categories"] == {"dog:ear": 2, "cat": 1, "dog": 1}
    assert stats["report"]["filters"]["labeler"] == {"kept": 4, "rejected": {"refusal": 1}}
    assert main(["stats", str(merged)]) == 0
    text = capsys.readouterr().out
    assert "rows: 4" in text and "images: 2" in text and "sources: coco (4)" in text
    assert "caption words: mean" in text and "p50" in text and "dog:ear (2)" in text
    assert "labeler: kept 4, rejected 1 (refusal 1)" in text and "units: 5 seen, 2 skipped" in text
    assert f"image paths are relative to: {coco_images(reference)}" in text
    assert main(["stats", str(reference), "--json"]) == 0  # a stage folder: shard reports summed
    assert json.loads(capsys.readouterr().out)["report"] == stats["report"]
