"""Regions/s of the three ways to caption many regions, same random-weight model, one process.

1. one region per call through transformers `generate` (what the reference DAM does);
2. `describe_batch(generation="plain")`: left-padded batches of `--batch-size`, one `generate` each;
3. `describe_batch(generation="fast")`: dam.generation's continuous batching over a slot KV
   cache with CUDA-graph-captured decode steps (`--decode-step`), `--batch-size` slots.

Every region generates exactly `--new-tokens` tokens (min_new_tokens = max_new_tokens, so EOS
cannot end one early) so that the modes do equal work; greedy texts are compared and the
agreement printed. For each mode: regions/s, ms per decode step (plain modes: timed between
`generate`'s steps; fast: the decode loop) and the HBM roofline of a step, (LLM weight bytes +
KV-cache bytes read at that step's live batch and lengths) / the device's HBM bandwidth (known
from its name, or `--bandwidth`). The goals line checks the issue's two targets: (3) at least
50x the regions/s of (1), and the fast decode step within 3x of the roofline at 3 TB/s. The vision backbone (global + regional pass) is timed
alone over all regions, in batches of `--batch-size`, and reported as a share of each mode's
time and as TFLOP/s, its FLOPs counted from the config (matmuls, convolutions, attention).

    python -m bench.speed_describe --shape tiny --regions 16 --new-tokens 8          # CPU smoke, seconds
    python -m bench.speed_describe --shape dam-3b --regions 256 --new-tokens 128 --device cuda

The dam-3b shape (dam.modeling.sizes.dam_3b_config: SigLIP so400m-patch14-384 tower, 2.7B
Llama-shaped LLM, mlp_downsample projector) runs in bfloat16 on CUDA; its one-region-per-call
baseline is timed on `--sequential-regions` regions (default 8 there) and its rate extrapolated.
Weights are random: the numbers measure the architecture, not a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from dam import DescribeAnything
from dam.generation import DECODE_STEP_KINDS
from dam.jsonio import write_json_atomic
from dam.modeling import DamConfig, DamForConditionalGeneration
from dam.modeling.sizes import dam_3b_config, tiny_config
from dam.prompts import DEFAULT_QUERY
from dam.tokenization import build_word_level_tokenizer, words_of

GOAL_BANDWIDTH = 3.0e12
"""The issue's roofline: a decode step's bytes at 3 TB/s."""
# HBM bytes/s by device name (first match); the roofline of the device the run is on.
DEVICE_BANDWIDTHS = (("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
                     ("A100", 1.56e12))
GOAL_FAST_OVER_SEQUENTIAL = 50.0
GOAL_STEP_OVER_ROOFLINE = 3.0


def device_bandwidth(device_name: str) -> float:
    """HBM bytes/s of `device_name` (torch.cuda.get_device_name()), else the issue's 3 TB/s."""
    return next((bandwidth for key, bandwidth in DEVICE_BANDWIDTHS if key in device_name), GOAL_BANDWIDTH)

T = TypeVar("T")


