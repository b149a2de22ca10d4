"""DLC-SDP stage 1: captioned rows in the dam.schema layout, counted rejections, resumable runs, config errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

from tests.sdp_fixtures import DeterministicLabeler, InterruptingLabeler, coco_config, make_coco, make_sa1b  # noqa: E402

from dam.configio import ConfigError  # noqa: E402
from dam.errors import DamInputError  # noqa: E402
from dam.schema import decode_row, load_dataset_dir  # noqa: E402
from data_pipeline import stage1  # noqa: E402
from data_pipeline.cli import main  # noqa: E402
from data_pipeline.config import FilterConfig, OutputConfig, SourceConfig, Stage1Config  # noqa: E402
from data_pipeline.seeds import region_seed  # noqa: E402
from data_pipeline.sharding import report_file, shard_file  # noqa: E402
from data_pipeline.stage1 import run_stage1  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
KEPT = ["coco/1/10", "coco/1/11", "coco/1/12", "coco/2/21", "coco/3/31"]  # min_area drops 2/23; 4 is corrupt, 5 missing


@pytest.fixture
def coco(tmp_path):
    return make_coco(tmp_path / "coco")


def _rows(out: Path, tmp_path: Path) -> list[dict]:
    return sorted(load_dataset_dir(out, cache_dir=tmp_path / "hf-cache"), key=lambda r: r["id"])


def _pairs(out: Path, tmp_path: Path) -> list[tuple[str, str]]:
    return [(r["id"], r["caption"]) for r in _rows(out, tmp_path)]


def _reports(out: Path) -> dict[int, dict]:
    return {int(p.name[6:11]): json.loads(p.read_text()) for p in sorted(out.glob("shard-*.report.json"))}


def test_rows_decode_to_the_source_images_and_masks(coco, tmp_path):
    labeler = DeterministicLabeler(refuse=["coco/1/12"], fail=["coco/3/31"])
    out = tmp_path / "out"
    summary = run_stage1(coco_config(coco, out), labeler=labeler, progress=False)
    rows = _rows(out, tmp_path)
    assert [r["id"] for r in rows] == ["coco/1/10", "coco/1/11", "coco/2/21"]
    assert summary.rows == 3 and summary.num_shards == 5 and summary.shards_written == [0, 1, 2, 3, 4]
    for row in rows:
        assert row["source"] == "coco" and row["category"] == coco.categories[row["id"]]
        assert row["image"]["bytes"] is None and not os.path.isabs(row["image"]["path"])
        decoded = decode_row(row, root=coco.images)  # dam-train: the dataset's root is output.image_root (source.images)
        np.testing.assert_array_equal(decoded.frames[0], coco.pixels[row["id"].rsplit("/", 1)[0]])
        np.testing.assert_array_equal(decoded.masks[0], coco.masks[row["id"]])
        seed = region_seed(3, row["id"])
        assert row["caption"] == f"A {row['category']} ({row['id']}, seed {seed % 1000}) {' '.join(['word'] * (1 + seed % 7))}."
    assert sorted(r.region_id for r in labeler.requests) == KEPT  # min_area and damage filtered before labeling
    assert {r.region_id: r.seed for r in labeler.requests} == {i: region_seed(3, i) for i in KEPT}
    tally = summary.tally.to_json()
    assert tally["units"] == {"seen": 5, "skipped": {"corrupt_image": 1, "missing_image": 1}}
    assert tally["filters"] == {
        "source": {"kept": 7, "rejected": {"bad_mask": 1, "iscrowd": 1}},
        "min_area": {"kept": 6, "rejected": {"too_small": 1}},
        "image": {"kept": 5, "rejected": {"corrupt_image": 1}},
        "labeler": {"kept": 3, "rejected": {"error": 1, "refusal": 1}},
    }
    assert tally["rows"] == 3
    names = list(tally["filters"])
    for before, after in zip(names, names[1:]):  # a funnel: nothing appears or vanishes between filters
        assert tally["filters"][before]["kept"] == tally["filters"][after]["kept"] + sum(tally["filters"][after]["rejected"].values())
    run = json.loads((out / "run.json").read_text())
    assert run["image_root"] == str(coco.images) and run["sharding"]["num_units"] == 5


def test_bytes_storage_rows_are_self_contained(coco, tmp_path):
    out = tmp_path / "out"
    run_stage1(coco_config(coco, out, image_storage="bytes", shard_size=2), labeler=DeterministicLabeler(), progress=False)
    rows = _rows(out, tmp_path)
    assert [r["id"] for r in rows] == KEPT
    for row in rows:
        assert row["image"]["path"] is None
        decoded = decode_row(row)  # no root needed
        np.testing.assert_array_equal(decoded.frames[0], coco.pixels[row["id"].rsplit("/", 1)[0]])
        np.testing.assert_array_equal(decoded.masks[0], coco.masks[row["id"]])


def test_image_root_above_the_images_and_outside(coco, tmp_path):
    out = tmp_path / "out"
    config = coco_config(coco, out, image_root=str(coco.root))
    run_stage1(config, labeler=DeterministicLabeler(), progress=False)
    paths = {r["image"]["path"] for r in _rows(out, tmp_path)}
    assert paths == {"images/000001.jpg", "images/000002.png", "images/sub/000003.jpg"}
    config = coco_config(coco, tmp_path / "out2", image_root=str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=r"output\.image_root: image .* is not under"):
        run_stage1(config, labeler=DeterministicLabeler(), progress=False)


def test_interrupted_run_resumes_to_the_same_rows(coco, tmp_path):
    reference = tmp_path / "reference"
    run_stage1(coco_config(coco, reference), labeler=DeterministicLabeler(), progress=False)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):  # killed during the labeling of the 3rd batch (unit 2 = shard 1)
        run_stage1(coco_config(coco, out), labeler=InterruptingLabeler(after=2), progress=False)
    assert sorted(_reports(out)) == [0] and not shard_file(out, 1).exists()
    assert not list(out.glob(".*.tmp"))  # no half-written file left behind
    first = shard_file(out, 0).stat().st_mtime_ns
    labeler = DeterministicLabeler()
    summary = run_stage1(coco_config(coco, out), labeler=labeler, progress=False)
    assert summary.shards_skipped == [0] and summary.shards_written == [1, 2, 3, 4]
    assert shard_file(out, 0).stat().st_mtime_ns == first
    assert not any(r.region_id.startswith("coco/1/") for r in labeler.requests)  # done shards are not asked again
    assert _pairs(out, tmp_path) == _pairs(reference, tmp_path)
    assert summary.tally == run_stage1(coco_config(coco, reference), labeler=DeterministicLabeler(), progress=False).tally


def test_kill_between_rows_and_report_redoes_that_shard(coco, tmp_path):
    out = tmp_path / "out"
    run_stage1(coco_config(coco, out), labeler=DeterministicLabeler(), progress=False)
    expected = _pairs(out, tmp_path)
    report_file(out, 2).unlink()  # killed after shard 2's parquet, before its report
    report_file(out, 0).write_text("{trunc")  # a damaged report is not trusted either
    labeler = DeterministicLabeler()
    summary = run_stage1(coco_config(coco, out), labeler=labeler, progress=False)
    assert summary.shards_written == [0, 2]
    assert sorted({r.region_id.split("/")[1] for r in labeler.requests}) == ["1", "3"]
    assert _pairs(out, tmp_path) == expected
    again = run_stage1(coco_config(coco, out), labeler=DeterministicLabeler(), progress=False)
    assert again.shards_written == [] and again.rows == 3 + 2  # shards 0 and 2: units 1 and 3


def test_rerun_with_another_config_is_refused(coco, tmp_path):
    out = tmp_path / "out"
    run_stage1(coco_config(coco, out), labeler=DeterministicLabeler(), progress=False)
    config = coco_config(coco, out)
    config.filters.min_area = 50
    with pytest.raises(DamInputError, match=r"another config \(config\.filters\.min_area=10 \(now 50\)\)"):
        run_stage1(config, labeler=DeterministicLabeler(), progress=False)
    config = coco_config(coco, out)
    config.output.shard_size = 2
    with pytest.raises(DamInputError, match=r"sharding\.shard_size=1 \(now 2\)"):
        run_stage1(config, labeler=DeterministicLabeler(), progress=False)
    config = coco_config(coco, out)
    config.batch_size = 1  # how the labeler is called, not what it says: resuming is fine
    assert run_stage1(config, labeler=DeterministicLabeler(), progress=False).shards_skipped == [0, 1, 2, 3, 4]


def test_operational_labeler_keys_do_not_block_resuming(coco, tmp_path):
    out = tmp_path / "out"
    config = coco_config(coco, out)
    config.labeler = {"type": "openai", "model": "m", "base_url": "http://a:8000/v1", "api_key": "secret"}
    run_stage1(config, labeler=DeterministicLabeler(), progress=False)
    assert "secret" not in (out / "run.json").read_text() and "http://a" not in (out / "run.json").read_text()
    config.labeler = {"type": "openai", "model": "m", "base_url": "http://b:9000/v1"}
    assert run_stage1(config, labeler=DeterministicLabeler(), progress=False).shards_written == []
    config.labeler = {"type": "openai", "model": "other"}
    with pytest.raises(DamInputError, match=r"config\.labeler\.model='m' \(now 'other'\)"):
        run_stage1(config, labeler=DeterministicLabeler(), progress=False)


def test_sa1b_filters(tmp_path):
    make_sa1b(tmp_path / "sa1b")
    config = Stage1Config(
        source=SourceConfig(type="sa1b", images=str(tmp_path / "sa1b")),
        filters=FilterConfig(min_area=1, max_area_fraction=0.5, min_predicted_iou=0.815, max_regions_per_unit=1),
        output=OutputConfig(dir=str(tmp_path / "out"), shard_size=2),
    )
    labeler = DeterministicLabeler()
    summary = run_stage1(config, labeler=labeler, progress=False)
    # regions 1 (100 px, iou .81), 2 (875 px of 1200), 4 (50 px, iou .84): 2 is too large, 1 below the iou
    assert [r.region_id for r in labeler.requests] == ["sa1b/1/4"]
    filters = summary.tally.to_json()["filters"]
    assert filters["max_area_fraction"] == {"kept": 2, "rejected": {"too_large": 1}}
    assert filters["min_predicted_iou"] == {"kept": 1, "rejected": {"low_predicted_iou": 1}}
    assert filters["max_regions_per_unit"] == {"kept": 1, "rejected": {}}
    assert summary.tally.units_skipped == {"corrupt_json": 1, "missing_image": 1}


def test_max_regions_per_unit_is_a_stable_seeded_choice(coco, tmp_path):
    picks = []
    for out in ("a", "b"):
        config = coco_config(coco, tmp_path / out)
        config.filters.max_regions_per_unit = 1
        labeler = DeterministicLabeler()
        run_stage1(config, labeler=labeler, progress=False)
        picks.append([r.region_id for r in labeler.requests])
    assert picks[0] == picks[1] and len(picks[0]) == 3  # one per usable image
    expected = min(["coco/1/10", "coco/1/11", "coco/1/12"], key=lambda i: region_seed(3, f"{i}#max_regions_per_unit"))
    assert picks[0][0] == expected


def _cli(coco, out: Path, *extra: str) -> int:
    return main(["stage1", "--config", str(REPO / "configs/data/stage1_coco.yaml"), "--no-progress",
                 f"source.annotations={coco.annotations}", f"source.images={coco.images}", f"output.dir={out}",
                 "output.shard_size=2", "filters.min_area=10", *extra])


def test_cli_runs_and_prints_one_summary_line(coco, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stage1, "make_labeler", lambda section: DeterministicLabeler())
    assert _cli(coco, tmp_path / "out") == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage1: 5 rows from 5 units in 3 of 3 shards (worker 0/1;")
    assert len(_rows(tmp_path / "out", tmp_path)) == 5
    assert _cli(coco, tmp_path / "out", "--shard", "0", "--num-shards", "1") == 0
    assert "3 complete before" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["filters.min_aera=3"], "unknown config key 'filters.min_aera' (did you mean 'filters.min_area'?)"),
    (["source.annotations=/no/such.json"], "source.annotations: '/no/such.json' does not exist"),
    (["output.image_storage=inline"], "output.image_storage must be one of 'path', 'bytes'"),
    (["source.labels=x"], "source.labels is not used by source.type 'coco'"),
    (["--shard", "3", "--num-shards", "2"], "worker 3 of 2 (from --shard/--num-shards) is impossible"),
])
def test_cli_config_errors_are_one_line(coco, tmp_path, capsys, extra, message):
    assert _cli(coco, tmp_path / "out", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dam-data: error: ") and message in err


def test_cli_refuses_a_changed_config(coco, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stage1, "make_labeler", lambda section: DeterministicLabeler())
    assert _cli(coco, tmp_path / "out") == 0
    assert _cli(coco, tmp_path / "out", "seed=7") == 2
    err = capsys.readouterr().err
    assert "another config (config.seed=0 (now 7))" in err and "rerun with the config recorded in" in err


def test_cli_with_the_openai_labeler_end_to_end(coco, tmp_path, capsys):
    """The real `openai` labeler (built from the YAML section) against the fake VLM server."""
    from tests.fake_labeler import FakeLabelerServer

    with FakeLabelerServer(categories=["dog", "cat"], refuse_categories=["dog:ear"]) as server:
        fast = [f"labeler.base_url={server.base_url}", "labeler.backoff_s=0.01", "labeler.max_backoff_s=0.05",
                "labeler.rejection_retries=0"]
        assert _cli(coco, tmp_path / "a", *fast) == 0
        assert _cli(coco, tmp_path / "b", *fast, "labeler.concurrency=1") == 0  # operational: another folder, same rows
    capsys.readouterr()
    rows = _rows(tmp_path / "a", tmp_path)
    assert [r["id"] for r in rows] == ["coco/1/10", "coco/1/11", "coco/2/21"]  # "dog:ear" regions refused
    assert all("surface" in r["caption"] for r in rows)
    assert _pairs(tmp_path / "a", tmp_path) == _pairs(tmp_path / "b", tmp_path)
    report = json.loads(report_file(tmp_path / "a", 0).read_text())
    assert report["tally"]["filters"]["labeler"] == {"kept": 3, "rejected": {"refusal": 1}}  # shard 0: images 1 and 2


def test_transient_labeler_failures_leave_the_shard_for_a_rerun(coco, tmp_path, capsys):
    """HTTP 500 on every retry for one region: its shard is not written (nor its other regions' rows), the
    command exits non-zero saying to rerun, and the rerun against a healthy server completes the run exactly."""
    from tests.fake_labeler import FakeLabelerServer

    fast = ["labeler.backoff_s=0.01", "labeler.max_backoff_s=0.05", "labeler.max_attempts=2", "labeler.rejection_retries=0"]
    with FakeLabelerServer(categories=["dog", "cat", "dog:ear"]) as server:
        assert _cli(coco, tmp_path / "reference", f"labeler.base_url={server.base_url}", *fast) == 0
    out = tmp_path / "out"
    with FakeLabelerServer(categories=["cat", "dog:ear"], fail_categories=["dog"]) as server:  # "dog": coco/1/11 only
        assert _cli(coco, out, f"labeler.base_url={server.base_url}", *fast) == 1
    captured = capsys.readouterr()
    assert "1 shard(s) of" in captured.err and "1 region(s) got no answer" in captured.err
    assert "rerun the same command to retry them" in captured.err and "0 complete before" in captured.out
    failed = [k for k in range(3) if not report_file(out, k).exists()]
    assert len(failed) == 1 and sorted(_reports(out)) == sorted({0, 1, 2} - set(failed))
    assert not shard_file(out, failed[0]).exists() and not list(out.glob(".*.tmp"))  # no rows of its other regions
    with FakeLabelerServer(categories=["dog", "cat", "dog:ear"]) as server:
        assert _cli(coco, out, f"labeler.base_url={server.base_url}", *fast) == 0
        calls = server.calls
    assert "2 complete before" in capsys.readouterr().out
    reference = _reports(tmp_path / "reference")[failed[0]]["tally"]
    asked = reference["filters"]["labeler"]["kept"] + sum(reference["filters"]["labeler"]["rejected"].values())
    assert calls == asked == 4  # only the failed shard's regions (images 1 and 2) are asked again
    assert _pairs(out, tmp_path) == _pairs(tmp_path / "reference", tmp_path)
    assert _reports(out)[failed[0]]["tally"] == reference


def test_stale_temp_files_of_a_hard_kill_are_removed_when_the_shard_is_redone(coco, tmp_path):
    out = tmp_path / "out"
    run_stage1(coco_config(coco, out), labeler=DeterministicLabeler(), progress=False)
    report_file(out, 2).unlink()  # shard 2 killed (SIGKILL: no cleanup) while writing
    stale = [out / f".{shard_file(out, 2).name}.0123abcd.tmp", out / f".{report_file(out, 2).name}.x1y2.tmp"]
    done = out / f".{shard_file(out, 1).name}.4567.tmp"  # another shard's: left to that shard's own redo
    for path in (*stale, done):
        path.write_bytes(b"half a file")
    assert run_stage1(coco_config(coco, out), labeler=DeterministicLabeler(), progress=False).shards_written == [2]
    assert not any(path.exists() for path in stale) and done.exists()


def test_missing_config_file_points_to_the_data_configs(tmp_path, capsys):
    assert main(["stage1", "--config", str(tmp_path / "absent.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "(see configs/data/)" in err and "configs/train" not in err
