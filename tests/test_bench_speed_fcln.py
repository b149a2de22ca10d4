"""`dam-bench speed-fcln` runs end to end on the tiny backbone on a CPU, prints every field, and its
staged breakdown computes exactly what `FclnModel.generate` computes."""

from __future__ import annotations

import json

import pytest
import torch

from bench.cli import main as bench_main
from bench.speed_fcln import STAGES, Stopwatch, build_model, staged_generate

SMALL = ["--backbone", "tiny", "--device", "cpu", "--width", "192", "--height", "160", "--proposals", "40",
         "--warmup", "1", "--iterations", "2"]


pytestmark = pytest.mark.usefixtures("single_thread")


def test_speed_fcln_prints_timings_breakdown_and_ratio(tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    assert bench_main(["speed-fcln", *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for text in ("ms/image", *STAGES, "eager-fp32", "float32+channels_last", "speed-up", "goal <= 10 ms/image",
                 "image=192x160", "proposals=40"):
        assert text in printed, text
    report = json.loads(out.read_text())
    assert report["backbone"] == "tiny" and report["device"] == "cpu" and len(report["variants"]) == 2
    for variant in report["variants"]:
        assert variant["error"] is None and variant["ms_per_image"] > 0
        assert set(variant["stages_ms"]) == set(STAGES) and 0 < variant["regions_captioned"] <= variant["proposals"] <= 40
    assert report["fast_over_baseline"] > 0


def test_eager_only_when_no_fast_path_is_asked_for(capsys) -> None:
    assert bench_main(["speed-fcln", *SMALL, "--no-channels-last", "--iterations", "1"]) == 0
    assert "eager fp32 only" in capsys.readouterr().out


def test_staged_breakdown_matches_generate() -> None:
    model = build_model("tiny", proposals=30, device="cpu")
    pixels = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    expected = model.generate(pixels)[0]
    watch = Stopwatch("cpu")
    staged, proposals = staged_generate(model, pixels, watch)
    assert set(watch.laps) == set(STAGES) and proposals <= 30
    torch.testing.assert_close(staged.boxes, expected.boxes, rtol=0, atol=0)
    torch.testing.assert_close(staged.scores, expected.scores, rtol=0, atol=0)
    assert staged.captions == expected.captions
    assert staged.token_ids.shape[1] == model.config.max_caption_length  # <end> suppressed: full-length captions


def test_final_nms_at_one_captions_every_proposal(tmp_path) -> None:
    out = tmp_path / "speed.json"
    assert bench_main(["speed-fcln", *SMALL, "--no-channels-last", "--iterations", "1", "--final-nms-iou", "1.0",
                       "--json", str(out)]) == 0
    (variant,) = json.loads(out.read_text())["variants"]
    assert variant["regions_captioned"] == variant["proposals"]


def test_user_errors_exit_2(capsys) -> None:
    assert bench_main(["speed-fcln", "--backbone", "vgg19"]) == 2  # argparse's choices
    assert bench_main(["speed-fcln", "--backbone", "tiny", "--device", "cpu", "--iterations", "0"]) == 2
    assert "--iterations must be at least 1" in capsys.readouterr().err
    assert bench_main(["speed-fcln", "--backbone", "tiny", "--device", "cpu", "--final-nms-iou", "0"]) == 2
    assert "--final-nms-iou must be in (0, 1]" in capsys.readouterr().err
