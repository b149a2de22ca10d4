"""Regions/s of the three ways to caption many regions, same random-weight model, one process.

1. one region per call through transformers `generate` (what the reference DAM does);
2. `describe_batch(generation="plain")`: left-padded batches of `--batch-size`, one `generate` each;
2b. (`--modes ...,static,...`) the same with transformers' static KV cache, whose decode step
   transformers compiles on CUDA: the library's own answer to what the fast path does;
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


MODES = ("sequential", "batched", "static", "fast")
DEFAULT_MODES = ("sequential", "batched", "fast")
LABELS = {"sequential": "(1) one region per call", "batched": "(2) batched generate",
          "static": "(2b) batched generate, static cache", "fast": "(3) fast"}


@dataclass
class ModeResult:
    texts: list[str]
    regions: int
    seconds: float
    ms_per_step: float
    steps: int
    live_batch: float  # rows per decode step
    kv_tokens_per_step: float  # KV-cache tokens a decode step reads
    detail: str = ""

    @property
    def rate(self) -> float:
        return self.regions / self.seconds


def run_mode(mode: str, plain: DescribeAnything, fast: DescribeAnything, regions: list, sequential_count: int,
             batch_size: int, generation: dict[str, Any], prompt_length: int, device: str) -> ModeResult:
    """Time one mode. Plain modes keep every row live for every step, so a step reads the prompt
    and the tokens so far: P + T/2 tokens per row on average."""
    tokens = generation["max_new_tokens"]
    if mode == "fast":
        texts, seconds = timed(lambda: fast.describe_batch(regions, batch_size=batch_size, **generation), device)
        assert fast._fast is not None, "the fast path did not run"
        stats = fast._fast.stats
        detail = (f"; {stats.decode_steps} steps, {stats.prefill_calls} prefills ({stats.prefill_seconds:.2f} s), "
                  f"{stats.refills} refills, {stats.compactions} compactions, {len(stats.step_shapes)} step shapes")
        return ModeResult(texts, len(regions), seconds, stats.ms_per_step, stats.decode_steps, stats.mean_live_batch,
                          stats.mean_kv_tokens_per_step, detail)
    clock = StepClock(device)
    criteria = StoppingCriteriaList([clock])
    if mode == "sequential":
        items = regions[:sequential_count]
        texts, seconds = timed(
            lambda: [plain.describe(image, mask, stopping_criteria=criteria, **generation) for image, mask in items],
            device,
        )
        rows = 1.0
    else:
        extra = dict(cache_implementation="static") if mode == "static" else {}
        items = regions
        texts, seconds = timed(
            lambda: plain.describe_batch(items, batch_size=batch_size, stopping_criteria=criteria, **generation, **extra),
            device,
        )
        rows = len(items) / -(-len(items) // batch_size)
    return ModeResult(texts, len(items), seconds, clock.ms_per_step, clock.steps, rows,
                      rows * (prompt_length + tokens / 2))


def warm_up(modes: list[str], plain: DescribeAnything, fast: DescribeAnything, regions: list, batch_size: int,
            generation: dict[str, Any]) -> None:
    """Kernels and allocator; for the fast path every (rows, width) graph it will replay; for the
    static cache, transformers' compiled decode step at the timed batch shape."""
    short = dict(generation, max_new_tokens=4, min_new_tokens=4)
    plain.describe_batch(regions[:2], batch_size=2, **short)
    if "static" in modes:
        plain.describe_batch(regions[:batch_size], batch_size=batch_size, cache_implementation="static", **short)
    if "fast" in modes:
        fast.describe_batch(regions, batch_size=batch_size, **generation)


