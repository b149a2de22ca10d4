"""Training speed of a DAM: samples/s, tokens/s and MFU, without and with gradient checkpointing.

Trains a randomly initialised DAM on one synthetic batch (focal-prompt pixels plus a prompt of
`--text-tokens` text tokens around one image slot, loss on the answer only) with the optimizer
setup of a real fine-tune: DeepSpeed ZeRO (configs/deepspeed/zero2.json with its "auto"
values filled in) or, with `--no-deepspeed`, a plain torch AdamW loop. Each mode (gradient
checkpointing off, on) gets a fresh model with the same seed and is timed after warm-up steps
in the same process, so the printed checkpointing / plain ratio compares like with like. Data
loading is not measured: the same batch is fed every step.

MFU follows PaLM's definition (Chowdhery et al., 2022, appendix B): model FLOPs per sample /
step time / peak dense FLOPS, with model FLOPs = 6 x (multiply-accumulate weights) x tokens for
every matmul (2 forward, 4 backward) plus 3 x 2 x 2 x T^2 x d per attention layer, counted for
both vision passes (global and regional, adapters included), the projector and the LLM
(lm_head included) over visual + text tokens. Recomputation under gradient checkpointing is
not counted (that is the point of *model* FLOPs), attention is counted as full T^2 even where
causal, and the patch embeddings are counted at 6x although the pixels need no gradient.
Norms, softmax, activations and the loss are not counted. The tower's layers after
`vision_feature_layer` (and their adapters, post-layernorm and head) never run, so they are
frozen and neither trained nor counted.

    python -m bench.speed_train --size tiny --steps 5                            # CPU smoke
    python -m bench.speed_train --size tiny --steps 5 --no-deepspeed             # without DeepSpeed
    python -m bench.speed_train --size dam-3b --steps 20 --warmup-steps 5 \\
        --json dam3b_train.json                                                   # the H100 goal

On CUDA the defaults are bf16 and a peak of 989 TFLOPS on H100/H200 (312 on A100); elsewhere
give `--peak-tflops` to get an MFU. Weights are random: the numbers measure the architecture.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm import tqdm

from dam.distributed import set_single_process_env
from dam.errors import DamInputError
from dam.jsonio import write_json_atomic
from dam.modeling import DamConfig, DamForConditionalGeneration
from dam.modeling.sizes import dam_3b_config, tiny_config

logger = logging.getLogger("bench.speed_train")

DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
MODES = ("plain", "checkpointing")
MFU_GOAL = 0.45
# Dense bf16 tensor-core peaks (TFLOPS, no sparsity) looked up in torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
SIZES = {"tiny": dict(vocab_size=99, batch_size=4), "dam-3b": dict(vocab_size=32000, batch_size=8)}


def build_config(size: str) -> DamConfig:
    """The named size with its last vocabulary id as the image placeholder."""
    if size not in SIZES:
        raise DamInputError(f"--size {size!r} is not one of {', '.join(SIZES)}")
    vocab_size = SIZES[size]["vocab_size"]
    build = dam_3b_config if size == "dam-3b" else tiny_config
    return build(image_token_id=vocab_size - 1, vocab_size=vocab_size)


def build_model(config: DamConfig, device: str, seed: int = 0) -> DamForConditionalGeneration:
    """A random DAM in float32 on `device`, with non-zero gates so the adapters do real work."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DamForConditionalGeneration(config)
    with torch.no_grad():
        for adapter in model.vision.adapters:
            adapter.attn_gate.fill_(0.1)
            adapter.mlp_gate.fill_(0.1)
    return model


