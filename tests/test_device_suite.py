"""bench/device_suite.sh, the prepared GPU command, run end to end with tiny shapes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUITE = REPO / "bench" / "device_suite.sh"


def run_suite(out: Path, *parts: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, SUITE_SMOKE="1", PYTHON=sys.executable, OUT=str(out), OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(SUITE), *parts], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_every_part_runs_and_writes_its_report(tmp_path):
    parts = ["cuda-tests", "describe", "fcln", "data", "densecap", "retrieval", "describe-static", "train"]
    result = run_suite(tmp_path, *parts)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = (tmp_path / "suite.log").read_text()
    assert "failed: none; skipped for time: none" in log
    for part in parts[1:]:
        report = json.loads((tmp_path / f"{part}.json").read_text())
        assert report, part
    densecap = json.loads((tmp_path / "densecap.json").read_text())
    assert densecap["pipelines"]["fcln"]["images"] == 2 and densecap["pipelines"]["sam-dam"]["images"] == 2
    assert densecap["pipelines"]["fcln"]["regions_per_image"] > 0
    describe = json.loads((tmp_path / "describe.json").read_text())
    assert describe["identical_texts"]["batched_fast"] == describe["regions"]  # greedy: fast path = batched generate
    static = json.loads((tmp_path / "describe-static.json").read_text())
    assert static["identical_texts"] == {"batched_static": static["regions"], "static_fast": static["regions"]}
    # A device call brings back at most 8 files.
    assert len(list(tmp_path.iterdir())) <= 8


def test_unknown_part_is_refused_before_anything_runs(tmp_path):
    result = run_suite(tmp_path, "describe", "mfu")
    assert result.returncode == 2
    assert "unknown part 'mfu'" in result.stderr
    assert not (tmp_path / "describe.json").exists()