def parse_modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"modes {text!r}: choose from {', '.join(MODES)}")
    return [mode for mode in MODES if mode in modes]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "dam-3b"], default="tiny")
    parser.add_argument("--regions", "--num-regions", dest="regions", type=int, default=64)
    parser.add_argument("--sequential-regions", type=int, default=None,
                        help="regions timed one per call (default: all for tiny, 8 for dam-3b)")
    parser.add_argument("--batch-size", type=int, default=64, help="regions per generate (plain) / decode slots (fast)")
    parser.add_argument("--new-tokens", "--max-new-tokens", dest="new_tokens", type=int, default=128)
    parser.add_argument("--modes", type=parse_modes, default=list(DEFAULT_MODES),
                        help=f"comma-separated, from {', '.join(MODES)} (default {','.join(DEFAULT_MODES)}); "
                             "static: transformers' static KV cache, whose decode step it compiles on CUDA")
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
    tokens = args.new_tokens
    generation = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    prompt_length = len(describer.processor.prompt_ids(None, 1))

    warm_up(args.modes, plain, fast, regions, args.batch_size, generation)
    results = {mode: run_mode(mode, plain, fast, regions, sequential_count, args.batch_size, generation,
                              prompt_length, args.device) for mode in args.modes}

    # The vision backbone alone (both passes), over the same regions in the same batches.
    pixel_batches = [
        plain._inputs([plain._request(item, None) for item in regions[start : start + args.batch_size]])
        for start in range(0, len(regions), args.batch_size)
    ]
    with torch.no_grad():
        model.vision(pixel_batches[0]["pixel_values"])  # warm-up
        _, vision_s = timed(lambda: [model.vision(batch["pixel_values"]) for batch in pixel_batches], args.device)
    vision_tflops = vision_flops_per_region(model.config) * len(regions) / vision_s / 1e12

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bandwidth = args.bandwidth or device_bandwidth(device_name)
    roofline = Roofline(decode_weight_bytes(model.language_model), kv_bytes_per_token(model.language_model, dtype),
                        bandwidth)
    goal_roofline = Roofline(roofline.weight_bytes, roofline.kv_bytes_per_token, GOAL_BANDWIDTH)
    decode_step = fast._fast.step_kind if fast._fast is not None else "-"
    say(f"device={device_name} shape={args.shape} dtype={dtype_name} regions={len(regions)} "
        f"prompt={prompt_length} tokens new_tokens={tokens} batch_size={args.batch_size} decode_step={decode_step}")
    say(f"roofline assumes {bandwidth / 1e12:.2f} TB/s HBM (--bandwidth); a step reads the LLM weights "
        f"({roofline.weight_bytes / 1e9:.3g} GB) and the live rows' KV cache "
        f"({roofline.kv_bytes_per_token / 1e3:.3g} kB per token)")
    report: dict[str, Any] = {"device": device_name, "shape": args.shape, "dtype": dtype_name, "regions": len(regions),
                              "new_tokens": tokens, "batch_size": args.batch_size, "prompt_tokens": prompt_length,
                              "decode_step": decode_step, "bandwidth": bandwidth}
    for mode, result in results.items():
        partial = f" (rate of {result.regions} of the {len(regions)})" if result.regions < len(regions) else ""
        say(f"{LABELS[mode]}{partial}: {result.regions} regions in {result.seconds:.2f} s = {result.rate:.2f} regions/s, "
            f"{result.ms_per_step:.2f} ms/decode step (mean batch {result.live_batch:.1f}), "
            f"roofline {roofline.ms_per_step(result.kv_tokens_per_step):.3g} ms/step{result.detail}")
        report[mode] = {"regions": result.regions, "seconds": result.seconds, "rate": result.rate,
                        "ms_per_step": result.ms_per_step, "steps": result.steps, "mean_batch": result.live_batch,
                        "roofline_ms_per_step": roofline.ms_per_step(result.kv_tokens_per_step),
                        "goal_roofline_ms_per_step": goal_roofline.ms_per_step(result.kv_tokens_per_step)}
    shares = ", ".join(f"of {LABELS[mode].split()[0]} {vision_s * results[mode].regions / len(regions) / results[mode].seconds:.0%}"
                       for mode in results if mode != "sequential")
    say(f"vision backbone alone: {vision_s:.2f} s for {len(regions)} regions, "
        f"{vision_flops_per_region(model.config) / 1e9:.3g} GFLOP/region, {vision_tflops:.3g} TFLOP/s; share {shares}")
    report["vision"] = {"seconds": vision_s, "tflops": vision_tflops}

    # Greedy texts of each mode against the mode before it, on the regions both captioned.
    pairs = list(zip(list(results)[:-1], list(results)[1:]))
    agreement = {f"{a}_{b}": sum(x == y for x, y in zip(results[a].texts, results[b].texts)) for a, b in pairs}
    if pairs:
        say("identical greedy texts: " + ", ".join(
            f"{LABELS[a].split()[0]} vs {LABELS[b].split()[0]} {agreement[f'{a}_{b}']}/"
            f"{min(results[a].regions, results[b].regions)}" for a, b in pairs))
    report["identical_texts"] = agreement
    later_over_earlier = [(a, b) for a in results for b in results if MODES.index(a) > MODES.index(b)]
    ratios = {f"{a}_over_{b}": results[a].rate / results[b].rate for a, b in later_over_earlier}
    if ratios:
        say("speed-up: " + "   ".join(f"{LABELS[a].split()[0]}/{LABELS[b].split()[0]}: {ratios[f'{a}_over_{b}']:.1f}x"
                                       for a, b in later_over_earlier))
    report["speedups"] = ratios
    if "fast" in results and "sequential" in results:
        fast_result = results["fast"]
        speedup = ratios["fast_over_sequential"]
        step_over_roofline = fast_result.ms_per_step / goal_roofline.ms_per_step(fast_result.kv_tokens_per_step)
        say(f"goals: (3)/(1) {speedup:.1f}x (goal >= {GOAL_FAST_OVER_SEQUENTIAL:.0f}x: "
            f"{'met' if speedup >= GOAL_FAST_OVER_SEQUENTIAL else 'not met'}); fast decode step / roofline at 3 TB/s "
            f"{step_over_roofline:.2f} at mean batch {fast_result.live_batch:.1f} "
            f"(goal <= {GOAL_STEP_OVER_ROOFLINE:.0f} at batch 64: "
            f"{'met' if step_over_roofline <= GOAL_STEP_OVER_ROOFLINE else 'not met'})")
        report["goals"] = {"fast_over_sequential": speedup, "fast_step_over_goal_roofline": step_over_roofline}
    if args.json:
        write_json_atomic(args.json, report)
    return report


if __name__ == "__main__":
    main()
