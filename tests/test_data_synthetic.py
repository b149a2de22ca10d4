"""`dam-data synthetic`: ShapesDLC rows in the dam.schema layout, resumable and refusing mixed folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")

from data_pipeline.cli import main  # noqa: E402
from data_pipeline.synthetic import MANIFEST, write_synthetic_dataset  # noqa: E402
from dam.errors import DamInputError  # noqa: E402
from dam.schema import decode_row, load_dataset_dir, write_shard  # noqa: E402
from dam.shapes import SPEC, scene  # noqa: E402

NUM_IMAGES, SEED, SHARD_SIZE = 7, 4, 3


def _run(out: Path, *extra: str, seed: int = SEED, shard_size: int = SHARD_SIZE) -> int:
    return main([
        "synthetic", "--num-images", str(NUM_IMAGES), "--out", str(out), "--seed", str(seed),
        "--shard-size", str(shard_size), "--no-progress", *extra,
    ])


def _files(out: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (mtime in ns, sha256)} of every file in the dataset folder."""
    return {
        str(p.relative_to(out)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(out.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "data"
    assert _run(out) == 0
    return out


def test_writes_the_rendered_scenes(dataset, tmp_path):
    assert sorted(p.name for p in dataset.glob("*.parquet")) == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    rows = sorted(load_dataset_dir(dataset, cache_dir=tmp_path / "cache"), key=lambda r: r["id"])
    scenes = [scene(SEED, i) for i in range(NUM_IMAGES)]
    assert len(rows) == sum(len(s.objects) for s in scenes)
    expected = [(i, k, s, obj, mask) for i, s in enumerate(scenes) for k, (obj, mask) in enumerate(zip(s.objects, s.masks))]
    for row, (i, k, s, obj, mask) in zip(rows, expected):
        assert row["id"] == f"shapes-{SEED}-{i:07d}-{k}"
        assert row["image"] == {"bytes": None, "path": f"images/{i // SHARD_SIZE:05d}/{i:07d}.png"}
        decoded = decode_row(row, root=dataset)
        assert (decoded.caption, decoded.category, decoded.source) == (obj.caption, obj.shape, "shapes")
        assert not decoded.is_video
        np.testing.assert_array_equal(decoded.frames[0], s.image)
        np.testing.assert_array_equal(decoded.masks[0], mask)
    assert len(list((dataset / "images").rglob("*.png"))) == NUM_IMAGES  # each image stored once


def test_manifest(dataset):
    import json

    manifest = json.loads((dataset / MANIFEST).read_text())
    assert manifest == {"spec": SPEC, "seed": SEED, "num_images": NUM_IMAGES, "shard_size": SHARD_SIZE}


def test_rerun_skips_everything_and_changes_nothing(dataset, capsys):
    before = _files(dataset)
    assert _run(dataset) == 0
    assert _files(dataset) == before
    assert capsys.readouterr().out.strip() == f"{sum(len(scene(SEED, i).objects) for i in range(NUM_IMAGES))} rows from {NUM_IMAGES} images in {dataset}"


def test_resume_rewrites_only_missing_shards_identically(dataset):
    before = _files(dataset)
    (dataset / "shard-00001.parquet").unlink()
    (dataset / "images/00002/0000006.png").unlink()  # a shard whose image is gone is redone too
    assert _run(dataset) == 0
    after = _files(dataset)
    assert after.keys() == before.keys()
    assert all(after[name][1] == before[name][1] for name in before)  # identical bytes
    rewritten = {"shard-00001.parquet", "shard-00002.parquet", "images/00002/0000006.png"}
    assert all(after[name][0] == before[name][0] for name in before if name not in rewritten)
    assert all(after[name][0] != before[name][0] for name in rewritten)


@pytest.mark.parametrize("change", [{"seed": SEED + 1}, {"shard_size": SHARD_SIZE + 1}])
def test_other_arguments_into_the_same_folder_are_refused(dataset, capsys, change):
    before = _files(dataset)
    assert _run(dataset, **change) == 2
    err = capsys.readouterr().err.strip()
    name, value = next(iter(change.items()))
    stored = {"seed": SEED, "shard_size": SHARD_SIZE}[name]
    assert err.startswith("dam-data: error: ") and "\n" not in err
    assert f"{name}={stored} (asked: {value})" in err
    assert MANIFEST in err
    assert _files(dataset) == before


def test_foreign_shards_are_refused(tmp_path, capsys):
    write_shard([], tmp_path / "shard-00000.parquet")
    assert _run(tmp_path) == 2
    assert "no synthetic.json" in capsys.readouterr().err


def test_python_api(tmp_path):
    rows = write_synthetic_dataset(tmp_path / "api", 2, seed=1, shard_size=5, progress=False)
    assert rows == len(scene(1, 0).objects) + len(scene(1, 1).objects)
    assert write_synthetic_dataset(tmp_path / "api", 2, seed=1, shard_size=5, progress=False) == rows
    with pytest.raises(DamInputError, match="num_images"):
        write_synthetic_dataset(tmp_path / "bad", 0)
    with pytest.raises(DamInputError, match="seed"):
        write_synthetic_dataset(tmp_path / "bad", 1, seed=-1)


def test_cli_help_and_bad_options(capsys):
    assert main(["--help"]) == 0
    assert "synthetic" in capsys.readouterr().out
    assert main(["synthetic", "--help"]) == 0
    assert "--num-images" in capsys.readouterr().out
    assert main(["synthetic", "--num-images", "0", "--out", "x"]) == 2
    assert "--num-images" in capsys.readouterr().err
    assert main([]) == 2


def test_visual_genome_layout_has_every_object_with_its_box_and_caption(tmp_path, capsys):
    from dam.images import load_image
    from dam.visual_genome import load_region_descriptions

    out = tmp_path / "vg"
    assert _run(out, "--format", "visual-genome") == 0
    assert "Visual Genome layout" in capsys.readouterr().out
    regions = load_region_descriptions(out / "region_descriptions.json")
    assert sorted(regions, key=int) == list(range(1, NUM_IMAGES + 1))
    for index in range(NUM_IMAGES):
        rendered = scene(SEED, index)
        found = regions[index + 1]
        assert [r.phrase for r in found] == [obj.caption for obj in rendered.objects]
        assert [tuple(r.box) for r in found] == [tuple(float(v) for v in obj.box) for obj in rendered.objects]
        assert np.array_equal(load_image(str(out / "images" / f"{index + 1}.png")), rendered.image)
    before = (out / "images" / "1.png").stat().st_mtime_ns
    assert _run(out, "--format", "visual-genome") == 0  # a rerun keeps the images already written
    assert (out / "images" / "1.png").stat().st_mtime_ns == before


def test_coco_layout_is_a_stage1_source_with_every_object(tmp_path, capsys):
    from data_pipeline.sources import build_source
    from data_pipeline.config import SourceConfig

    out = tmp_path / "coco"
    assert _run(out, "--format", "coco") == 0
    assert "COCO instances layout" in capsys.readouterr().out
    source = build_source(SourceConfig(type="coco", name="shapes", annotations=str(out / "instances.json"),
                                       images=str(out / "images")))
    for index, key in enumerate(source.units()):
        unit, rendered = source.load(key), scene(SEED, index)
        assert [region.category for region in unit.regions] == [obj.shape for obj in rendered.objects]
        for region, mask in zip(unit.regions, rendered.masks):
            assert np.array_equal(region.decode_mask(), mask)
        assert np.array_equal(unit.load_image(), rendered.image)