def build_describer(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> DescribeAnything:
    vocab_size = 32000 if shape == "dam-3b" else 128
    tokenizer = build_word_level_tokenizer(words_of([DEFAULT_QUERY]), vocab_size=vocab_size)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    build = dam_3b_config if shape == "dam-3b" else tiny_config
    config = build(image_token_id=image_token_id, vocab_size=vocab_size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = DamForConditionalGeneration(config).to(dtype)
    with torch.no_grad():  # non-zero gates so both vision passes do real work
        for adapter in model.vision.adapters:
            adapter.attn_gate.fill_(0.1)
            adapter.mlp_gate.fill_(0.1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return DescribeAnything(model, tokenizer)


def synthetic_regions(count: int, size: int = 512, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """`count` regions over a few random images, boxes from 4 px to half the image."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(4)]
    regions = []
    for index in range(count):
        side_w, side_h = rng.integers(4, size // 2, size=2)
        x0, y0 = rng.integers(0, size - side_w), rng.integers(0, size - side_h)
        mask = np.zeros((size, size), dtype=bool)
        mask[y0 : y0 + side_h, x0 : x0 + side_w] = True
        regions.append((images[index % len(images)], mask))
    return regions


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], T], device: str) -> tuple[T, float]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


# ---- analytic counts ---------------------------------------------------------------------


def vision_flops_per_region(config: DamConfig) -> float:
    """FLOPs of the localized vision backbone for one region (both passes and the adapters).

    Counted as matmuls, convolutions and attention (2 FLOPs per multiply-add), what
    torch.utils.flop_counter counts; layer norms, activations and residual adds are left out.
    """
    vision = config.vision_config
    width, inner = vision.hidden_size, vision.intermediate_size
    tokens = (vision.image_size // vision.patch_size) ** 2
    # RGB (3 channels) and mask (1 channel) patch embeddings.
    embed = 2 * tokens * width * 4 * vision.patch_size**2
    # q, k, v, o projections; scores and weighted values; the two MLP matmuls.
    layer = 2 * tokens * 4 * width * width + 2 * 2 * tokens * tokens * width + 2 * tokens * 2 * width * inner
    # Cross-attention to the global pass (q, o on the crop's tokens; k, v on the context's) + MLP.
    adapter = layer
    layers = config.num_vision_layers_run
    if config.vision_mode in ("full_only", "crop_only"):
        return float(embed + layers * layer)
    if config.vision_mode == "full_and_crop":
        return float(2 * (embed + layers * layer))
    return float(embed + layers * layer + embed + layers * (layer + adapter))


def decode_weight_bytes(language_model: nn.Module) -> int:
    """Bytes of LLM weights a decode step reads: all but the input embedding table, of which a
    step reads one row per sequence (unless it is tied to the output head)."""
    embedding = language_model.get_input_embeddings().weight
    head = language_model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    total = sum(p.numel() * p.element_size() for p in language_model.parameters())
    return total if tied else total - embedding.numel() * embedding.element_size()


def kv_bytes_per_token(language_model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token holds over all layers of the LLM."""
    config = language_model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass
class Roofline:
    weight_bytes: int
    kv_bytes_per_token: int
    bandwidth: float

    def ms_per_step(self, kv_tokens_per_step: float) -> float:
        return 1e3 * (self.weight_bytes + kv_tokens_per_step * self.kv_bytes_per_token) / self.bandwidth


# ---- timing the plain path's decode steps --------------------------------------------------


class StepClock(StoppingCriteria):
    """Times `generate`'s decode steps: it is called once per generated token, after the
    step's forward, so the gaps between calls of one `generate` are its decode steps (its
    first call comes after the prefill, which is thereby left out)."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.steps = 0
        self.seconds = 0.0
        self._last: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        _sync(self.device)
        now = time.perf_counter()
        if input_ids.shape[1] > 1 and self._last is not None:  # input_ids: the new tokens so far
            self.steps += 1
            self.seconds += now - self._last
        self._last = now
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.seconds / self.steps if self.steps else 0.0


# ---- the benchmark -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "dam-3b"], default="tiny")
    parser.add_argument("--regions", "--num-regions", dest="regions", type=int, default=64)
    parser.add_argument("--sequential-regions", type=int, default=None,
                        help="regions timed one per call (default: all for tiny, 8 for dam-3b)")
    parser.add_argument("--batch-size", type=int, default=64, help="regions per generate (plain) / decode slots (fast)")
    parser.add_argument("--new-tokens", "--max-new-tokens", dest="new_tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--decode-step", choices=DECODE_STEP_KINDS, default="auto", help="the fast path's decode step")
    parser.add_argument("--bandwidth", type=float, default=None,
                        help="HBM bytes/s of the device's roofline (default: from the device name, e.g. H200 4.8e12, "
                             "H100 SXM 3.35e12; else 3e12); the goal's roofline is always at 3 TB/s")
    parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    say = print  # the report is this script's output (stdout); library messages go to logging

    dtype_name = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    dtype = getattr(torch, dtype_name)
    describer = build_describer(args.shape, args.device, dtype)
    plain = DescribeAnything(describer.model, describer.tokenizer, generation="plain")
    fast = DescribeAnything(describer.model, describer.tokenizer, generation="fast", decode_step=args.decode_step)
    model = describer.model
    regions = synthetic_regions(args.regions)
    sequential_count = args.sequential_regions or (min(8, len(regions)) if args.shape == "dam-3b" else len(regions))
    sequential_regions = regions[:sequential_count]
    tokens = args.new_tokens
    generation = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    prompt_length = len(describer.processor.prompt_ids(None, 1))

    # Warm-up: kernels, allocator; for the fast path every (rows, width) graph it will replay.
    plain.describe_batch(regions[:2], batch_size=2, **dict(generation, max_new_tokens=4, min_new_tokens=4))
    fast.describe_batch(regions, batch_size=args.batch_size, **generation)

    sequential_clock = StepClock(args.device)
    sequential, sequential_s = timed(
        lambda: [
            plain.describe(image, mask, stopping_criteria=StoppingCriteriaList([sequential_clock]), **generation)
            for image, mask in sequential_regions
        ],
        args.device,
    )
    batched_clock = StepClock(args.device)
    batched, batched_s = timed(
        lambda: plain.describe_batch(
            regions, batch_size=args.batch_size, stopping_criteria=StoppingCriteriaList([batched_clock]), **generation
        ),
        args.device,
    )
    fast_texts, fast_s = timed(
        lambda: fast.describe_batch(regions, batch_size=args.batch_size, **generation), args.device
    )
    assert fast._fast is not None, "the fast path did not run"
    stats = fast._fast.stats

    # The vision backbone alone (both passes), over the same regions in the same batches.
    pixel_batches = [
        plain._inputs([plain._request(item, None) for item in regions[start : start + args.batch_size]])
        for start in range(0, len(regions), args.batch_size)
    ]
    with torch.no_grad():
        model.vision(pixel_batches[0]["pixel_values"])  # warm-up
        _, vision_s = timed(
            lambda: [model.vision(batch["pixel_values"]) for batch in pixel_batches],
            args.device,
        )
    vision_tflops = vision_flops_per_region(model.config) * len(regions) / vision_s / 1e12

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bandwidth = args.bandwidth or device_bandwidth(device_name)
    roofline = Roofline(decode_weight_bytes(model.language_model), kv_bytes_per_token(model.language_model, dtype),
                        bandwidth)
    goal_roofline = Roofline(roofline.weight_bytes, roofline.kv_bytes_per_token, GOAL_BANDWIDTH)
    # Plain modes: every row live for all steps, a step reads prompt + tokens so far (mean P + T/2).
    plain_context = prompt_length + tokens / 2
    batches = -(-len(regions) // args.batch_size)
    rates = {
        "sequential": len(sequential_regions) / sequential_s,
        "batched": len(regions) / batched_s,
        "fast": len(regions) / fast_s,
    }
    say(f"device={device_name} shape={args.shape} dtype={dtype_name} regions={len(regions)} "
        f"prompt={prompt_length} tokens new_tokens={tokens} batch_size={args.batch_size} "
        f"decode_step={fast._fast.step_kind}")
    say(f"roofline assumes {bandwidth / 1e12:.2f} TB/s HBM (--bandwidth); a step reads the LLM weights "
        f"({roofline.weight_bytes / 1e9:.3g} GB) and the live rows' KV cache "
        f"({roofline.kv_bytes_per_token / 1e3:.3g} kB per token)")
    extrapolated = f" (rate of {len(sequential_regions)} of the {len(regions)})" if len(sequential_regions) < len(regions) else ""
    say(f"(1) one region per call{extrapolated}:  {len(sequential_regions)} regions in {sequential_s:.2f} s = "
        f"{rates['sequential']:.2f} regions/s, {sequential_clock.ms_per_step:.2f} ms/decode step (batch 1), "
        f"roofline {roofline.ms_per_step(plain_context):.3g} ms/step")
    say(f"(2) batched generate:     {len(regions)} regions in {batched_s:.2f} s = {rates['batched']:.2f} regions/s, "
        f"{batched_clock.ms_per_step:.2f} ms/decode step (batch {len(regions) / batches:.1f}), "
        f"roofline {roofline.ms_per_step(len(regions) / batches * plain_context):.3g} ms/step")
    say(f"(3) fast:                 {len(regions)} regions in {fast_s:.2f} s = {rates['fast']:.2f} regions/s, "
        f"{stats.ms_per_step:.2f} ms/decode step (mean live batch {stats.mean_live_batch:.1f}), "
        f"roofline {roofline.ms_per_step(stats.mean_kv_tokens_per_step):.3g} ms/step; "
        f"{stats.decode_steps} steps, {stats.prefill_calls} prefills ({stats.prefill_seconds:.2f} s), "
        f"{stats.refills} refills, {stats.compactions} compactions, {len(stats.step_shapes)} step shapes")
    say(f"vision backbone alone: {vision_s:.2f} s for {len(regions)} regions, "
        f"{vision_flops_per_region(model.config) / 1e9:.3g} GFLOP/region, {vision_tflops:.3g} TFLOP/s; "
        f"share of (2) {vision_s / batched_s:.0%}, of (3) {vision_s / fast_s:.0%}")
    agree_batched = sum(a == b for a, b in zip(sequential, batched))
    agree_fast = sum(a == b for a, b in zip(batched, fast_texts))
    say(f"identical greedy texts: (1) vs (2) {agree_batched}/{len(sequential)}, (2) vs (3) {agree_fast}/{len(regions)}")
    say(f"speed-up (3)/(1): {rates['fast'] / rates['sequential']:.1f}x   "
        f"(3)/(2): {rates['fast'] / rates['batched']:.1f}x   (2)/(1): {rates['batched'] / rates['sequential']:.1f}x")
    speedup = rates["fast"] / rates["sequential"]
    step_over_roofline = stats.ms_per_step / goal_roofline.ms_per_step(stats.mean_kv_tokens_per_step)
    say(f"goals: (3)/(1) {speedup:.1f}x (goal >= {GOAL_FAST_OVER_SEQUENTIAL:.0f}x: "
        f"{'met' if speedup >= GOAL_FAST_OVER_SEQUENTIAL else 'not met'}); fast decode step / roofline at 3 TB/s "
        f"{step_over_roofline:.2f} at mean live batch {stats.mean_live_batch:.1f} (goal <= {GOAL_STEP_OVER_ROOFLINE:.0f} "
        f"at batch 64: {'met' if step_over_roofline <= GOAL_STEP_OVER_ROOFLINE else 'not met'})")
    result = {
        "device": device_name,
        "regions": len(regions),
        "sequential_regions": len(sequential_regions),
        "new_tokens": tokens,
        "batch_size": args.batch_size,
        "decode_step": fast._fast.step_kind,
        "sequential_rate": rates["sequential"],
        "batched_rate": rates["batched"],
        "fast_rate": rates["fast"],
        "agree": agree_batched,
        "agree_fast": agree_fast,
        "fast_ms_per_step": stats.ms_per_step,
        "batched_ms_per_step": batched_clock.ms_per_step,
        "sequential_ms_per_step": sequential_clock.ms_per_step,
        "fast_roofline_ms_per_step": roofline.ms_per_step(stats.mean_kv_tokens_per_step),
        "vision_seconds": vision_s,
        "vision_tflops": vision_tflops,
        "vision_share_fast": vision_s / fast_s,
        "batched_roofline_ms_per_step": roofline.ms_per_step(len(regions) / batches * plain_context),
        "sequential_roofline_ms_per_step": roofline.ms_per_step(plain_context),
        "mean_live_batch": stats.mean_live_batch,
        "vision_share_batched": vision_s / batched_s,
        "prompt_tokens": prompt_length,
        "dtype": dtype_name,
        "bandwidth": bandwidth,
        "fast_over_sequential": speedup,
        "fast_step_over_goal_roofline": step_over_roofline,
        "sequential_steps": sequential_clock.steps,
        "batched_steps": batched_clock.steps,
    }
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
