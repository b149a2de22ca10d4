"""The speed benchmark runs end to end on a tiny model and both paths agree."""

import pytest

from bench.cli import main as bench_main
from bench.speed_describe import main


def test_speed_describe_tiny_runs_and_paths_agree(capsys):
    result = main(["--shape", "tiny", "--num-regions", "6", "--batch-size", "4", "--max-new-tokens", "5",
                   "--device", "cpu", "--dtype", "float32"])
    assert result["agree"] == 6
    assert result["batched_rate"] > 0 and result["sequential_rate"] > 0
    assert "speed-up batched / one-per-call" in capsys.readouterr().out


def test_dam_bench_dispatches_and_rejects_unknown_commands(capsys):
    assert bench_main(["speed-describe", "--num-regions", "2", "--batch-size", "2", "--max-new-tokens", "2",
                       "--device", "cpu", "--dtype", "float32"]) == 0
    assert "regions/s" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        bench_main(["nope"])
    assert exit_.value.code == 2


def test_dam_bench_lists_dlc_score(capsys):
    assert bench_main(["dlc-score", "--help"]) == 0
    assert "--judge-model" in capsys.readouterr().out
