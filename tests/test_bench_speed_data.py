"""`dam-bench speed-data`: the CPU part drives the real `dam-data` on generated SA-1B data; the GPU part times tiny models."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("segment_anything")
pytest.importorskip("datasets")

from bench.cli import main as bench_main  # noqa: E402
from bench.speed_data import main, write_sa1b  # noqa: E402


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU
    yield
    torch.set_num_threads(threads)


def test_speed_data_tiny_runs_both_parts(tmp_path, capsys, one_thread):
    result = main(["--device", "cpu", "--tiny", "--views", "on", "--json", str(tmp_path / "speed.json")])
    assert result["views_rows"] == 12 and result["views_per_core"] > 0 and result["views_wall_seconds"] > 0
    for key in ("owl_ms", "sam_encoder_ms", "sam_decoder_ms", "siglip_ms", "image_ms", "regions_per_s"):
        assert result[key] > 0, key
    assert result["region_ms"] == pytest.approx(result["image_ms"] / 32)
    out = capsys.readouterr().out
    assert "regions/s per core" in out and "ms per region" in out and "SAM mask decoder, 32 boxes" in out
    assert json.loads((tmp_path / "speed.json").read_text())["views_rows"] == 12


def test_generated_sa1b_data_is_what_the_source_reads(tmp_path):
    from data_pipeline.sources.sa1b import Sa1bSource

    assert write_sa1b(tmp_path, images=2, regions=3, height=40, width=50) == 6
    source = Sa1bSource(tmp_path)
    unit = source.load(source.units()[0])
    assert len(unit.regions) == 3 and unit.size == (40, 50) and unit.load_image().shape == (40, 50, 3)


def test_dam_bench_knows_speed_data(capsys):
    assert bench_main(["speed-data", "--device", "cpu", "--tiny", "--cpu", "none", "--gpu", "none"]) == 0
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--images", "0"])
    assert "--images must be >= 1" in capsys.readouterr().err