def enable_gradient_checkpointing(model: DamForConditionalGeneration) -> None:
    """Non-reentrant checkpointing of every SigLIP and LLM layer (transformers 5 name, or 4.x's)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _text_ids(count: int, config: DamConfig, generator: torch.Generator) -> torch.Tensor:
    """Random ids in [0, vocab) that are never the image placeholder."""
    ids = torch.randint(0, config.text_config.vocab_size - 1, (count,), generator=generator)
    return ids + (ids >= config.image_token_id).long()


def synthetic_batch(
    config: DamConfig, batch_size: int, text_tokens: int, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """One training batch shaped like a DAM fine-tune's, one frame per sample.

    Per sample: a short system prefix, the frame's `num_image_tokens` placeholders, the
    query, then the answer; `labels` are -100 everywhere but on the answer. `text_tokens`
    counts prefix + query + answer, so the LLM sees num_image_tokens + text_tokens positions.
    """
    if text_tokens < 1:
        raise DamInputError(f"--text-tokens must be at least 1 (the answer), got {text_tokens}")
    generator = torch.Generator().manual_seed(seed)
    prefix = min(4, text_tokens // 4)
    query = min(16, text_tokens // 4)
    visual = config.num_image_tokens
    rows = []
    for _ in range(batch_size):
        text = _text_ids(text_tokens, config, generator)
        image = torch.full((visual,), config.image_token_id, dtype=torch.long)
        rows.append(torch.cat([text[:prefix], image, text[prefix:]]))
    input_ids = torch.stack(rows)  # (B, visual + text_tokens)
    labels = input_ids.clone()
    labels[:, : prefix + visual + query] = -100
    side = config.vision_config.image_size
    pixel_values = torch.rand(batch_size, 8, side, side, generator=generator) * 2 - 1  # (B, 8, S, S)
    batch = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        labels=labels,
        pixel_values=pixel_values,
    )
    return {name: tensor.to(device) for name, tensor in batch.items()}


def train_flops_per_sample(config: DamConfig, text_tokens: int) -> dict[str, int]:
    """Model FLOPs of one training step per sample (forward + backward, one frame), by part.

    Convention (PaLM's MFU): 6 x multiply-accumulates for every weight matmul and
    3 x (QK^T + AV) = 3 x 2 x 2 x T_q x T_k x d for every attention; no recomputation; norms,
    softmax, activations and the loss not counted. The LLM is assumed Llama-shaped (gated MLP,
    grouped k/v heads allowed), as all DAM LLMs are. Keys: vision_global, vision_regional,
    projector, llm, total.
    """
    vision, text = config.vision_config, config.text_config
    width, inner, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    patches = config.patch_grid**2  # tokens per vision pass
    layers = config.num_vision_layers_run

    def attention(queries: int, keys: int, dim: int) -> int:
        return 2 * queries * keys * dim  # QK^T and AV

    embed = patches * (3 + 1) * patch * patch * width  # image and mask patch embeddings
    encoder_layer = patches * (4 * width * width + 2 * width * inner) + attention(patches, patches, width)
    # Adapter: q/out over the crop's tokens, k/v over the global context (also `patches` long).
    adapter = patches * (4 * width * width + 2 * width * inner) + attention(patches, patches, width)
    vision_global = embed + layers * encoder_layer
    vision_regional = vision_global + layers * adapter

    llm_width = text.hidden_size
    if config.projector_type == "mlp_downsample":
        projector = config.num_image_tokens * (4 * width * llm_width + llm_width * llm_width)
    else:
        projector = patches * (width * llm_width + llm_width * llm_width)

    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or llm_width // heads
    tokens = config.num_image_tokens + text_tokens
    decoder_layer = tokens * (
        2 * llm_width * heads * head_dim  # q, o
        + 2 * llm_width * kv_heads * head_dim  # k, v
        + 3 * llm_width * text.intermediate_size  # gate, up, down
    ) + attention(tokens, tokens, heads * head_dim)
    llm = text.num_hidden_layers * decoder_layer + tokens * llm_width * text.vocab_size  # + lm_head

    parts = dict(vision_global=vision_global, vision_regional=vision_regional, projector=projector, llm=llm)
    flops = {name: 6 * macs for name, macs in parts.items()}
    flops["total"] = sum(flops.values())
    return flops


def fill_deepspeed_config(
    config: dict[str, Any],
    *,
    micro_batch_size: int,
    bf16: bool,
    hidden_size: int,
    world_size: int = 1,
    lr: float = 1e-4,
) -> dict[str, Any]:
    """A copy of a DeepSpeed config with every "auto" replaced by the benchmark's value.

    The values are those of a DAM fine-tune step: no gradient accumulation, AdamW
    (0.9, 0.999), eps 1e-8, no weight decay, clipping at 1.0; bucket sizes as DeepSpeed's
    defaults (reduce) or transformers' rules (ZeRO-3 prefetch and persistence).
    """
    values: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": 1.0,
        "bf16.enabled": bf16,
        "fp16.enabled": False,
        "optimizer.params.lr": lr,
        "optimizer.params.betas": [0.9, 0.999],
        "optimizer.params.eps": 1e-8,
        "optimizer.params.weight_decay": 0.0,
        "zero_optimization.reduce_bucket_size": int(5e8),
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }

    def fill(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {key: fill(value, f"{path}.{key}" if path else key) for key, value in node.items()}
        if node == "auto":
            if path not in values:
                raise DamInputError(f'DeepSpeed config key {path!r} is "auto" but the benchmark has no value for it; '
                                    f"set it in the JSON")
            return values[path]
        return node

    return fill(config, "")


def detect_peak_tflops(device: str, dtype: torch.dtype) -> float | None:
    """The dense bf16 peak of a known GPU, or None (CPU, fp32, unknown GPU)."""
    if not device.startswith("cuda") or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def init_single_process_distributed() -> bool:
    """Initialise torch.distributed for one process as DeepSpeed expects; True if this call did."""
    import deepspeed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return False
    set_single_process_env()
    deepspeed.init_distributed(verbose=False)
    return True


@dataclass
class ModeResult:
    """One mode's measurement (None where it does not apply or the run failed)."""

    mode: str
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    step_ms: float | None = None
    tflops: float | None = None
    mfu: float | None = None
    peak_memory_gib: float | None = None
    final_loss: float | None = None
    error: str | None = None


StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _deepspeed_step_fn(model: nn.Module, ds_config: dict[str, Any]) -> tuple[StepFn, Callable[[], None]]:
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds_config
    )
    logger.info("DeepSpeed engine: ZeRO stage %d, parameters in %s", engine.zero_optimization_stage(),
                next(engine.module.parameters()).dtype)

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = engine(**batch, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def close() -> None:
        if hasattr(engine, "destroy"):
            engine.destroy()

    return step, close


def _torch_step_fn(model: nn.Module, dtype: torch.dtype, device: str) -> tuple[StepFn, Callable[[], None]]:
    """AdamW on float32 weights, bf16 autocast when asked: the usual torch mixed precision."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    fused = device.startswith("cuda")
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=fused)
    autocast = dtype == torch.bfloat16

    def step(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def close() -> None:  # drop gradients an interrupted (out-of-memory) step left behind
        optimizer.zero_grad(set_to_none=True)

    return step, close


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_mode(
    mode: str,
    config: DamConfig,
    args: argparse.Namespace,
    flops_per_sample: int,
    peak_tflops: float | None,
) -> ModeResult:
    """Build a fresh model, set the mode up, warm up, time `args.steps` steps."""
    device, dtype = args.device, args.dtype
    model = build_model(config, device, seed=args.seed)
    frozen = model.freeze_unused_parameters()
    logger.info("%s: %d trainable parameters (%d unused tensors frozen)", mode,
                sum(p.numel() for p in model.parameters() if p.requires_grad), len(frozen))
    if mode == "checkpointing":
        enable_gradient_checkpointing(model)
    model.train()
    model_ref = weakref.ref(model)
    batch = synthetic_batch(config, args.batch_size, args.text_tokens, device, seed=args.seed)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    result = ModeResult(mode)
    step = close = loss = None
    try:
        if args.no_deepspeed:
            step, close = _torch_step_fn(model, dtype, device)
        else:
            step, close = _deepspeed_step_fn(model, args.ds_config)
        for _ in tqdm(range(args.warmup_steps), desc=f"{mode} warm-up", leave=False):
            step(batch)
        _synchronize(device)
        start = time.perf_counter()
        for _ in tqdm(range(args.steps), desc=f"{mode} timed", leave=False):
            loss = step(batch)
        _synchronize(device)
        elapsed = time.perf_counter() - start
    except torch.OutOfMemoryError:
        result.error = f"out of memory at --batch-size {args.batch_size}"
        logger.warning("%s: %s", mode, result.error)
    else:
        result.samples_per_s = args.batch_size * args.steps / elapsed
        result.tokens_per_s = result.samples_per_s * (config.num_image_tokens + args.text_tokens)
        result.step_ms = 1000 * elapsed / args.steps
        result.tflops = flops_per_sample * result.samples_per_s / 1e12
        result.mfu = result.tflops / peak_tflops if peak_tflops else None
        result.final_loss = float(loss)
    if device.startswith("cuda"):
        result.peak_memory_gib = torch.cuda.max_memory_allocated(torch.device(device)) / 2**30
    if close is not None:
        close()
    del model, batch, step, close, loss  # the closures hold the model and its optimizer
    _release(device)
    if model_ref() is not None:
        logger.warning("%s: the model outlived its run; the next mode's peak memory may include it", mode)
    return result


def _si(value: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f}"


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_report(report: dict[str, Any]) -> None:
    flops = report["flops_per_sample"]
    print(f"DAM training speed: size={report['size']} engine={report['engine']} dtype={report['dtype']} "
          f"batch={report['batch_size']} tokens/sample={report['visual_tokens']} visual + "
          f"{report['text_tokens']} text = {report['llm_tokens']} LLM")
    print(f"device={report['device']} peak={_format(report['peak_tflops'], '.0f')} TFLOPS")
    print("model FLOPs per sample (fwd+bwd): " + ", ".join(
        f"{name} {_si(value)}" for name, value in flops.items()))
    header = f"{'mode':<14}{'samples/s':>11}{'tokens/s':>11}{'step ms':>10}{'TFLOPS':>9}{'MFU':>8}{'peak GiB':>10}"
    print(header)
    print("-" * len(header))
    for name, row in report["modes"].items():
        if row["error"]:
            print(f"{name:<14}{row['error']}")
            continue
        mfu = "n/a" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
        print(f"{name:<14}{row['samples_per_s']:>11.2f}{row['tokens_per_s']:>11.0f}{row['step_ms']:>10.1f}"
              f"{row['tflops']:>9.3g}{mfu:>8}{_format(row['peak_memory_gib'], '.1f'):>10}")
    ratio = report["checkpointing_over_plain"]
    if ratio is not None:
        print(f"throughput checkpointing / plain: {ratio:.2f}x")
    met = report["mfu_goal_met"]
    best = report["best_mfu"]
    goal = f"MFU goal >= {100 * MFU_GOAL:.0f}%: "
    if met is None:
        print(goal + "n/a (no peak TFLOPS; pass --peak-tflops)")
    else:
        print(goal + ("met" if met else "not met") + f" (best {100 * best['mfu']:.1f}% with {best['mode']})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-device micro-batch (default: 8 for dam-3b, 4 for tiny)")
    parser.add_argument("--text-tokens", type=int, default=120, help="text tokens per sample (prompt + answer)")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before timing")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--zero-stage", type=int, choices=[2, 3], default=2,
                        help="DeepSpeed ZeRO stage (configs/deepspeed/zero<stage>.json)")
    parser.add_argument("--deepspeed-config", type=Path, default=None,
                        help="DeepSpeed JSON to use instead of configs/deepspeed/zero<stage>.json")
    parser.add_argument("--no-deepspeed", action="store_true", help="plain torch AdamW loop instead of DeepSpeed")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak dense TFLOPS of the device for MFU (default: known GPUs in bf16)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated: plain (no gradient checkpointing), checkpointing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    args.modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in args.modes if mode not in MODES]
    if unknown or not args.modes:
        parser.error(f"--modes takes a comma-separated subset of {', '.join(MODES)}, got {unknown or 'nothing'}")
    if args.batch_size is None:
        args.batch_size = SIZES[args.size]["batch_size"]
    for name in ("batch_size", "steps", "text_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup_steps < 0:
        parser.error("--warmup-steps must be >= 0")
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, return the report (also written by --json)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    dtype_name = args.dtype
    args.dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    config = build_config(args.size)
    flops = train_flops_per_sample(config, args.text_tokens)
    peak = args.peak_tflops or detect_peak_tflops(args.device, args.dtype)
    if peak is None and args.device.startswith("cuda"):
        logger.warning("unknown peak TFLOPS for %s in %s: pass --peak-tflops for an MFU", args.device, dtype_name)

    created_group = False
    if args.no_deepspeed:
        engine = "torch"
    else:
        path = args.deepspeed_config or DEEPSPEED_CONFIG_DIR / f"zero{args.zero_stage}.json"
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DamInputError(f"cannot read the DeepSpeed config {path}: {error}; pass --deepspeed-config") from error
        args.ds_config = fill_deepspeed_config(
            raw, micro_batch_size=args.batch_size, bf16=args.dtype == torch.bfloat16,
            hidden_size=config.text_config.hidden_size,
        )
        engine = f"deepspeed-zero{args.ds_config.get('zero_optimization', {}).get('stage', 0)}"
        if args.device.startswith("cuda"):
            torch.cuda.set_device(torch.device(args.device).index or 0)
        created_group = init_single_process_distributed()

    try:
        results = {mode: run_mode(mode, config, args, flops["total"], peak) for mode in args.modes}
    finally:
        if created_group:
            torch.distributed.destroy_process_group()

    rows = {mode: asdict(result) for mode, result in results.items()}
    ok = {mode: r for mode, r in results.items() if r.error is None}
    ratio = None
    if "plain" in ok and "checkpointing" in ok:
        ratio = ok["checkpointing"].samples_per_s / ok["plain"].samples_per_s
    with_mfu = [r for r in ok.values() if r.mfu is not None]
    best = max(with_mfu, key=lambda r: r.mfu) if with_mfu else None
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    report: dict[str, Any] = {
        "command": " ".join(["python -m bench.speed_train", *argv]),
        "size": args.size,
        "engine": engine,
        "dtype": dtype_name,
        "device": device_name,
        "batch_size": args.batch_size,
        "visual_tokens": config.num_image_tokens,
        "text_tokens": args.text_tokens,
        "llm_tokens": config.num_image_tokens + args.text_tokens,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "peak_tflops": peak,
        "flops_per_sample": flops,
        "modes": rows,
        "checkpointing_over_plain": ratio,
        "best_mfu": None if best is None else {"mode": best.mode, "mfu": best.mfu},
        "mfu_goal": MFU_GOAL,
        "mfu_goal_met": None if best is None else best.mfu >= MFU_GOAL,
    }
    print_report(report)
    if args.json is not None:
        write_json_atomic(args.json, report)
        logger.info("wrote %s", args.json)
    return report


if __name__ == "__main__":
    outcome = main()
    raise SystemExit(0 if all(row["error"] is None for row in outcome["modes"].values()) else 1)
