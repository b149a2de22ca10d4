"""The speed benchmarks run end to end on a tiny model, their paths agree, their analytic counts hold."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.cli import main as bench_main
from bench.speed_describe import Roofline, decode_weight_bytes, device_bandwidth, kv_bytes_per_token, main, vision_flops_per_region
from tests.factories import tiny_dam


def test_speed_describe_tiny_runs_and_paths_agree(capsys):
    result = main(["--shape", "tiny", "--regions", "6", "--batch-size", "4", "--new-tokens", "5",
                   "--device", "cpu", "--dtype", "float32", "--modes", "fast,static,batched,sequential"])
    assert result["identical_texts"] == {"sequential_batched": 6, "batched_static": 6, "static_fast": 6}
    for mode in ("sequential", "batched", "static", "fast"):
        assert result[mode]["rate"] > 0 and result[mode]["ms_per_step"] > 0 and result[mode]["roofline_ms_per_step"] > 0
    assert result["vision"]["seconds"] > 0 and result["vision"]["tflops"] > 0
    out = capsys.readouterr().out
    assert "(3)/(1)" in out and "(3)/(2)" in out and "(2b)/(2)" in out and "goals: (3)/(1)" in out
    assert "3.00 TB/s" in out and result["bandwidth"] == 3e12  # a CPU has no known HBM: the 3 TB/s
    # The step clocks saw every decode step: each region's tokens after the first (none in the prefill).
    assert result["sequential"]["steps"] == 6 * (5 - 1)
    assert result["batched"]["steps"] == 2 * (5 - 1)  # two generate calls of 4 and 2 rows
    assert result["speedups"]["fast_over_sequential"] == result["goals"]["fast_over_sequential"]


def test_speed_describe_refuses_unknown_modes():
    with pytest.raises(SystemExit):
        main(["--modes", "fast,turbo"])


def test_device_bandwidth_by_name():
    assert device_bandwidth("NVIDIA H200") == 4.8e12
    assert device_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert device_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert device_bandwidth("cpu") == 3e12


@pytest.mark.parametrize("vision_mode", ["focal", "full_only", "full_and_crop"])
def test_vision_flops_match_a_flop_counter(vision_mode):
    model = tiny_dam(vision_mode=vision_mode)
    size = model.config.vision_config.image_size
    # The math backend runs attention as matmuls, which the counter sees (CPU's fused kernel it does not).
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model.vision(torch.zeros(3, 8, size, size))
    assert counter.get_total_flops() == 3 * vision_flops_per_region(model.config)


def test_roofline_counts_weights_and_kv_cache():
    model = tiny_dam()
    language_model = model.language_model
    config = language_model.config
    per_token = kv_bytes_per_token(language_model, torch.bfloat16)
    assert per_token == 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2
    weights = decode_weight_bytes(language_model)
    embedding = language_model.get_input_embeddings().weight
    assert weights == 4 * (language_model.num_parameters() - embedding.numel())  # float32, untied head
    roofline = Roofline(weights, per_token, 1e9)
    assert roofline.ms_per_step(10) == pytest.approx(1e3 * (weights + 10 * per_token) / 1e9)


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
