"""Regions/s of batched `describe_batch` against one region per call, same model, one process.

The one-per-call path is what the reference DAM does (one `generate` per region). Every
region generates exactly `--max-new-tokens` tokens (EOS is suppressed until then) so both
paths do the same work; greedy texts of the two are compared and the agreement printed.

    python bench/speed_describe.py --shape tiny --num-regions 32                 # CPU smoke
    python bench/speed_describe.py --shape dam-3b --device cuda --dtype bfloat16 \\
        --num-regions 64 --max-new-tokens 128 --batch-size 64                     # the GPU goal

Weights are random: the numbers measure the architecture, not a checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import time

import numpy as np
import torch

from dam import DescribeAnything
from dam.modeling import DamForConditionalGeneration
from dam.modeling.sizes import dam_3b_config, tiny_config
from dam.prompts import DEFAULT_QUERY
from dam.tokenization import build_word_level_tokenizer, words_of

logger = logging.getLogger("bench.speed_describe")


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


def timed(fn, device: str) -> tuple[object, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "dam-3b"], default="tiny")
    parser.add_argument("--num-regions", type=int, default=64)
    parser.add_argument("--sequential-regions", type=int, default=None,
                        help="regions timed one per call (default: all; fewer keeps slow baselines short)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    dtype = getattr(torch, args.dtype)
    describer = build_describer(args.shape, args.device, dtype)
    regions = synthetic_regions(args.num_regions)
    sequential_regions = regions[: args.sequential_regions or len(regions)]
    generation = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False)

    describer.describe_batch(regions[:2], batch_size=2, **dict(generation, max_new_tokens=4, min_new_tokens=4))
    sequential, sequential_s = timed(
        lambda: [describer.describe(image, mask, **generation) for image, mask in sequential_regions], args.device
    )
    batched, batched_s = timed(
        lambda: describer.describe_batch(regions, batch_size=args.batch_size, **generation), args.device
    )
    sequential_rate = len(sequential_regions) / sequential_s
    batched_rate = len(regions) / batched_s
    agree = sum(a == b for a, b in zip(sequential, batched))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device={device_name} shape={args.shape} dtype={args.dtype} new_tokens={args.max_new_tokens}")
    print(f"one region per call: {len(sequential_regions)} regions in {sequential_s:.2f} s = {sequential_rate:.2f} regions/s")
    print(f"describe_batch(batch_size={args.batch_size}): {len(regions)} regions in {batched_s:.2f} s "
          f"= {batched_rate:.2f} regions/s")
    print(f"identical greedy texts: {agree}/{len(sequential)}")
    print(f"speed-up batched / one-per-call: {batched_rate / sequential_rate:.1f}x")
    return {"sequential_rate": sequential_rate, "batched_rate": batched_rate, "agree": agree}


if __name__ == "__main__":
    main()
