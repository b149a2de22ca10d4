"""Requests/s of `dam serve` with dynamic batching against the same server with --max-batch 1.

The tiny random-weight DAM of bench/speed_describe.py is saved to a temporary folder and served
twice on 127.0.0.1 (each server its own `dam serve` process, or a thread of this one with
--in-process); the official `openai` async client sends the same `--requests` requests with
`--concurrency` in flight to each (every `--stream-every`-th one streamed), each an RGBA
cut-out of 128 px asking for exactly `--max-tokens` greedy tokens (min_tokens = max_tokens, so
both servers do the same work; with --varied-tokens, request i asks for between a quarter of
and all `--max-tokens`, so captions end at different steps). It checks that every request was
answered in full, compares the texts of the two runs (greedy batched generation gives the same
text as one request at a time, and the fast path the same text as the plain one) and prints the
ratio. The servers run with `--threads 1` by default (--server-threads). `--generation` and
`--baseline-generation` pick each server's path (dam serve --generation; default: the server's).

    python bench/speed_serve.py                   # 200 requests, 32 concurrent, 64 tokens each
    python bench/speed_serve.py --requests 24 --concurrency 8 --max-tokens 8 --in-process
    # continuous batching vs one generate per batch, both --max-batch 32:
    python bench/speed_serve.py --in-process --generation fast --baseline-generation plain --baseline-batch 32 --varied-tokens
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image

from bench.speed_describe import build_describer

logger = logging.getLogger("bench.speed_serve")


def region_urls(count: int, size: int = 128, seed: int = 0) -> list[str]:
    """`count` RGBA cut-outs (random pixels, a random box as alpha) as PNG data URLs."""
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        alpha = np.zeros((size, size), dtype=np.uint8)
        w, h = rng.integers(8, size // 2, size=2)
        x, y = rng.integers(0, size - w), rng.integers(0, size - h)
        alpha[y : y + h, x : x + w] = 255
        buffer = io.BytesIO()
        Image.fromarray(np.dstack([pixels, alpha])).save(buffer, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii"))
    return urls


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/health", timeout=5) as response:
        return json.loads(response.read())


@contextmanager
def serve(
    model: Path, max_batch: int, max_wait_ms: float, in_process: bool, threads: int, generation: str | None = None
) -> Iterator[str]:
    """A `dam serve` of `model` on 127.0.0.1; yields its base URL."""
    if in_process:
        from dam import DescribeAnything
        from dam.server import BackgroundServer, ServerSettings, create_app

        settings = ServerSettings(max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=1024, generation=generation)
        with BackgroundServer(create_app(DescribeAnything.from_pretrained(model), settings)) as server:
            yield server.url
        return
    port = _free_port()
    command = [sys.executable, "-m", "dam.cli", "serve", "--model", str(model), "--port", str(port), "--device", "cpu",
               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", "1024",
               "--threads", str(threads)] + (["--generation", generation] if generation else [])
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    _health(url)
                    break
                except OSError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"`{' '.join(command)}` did not start:\n{log.read().decode()[-2000:]}") from None
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            process.wait(30)


def tokens_of(index: int, max_tokens: int, varied: bool) -> int:
    """Tokens request `index` asks for: all `max_tokens`, or (varied) 1/4, 2/4, 3/4 or all of them."""
    return max(1, max_tokens * (1 + (index * 7) % 4) // 4) if varied else max_tokens


async def _load(
    url: str, urls: list[str], requests: int, concurrency: int, max_tokens: int, stream_every: int, varied: bool = False
) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    texts: list[str | None] = [None] * requests
    latencies: list[float] = []
    failures: list[str] = []

    async def one(index: int) -> None:
        content = [{"type": "image_url", "image_url": {"url": urls[index % len(urls)]}},
                   {"type": "text", "text": "Describe the masked region in detail."}]
        tokens = tokens_of(index, max_tokens, varied)
        settings = dict(model="dam", messages=[{"role": "user", "content": content}], max_tokens=tokens,
                        temperature=0, extra_body={"min_tokens": tokens})
        async with gate:
            start = time.perf_counter()
            try:
                if stream_every and index % stream_every == 0:
                    pieces, finish = [], None
                    async for chunk in await client.chat.completions.create(stream=True, **settings):
                        if chunk.choices:
                            pieces.append(chunk.choices[0].delta.content or "")
                            finish = chunk.choices[0].finish_reason or finish
                    if finish != "length":
                        raise RuntimeError(f"stream ended with finish_reason {finish!r}")
                    texts[index] = "".join(pieces)
                else:
                    reply = await client.chat.completions.create(**settings)
                    if reply.usage.completion_tokens != tokens:
                        raise RuntimeError(f"{reply.usage.completion_tokens} tokens instead of {tokens}")
                    texts[index] = reply.choices[0].message.content
            except Exception as error:  # counted and reported: a lost request fails the benchmark
                failures.append(f"request {index}: {type(error).__name__}: {error}")
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(index) for index in range(requests)))
    elapsed = time.perf_counter() - start
    await client.close()
    return {"texts": texts, "seconds": elapsed, "latencies": sorted(latencies), "failures": failures}


def run_load(url: str, urls: list[str], args: argparse.Namespace, requests: int) -> dict:
    return asyncio.run(_load(url, urls, requests, args.concurrency, args.max_tokens, args.stream_every, args.varied_tokens))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request (exactly)")
    parser.add_argument("--max-batch", type=int, default=32, help="the contender's --max-batch")
    parser.add_argument("--baseline-batch", type=int, default=1, help="the baseline's --max-batch")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--stream-every", type=int, default=4, help="stream every N-th request (0: none)")
    parser.add_argument("--generation", choices=["auto", "plain", "fast"], help="the contender's --generation")
    parser.add_argument("--baseline-generation", choices=["auto", "plain", "fast"],
                        help="the baseline's --generation (default: the contender's)")
    parser.add_argument("--varied-tokens", action="store_true",
                        help="request i asks for 1/4, 2/4, 3/4 or all of --max-tokens (captions of different lengths)")
    parser.add_argument("--in-process", action="store_true", help="serve from a thread of this process")
    parser.add_argument("--server-threads", type=int, default=1,
                        help="torch CPU threads of the servers (dam serve --threads; default 1, see BENCHMARKS.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "httpx2", "openai"):  # one line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)

    urls = region_urls(16)
    total_tokens = sum(tokens_of(i, args.max_tokens, args.varied_tokens) for i in range(args.requests))
    results: dict[str, dict] = {}
    threads = torch.get_num_threads()
    if args.in_process:
        torch.set_num_threads(args.server_threads)
    try:
        with tempfile.TemporaryDirectory() as folder:
            model = Path(folder) / "tiny-dam"
            build_describer("tiny", "cpu", torch.float32).save_pretrained(model)
            contenders = (("batched", args.max_batch, args.generation),
                          ("baseline", args.baseline_batch, args.baseline_generation or args.generation))
            for name, max_batch, generation in contenders:
                with serve(model, max_batch, args.max_wait_ms, args.in_process, args.server_threads, generation) as url:
                    run_load(url, urls, args, min(args.concurrency, args.requests))  # warm-up
                    before = _health(url)
                    result = run_load(url, urls, args, args.requests)
                    after = _health(url)
                batches = after["batches"] - before["batches"]
                result["mean_batch"] = args.requests / batches if batches else 0.0
                steps = after["steps"] - before["steps"]
                result["rows_per_step"] = total_tokens / steps if steps else 0.0
                result["max_batch"] = max_batch
                result["generation"] = after["generation"]
                results[name] = result
    finally:
        torch.set_num_threads(threads)

    print(f"requests={args.requests} concurrency={args.concurrency} tokens/request={args.max_tokens} "
          f"{'(varied) ' if args.varied_tokens else ''}server={'thread' if args.in_process else 'process'} device=cpu "
          f"server_threads={args.server_threads}")
    for name, result in results.items():
        answered = sum(text is not None for text in result["texts"])
        rate = answered / result["seconds"]
        p50 = statistics.median(result["latencies"])
        p95 = result["latencies"][int(0.95 * (len(result["latencies"]) - 1))]
        result["rate"] = rate
        print(f"{name:9s} --generation {result['generation']} --max-batch {result['max_batch']:<3d}: "
              f"{answered}/{args.requests} answered in {result['seconds']:.2f} s = {rate:.1f} req/s "
              f"({rate * total_tokens / args.requests:.0f} tokens/s), "
              f"mean batch {result['mean_batch']:.1f}, requests per step {result['rows_per_step']:.1f}, "
              f"latency p50 {p50:.2f} s p95 {p95:.2f} s")
        for failure in result["failures"][:5]:
            print(f"  lost: {failure}")
    lost = sum(len(result["failures"]) for result in results.values())
    same = sum(a == b for a, b in zip(results["batched"]["texts"], results["baseline"]["texts"]) if a is not None)
    ratio = results["batched"]["rate"] / results["baseline"]["rate"]
    print(f"lost requests: {lost}; identical greedy texts batched vs baseline: {same}/{args.requests}")
    print(f"throughput batched / baseline (--generation {results['baseline']['generation']} --max-batch "
          f"{args.baseline_batch}): {ratio:.2f}x{' (goal >= 4x)' if args.baseline_batch == 1 else ''}")
    return {"ratio": ratio, "lost": lost, "identical": same,
            **{f"{name}_rate": result["rate"] for name, result in results.items()},
            **{f"{name}_mean_batch": result["mean_batch"] for name, result in results.items()},
            **{f"{name}_rows_per_step": result["rows_per_step"] for name, result in results.items()}}


if __name__ == "__main__":
    main()
