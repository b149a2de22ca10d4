"""The training-speed benchmark: runs on CPU with and without DeepSpeed; its FLOP count is exact."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from bench.cli import main as bench_main
from bench.speed_train import (
    DEEPSPEED_CONFIG_DIR,
    build_config,
    build_model,
    fill_deepspeed_config,
    main,
    synthetic_batch,
    train_flops_per_sample,
)
from dam.errors import DamInputError
from dam.modeling.sizes import tiny_config, tiny_siglip_config

REPO = Path(__file__).resolve().parents[1]
FAST = ["--size", "tiny", "--steps", "2", "--warmup-steps", "1", "--text-tokens", "24"]


def _assert_both_modes_ran(report: dict) -> None:
    assert list(report["modes"]) == ["plain", "checkpointing"]
    for row in report["modes"].values():
        assert row["error"] is None
        assert row["samples_per_s"] > 0 and row["tokens_per_s"] > 0 and row["step_ms"] > 0
        assert math.isfinite(row["final_loss"])
    assert report["checkpointing_over_plain"] > 0


def test_torch_loop_reports_both_modes(tmp_path, capsys):
    report = main([*FAST, "--no-deepspeed", "--json", str(tmp_path / "train.json")])
    _assert_both_modes_ran(report)
    assert report["engine"] == "torch" and report["dtype"] == "fp32"
    assert report["llm_tokens"] == report["visual_tokens"] + 24
    assert report["modes"]["plain"]["mfu"] is None and report["mfu_goal_met"] is None  # CPU: no peak known
    out = capsys.readouterr().out
    assert "throughput checkpointing / plain" in out and "MFU goal >= 45%: n/a" in out
    assert json.loads((tmp_path / "train.json").read_text())["modes"].keys() == report["modes"].keys()


def test_mfu_uses_the_given_peak(capsys):
    report = main([*FAST, "--no-deepspeed", "--modes", "plain", "--peak-tflops", "1"])
    row = report["modes"]["plain"]
    assert row["mfu"] == pytest.approx(row["tflops"] / 1.0)
    assert report["mfu_goal_met"] is False and list(report["modes"]) == ["plain"]
    assert "not met" in capsys.readouterr().out


def test_deepspeed_zero2_on_cpu(tmp_path):
    # A subprocess: DeepSpeed initialises torch.distributed and sets its accelerator process-wide.
    pytest.importorskip("deepspeed")
    out = tmp_path / "zero2.json"
    completed = subprocess.run(
        [sys.executable, "-m", "bench.speed_train", *FAST, "--zero-stage", "2", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["engine"] == "deepspeed-zero2"
    _assert_both_modes_ran(report)


def _flop_test_config(projector_type: str, image_size: int):
    vision = tiny_siglip_config(image_size=image_size).to_dict()
    return tiny_config(image_token_id=98, vocab_size=99, projector_type=projector_type, vision_config=vision)


# 16 px / patch 4: an even 4x4 grid; 20 px: a 5x5 grid that mlp_downsample pads to 6x6 (9 tokens).
# The tiny LLM has 4 query and 2 key/value heads, so grouped-query attention is covered.
@pytest.mark.parametrize("projector_type,image_size", [("mlp2x_gelu", 16), ("mlp_downsample", 20)])
def test_flop_count_matches_flop_counter_mode(projector_type, image_size):
    """The analytic count against torch's own count of the same forward + backward.

    FlopCounterMode counts matmuls, convolutions and attention, nothing else, so with every
    parameter trainable the two agree exactly (norms, softmax, GELU and the loss are left out
    by both). Two settings make the brute-force run match the 6·N·T convention: the pixels
    require grad (otherwise the patch embeddings' backward skips the input gradient: 4x, not
    6x) and SDPA runs its math backend (CPU's fused kernel is not counted by FlopCounterMode,
    and a flash backward would add a recompute of QK^T).
    """
    config = _flop_test_config(projector_type, image_size)
    model = build_model(config, "cpu").train()
    text_tokens, batch_size = 24, 2
    batch = synthetic_batch(config, batch_size, text_tokens)
    expected = train_flops_per_sample(config, text_tokens)

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as forward_counter, torch.no_grad():
        model(**batch, use_cache=False)
    by_module = {name: sum(ops.values()) for name, ops in forward_counter.get_flop_counts().items()}
    root = type(model).__name__
    assert by_module[f"{root}.vision"] * 3 == batch_size * (expected["vision_global"] + expected["vision_regional"])
    assert by_module[f"{root}.projector"] * 3 == batch_size * expected["projector"]
    assert by_module[f"{root}.language_model"] * 3 == batch_size * expected["llm"]

    batch["pixel_values"].requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch, use_cache=False).loss.backward()
    assert counter.get_total_flops() == pytest.approx(batch_size * expected["total"], rel=0.01)


def test_dam_3b_shapes_and_llm_flops_are_six_n_t_plus_attention():
    config = build_config("dam-3b")
    assert config.num_image_tokens == 196 and config.num_vision_layers_run == 26
    text = config.text_config
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(text)
    matmul_weights = sum(module.weight.numel() for module in llm.modules() if isinstance(module, nn.Linear))
    tokens = 196 + 120
    attention = 6 * text.num_hidden_layers * 2 * tokens**2 * text.hidden_size
    flops = train_flops_per_sample(config, 120)
    assert flops["llm"] == 6 * matmul_weights * tokens + attention
    assert flops["total"] == sum(value for name, value in flops.items() if name != "total")
    # ~10.9 TFLOPs: LLM 5.1 (2.65B matmul weights x 316 tokens), global pass 1.9 (26 SigLIP layers x 729
    # tokens), regional pass 3.8 (the same layers plus as large adapters), projector 0.02.
    assert 1.0e13 < flops["total"] < 1.2e13
    assert flops["llm"] / flops["total"] == pytest.approx(0.47, abs=0.01)


def test_model_freezes_exactly_the_parameters_that_get_no_gradient():
    config = build_config("tiny")
    model = build_model(config, "cpu").train()
    model(**synthetic_batch(config, 2, 12), use_cache=False).loss.backward()
    no_gradient = {name for name, parameter in model.named_parameters() if parameter.grad is None}
    assert no_gradient  # layer -1, its adapter, post-layernorm and head
    assert set(model.freeze_unused_parameters()) == no_gradient
    assert all(p.requires_grad == (n not in no_gradient) for n, p in model.named_parameters())


def test_synthetic_batch_has_placeholders_and_answer_only_labels():
    config = build_config("tiny")
    batch = synthetic_batch(config, 3, 20)
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (3, config.num_image_tokens + 20) and batch["pixel_values"].shape == (3, 8, 16, 16)
    assert ((ids == config.image_token_id).sum(1) == config.num_image_tokens).all()
    assert (labels[ids == config.image_token_id] == -100).all()
    answer = labels != -100
    assert answer.any(1).all() and (labels[answer] == ids[answer]).all()
    assert batch["pixel_values"].abs().max() <= 1
    with pytest.raises(DamInputError, match="--text-tokens"):
        synthetic_batch(config, 1, 0)


@pytest.mark.parametrize("stage", [2, 3])
def test_fill_deepspeed_config_leaves_no_auto(stage):
    raw = json.loads((DEEPSPEED_CONFIG_DIR / f"zero{stage}.json").read_text())
    filled = fill_deepspeed_config(raw, micro_batch_size=8, bf16=True, hidden_size=2560)
    assert "auto" not in json.dumps(filled)
    assert filled["train_micro_batch_size_per_gpu"] == 8 and filled["train_batch_size"] == 8
    assert filled["gradient_accumulation_steps"] == 1 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["optimizer"]["params"] | {"torch_adam": True} == dict(
        lr=1e-4, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, torch_adam=True)
    assert filled["zero_optimization"]["stage"] == stage
    with pytest.raises(DamInputError, match="scheduler.params.warmup"):
        fill_deepspeed_config({"scheduler": {"params": {"warmup": "auto"}}}, micro_batch_size=1, bf16=False,
                              hidden_size=8)


def test_bad_modes_are_rejected():
    with pytest.raises(SystemExit) as exit_:
        main([*FAST, "--no-deepspeed", "--modes", "plain,fast"])
    assert exit_.value.code == 2


def test_dam_bench_dispatches_speed_train(capsys):
    assert bench_main(["speed-train", "--help"]) == 0
    assert "--zero-stage" in capsys.readouterr().out
