"""Fast generation: continuous batching over a slot KV cache with graph-captured decode steps.

Why: through plain transformers `generate`, a 2.7B Llama-shaped LLM in bf16 on an H100 spends
35 ms per decode step at batch 1 (about 20x the memory-bandwidth bound: the time goes to
launching hundreds of small kernels from Python) and 104-120 ms at batch 32-128, and a batch
keeps paying for its finished rows until its longest caption ends.

How (one module per concern):
- `cache.SlotKVCache`: keys/values pre-allocated as (slots, kv_heads, capacity, head_dim) per
  layer; each row is one sequence stored from column 0 and written at its own position, so
  rows can end and be refilled independently, and position ids equal the plain path's.
- `steps.DecodeStep`: one token for every row through the language model's own forward
  (any transformers causal LM with sdpa/eager full attention), with a (R, 1, 1, W) mask of each
  row's columns; captured as a CUDA graph per (rows, width) bucket on CUDA, optionally
  `torch.compile`d, eager on CPU; a failing capture/compile logs a warning and runs eagerly.
- `sampling`: the settings (greedy, temperature, top-k, top-p, min/max new tokens, EOS ids)
  resolved from a GenerationConfig like `generate` does; anything else (beams, penalties,
  streamers, stopping criteria) is refused so the caller falls back to `generate`.
- `engine.FastGenerator`: prefill (left-padded, batched, the plain path's masks and positions)
  into free slots, decode, per-row stopping, refill of freed slots while prompts wait, and
  compaction of the batch when they do not. The prompt source may stay open (prompts added
  while others decode join free slots), each prompt may have its own settings (`RowChooser`,
  seeds), and a per-step callback sees each token and may end rows (stop strings, cancels).

`DescribeAnything(..., generation="fast")` uses it for `describe`, `describe_batch` and
`describe_video` (default on CUDA; see dam/describe.py), and `dam serve` for continuous
batching of requests (dam/server/continuous.py). Greedy text equals the plain path's.

Benchmark (random weights; one region per call vs batched `generate` vs this):

    python -m bench.speed_describe --shape tiny --regions 16 --new-tokens 8             # CPU smoke
    python -m bench.speed_describe --shape dam-3b --regions 256 --new-tokens 128 --device cuda
"""

from dam.generation.cache import SlotKVCache
from dam.generation.engine import FastGenerator, GenerationStats, PromptQueue, PromptSource, unsupported_reason
from dam.generation.sampling import RowChooser, SamplingSettings, choose_tokens, row_generator
from dam.generation.steps import DECODE_STEP_KINDS, DecodeStep, DecodeStepKind

__all__ = [
    "DECODE_STEP_KINDS",
    "DecodeStep",
    "DecodeStepKind",
    "FastGenerator",
    "GenerationStats",
    "PromptQueue",
    "PromptSource",
    "RowChooser",
    "SamplingSettings",
    "SlotKVCache",
    "choose_tokens",
    "row_generator",
    "unsupported_reason",
]
