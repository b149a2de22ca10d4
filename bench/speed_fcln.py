"""Dense-captioning speed of the DenseCap FCLN: ms per image end to end, and where the time goes.

One 720x600 image (random pixels) through `FclnModel.generate` with the paper's test-time
settings: the localization layer's boxes NMS'd at IoU 0.7 down to 300 proposals, the
recognition network on all of them, the final NMS at 0.3, and an LSTM caption for every region
that survives it. The weights are random (VGG-16 shapes by default), and <end> is suppressed so
every caption runs the full `max_caption_length` steps: constant, worst-case captioning work.
(The paper: 240 ms per image on a Titan X, 88 ms of it in NMS.)

Two variants of the same model run in one process, each after warm-up, with CUDA synchronised
around every timed call:
- baseline: eager float32;
- fast path: `--dtype` weights (float16 on CUDA), a channels_last backbone, and with
  `--compile` a torch.compile'd backbone (the later stages have data-dependent shapes).
The ratio baseline / fast is printed; where the fast path is not faster, eager float32 is the
result and the report says so. The breakdown (backbone; localization + proposal NMS;
recognition + bilinear sampling + final NMS; captioning + decoding) comes from a staged copy of
`generate` with a synchronisation after each stage, timed in separate iterations so the
end-to-end figure carries no extra synchronisation; tests/test_bench_speed_fcln.py checks that
the staged copy returns what `generate` returns.

    python -m bench.speed_fcln --backbone tiny --device cpu --iterations 3        # CPU smoke, seconds
    python -m bench.speed_fcln --device cpu --iterations 3 --warmup 1             # VGG-16 on a CPU
    dam-bench speed-fcln --device cuda --iterations 50 --json fcln_speed.json    # the GPU goal: <= 10 ms
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torchvision.ops import nms

from dam.errors import DamInputError
from dam.fcln import FclnConfig, FclnDetections, FclnModel, bilinear_sample_boxes, decode_boxes, select_proposals
from dam.fcln.boxes import clip_boxes
from dam.fcln.vocabulary import END_ID
from dam.jsonio import write_json_atomic

from bench.harness import run_benchmark

logger = logging.getLogger("bench.speed_fcln")

GOAL_MS = 10.0
NOISE_RATIO = 1.05  # gains below 5% are within run-to-run noise here and do not make a fast path
STAGES = ("backbone", "localization", "recognition", "captioning")
# Sizes per backbone: the paper's for VGG-16 and ResNet-50 (a VG-sized vocabulary of 10,000 words),
# small ones for the tiny backbone so a CPU smoke run takes seconds.
PRESETS: dict[str, dict[str, Any]] = {
    "vgg16": dict(backbone="vgg16", vocab_size=10000),
    "resnet50": dict(backbone="resnet50", vocab_size=10000),
    "tiny": dict(backbone="tiny", tiny_backbone_channels=64, recognition_hidden_size=512,
                 word_embedding_size=128, lstm_hidden_size=256, vocab_size=1000),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_model(backbone: str, proposals: int, device: str, seed: int = 0,
                pre_nms_top_n: int | None = None, final_nms_iou: float = 0.3) -> FclnModel:
    """A randomly initialised FCLN in eval mode whose captions never end early."""
    if backbone not in PRESETS:
        raise DamInputError(f"--backbone {backbone!r} is not one of {', '.join(PRESETS)}")
    torch.manual_seed(seed)
    model = FclnModel(FclnConfig(**PRESETS[backbone], test_num_proposals=proposals, pre_nms_top_n=pre_nms_top_n,
                                 final_nms_iou=final_nms_iou))
    with torch.no_grad():  # <end> never wins, so every region is captioned for max_caption_length steps
        model.language_model.output.bias[END_ID] = -1e4
    return model.to(device).eval()


def fast_variant(model: FclnModel, dtype: torch.dtype, channels_last: bool, compile_backbone: bool) -> FclnModel:
    """A copy of `model` in `dtype`, with a channels_last and optionally compiled backbone."""
    fast = copy.deepcopy(model).to(dtype)
    if channels_last:
        fast.backbone.to(memory_format=torch.channels_last)
    if compile_backbone:
        fast.backbone.body = torch.compile(fast.backbone.body)
    return fast


class Stopwatch:
    """Laps of wall-clock time, synchronising CUDA before each reading so GPU work is counted."""

    def __init__(self, device: str) -> None:
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        self.laps: dict[str, float] = {}
        self.sync()
        self.last = time.perf_counter()

    def lap(self, name: str) -> None:
        self.sync()
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + (now - self.last)
        self.last = now


@torch.no_grad()
def staged_generate(model: FclnModel, pixels: torch.Tensor, watch: Stopwatch) -> tuple[FclnDetections, int]:
    """`model.generate(pixels)[0]` for one image (1, 3, H, W), stage by stage on `watch`; also
    returns the number of proposals. Mirrors FclnModel._image_detections and generate."""
    config = model.config
    dtype = next(model.backbone.parameters()).dtype
    height, width = (int(v) for v in pixels.shape[-2:])
    features = model.backbone(pixels.to(dtype))  # (1, C, Hf, Wf)
    watch.lap("backbone")
    localization = model.localization(features)[0]
    boxes = localization.boxes()  # (N, 4)
    keep = select_proposals(boxes, localization.scores, height, width, config.proposal_nms_iou,
                            config.test_num_proposals, config.pre_nms_top_n)
    proposals = clip_boxes(boxes[keep], height, width)  # (R, 4)
    watch.lap("localization")
    regions = bilinear_sample_boxes(features[0], proposals, tuple(config.grid_size), model.backbone.stride,
                                    model.backbone.feature_offset)
    codes, logits, refinements = model.recognition(regions)  # (R, D), (R,), (R, 4)
    final = clip_boxes(decode_boxes(refinements, proposals), height, width)
    scores = torch.sigmoid(logits)
    order = nms(final.float(), scores.float(), config.final_nms_iou)
    watch.lap("recognition")
    token_ids = model.language_model.generate(codes[order], config.max_caption_length)
    captions = model.vocabulary.decode_batch(token_ids)
    watch.lap("captioning")
    return FclnDetections(final[order], scores[order], captions, token_ids), int(keep.numel())


@dataclass
class VariantResult:
    name: str
    dtype: str
    channels_last: bool
    compiled: bool
    ms_per_image: float | None = None
    """Median end-to-end `generate` time."""
    ms_mean: float | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    """Mean per-stage time of the staged runs."""
    proposals: int | None = None
    regions_captioned: int | None = None
    error: str | None = None


def _timed(fn: Callable[[], Any], device: str) -> float:
    watch = Stopwatch(device)
    fn()
    watch.lap("call")
    return watch.laps["call"]


def measure(model: FclnModel, pixels: torch.Tensor, result: VariantResult, device: str, warmup: int,
            iterations: int) -> VariantResult:
    """Fill `result` with `iterations` timed runs of `model` (after `warmup` untimed ones)."""
    pixels = pixels.to(memory_format=torch.channels_last) if result.channels_last else pixels
    try:
        for _ in range(warmup):
            model.generate(pixels)
            staged_generate(model, pixels, Stopwatch(device))
        times = [_timed(lambda: model.generate(pixels), device) for _ in range(iterations)]
        stages: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        for _ in range(iterations):
            watch = Stopwatch(device)
            detections, result.proposals = staged_generate(model, pixels, watch)
            for stage in STAGES:
                stages[stage] += watch.laps[stage]
    except (RuntimeError, NotImplementedError) as error:  # e.g. a dtype this device has no kernel for
        result.error = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        return result
    result.ms_per_image = 1000 * statistics.median(times)
    result.ms_mean = 1000 * statistics.fmean(times)
    result.stages_ms = {stage: 1000 * total / iterations for stage, total in stages.items()}
    result.regions_captioned = len(detections.captions)
    return result


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="dam-bench speed-fcln", description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(PRESETS), default="vgg16")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights of the fast path (default: float16 on CUDA, float32 on CPU)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last backbone in the fast path")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone in the fast path")
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--proposals", type=int, default=300, help="proposals kept after the first NMS")
    parser.add_argument("--pre-nms-top-n", type=int, default=None,
                        help="best-scoring boxes entering the first NMS (default: all, as the paper)")
    parser.add_argument("--final-nms-iou", type=float, default=0.3,
                        help="the final NMS before captioning (default 0.3, the paper's); 1.0 captions every proposal: "
                             "the worst case, since how many boxes survive depends on the (here random) weights")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    return parser


def _format(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def run(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """Measure both variants, print the report, return it."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DamInputError("--device cuda but no CUDA GPU is visible; use --device cpu")
    for name in ("width", "height", "proposals", "iterations"):
        if getattr(args, name) < 1:
            raise DamInputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise DamInputError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise DamInputError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.pre_nms_top_n is not None and args.pre_nms_top_n < 1:
        raise DamInputError(f"--pre-nms-top-n must be at least 1, got {args.pre_nms_top_n}")
    if not 0.0 < args.final_nms_iou <= 1.0:
        raise DamInputError(f"--final-nms-iou must be in (0, 1], got {args.final_nms_iou}")
    model = build_model(args.backbone, args.proposals, args.device, args.seed, args.pre_nms_top_n, args.final_nms_iou)
    generator = torch.Generator().manual_seed(args.seed)
    pixels = torch.randn(1, 3, args.height, args.width, generator=generator).to(args.device)  # normalised image
    baseline = measure(model, pixels, VariantResult("eager-fp32", "float32", False, False),
                       args.device, args.warmup, args.iterations)
    variants = [baseline]
    fast_is_baseline = dtype_name == "float32" and not args.channels_last and not args.compile
    if not fast_is_baseline:
        fast = fast_variant(model, DTYPES[dtype_name], args.channels_last, args.compile)
        name = "+".join([dtype_name, *(["channels_last"] if args.channels_last else []),
                         *(["compile"] if args.compile else [])])
        variants.append(measure(fast, pixels, VariantResult(name, dtype_name, args.channels_last, args.compile),
                                args.device, args.warmup, args.iterations))
    ok = [v for v in variants if v.ms_per_image is not None]
    best = min(ok, key=lambda v: v.ms_per_image) if ok else None
    ratio = None
    if len(ok) == 2 and baseline.ms_per_image is not None:
        ratio = baseline.ms_per_image / variants[1].ms_per_image
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "cpu"
    report = {
        "command": " ".join(["python -m bench.speed_fcln", *argv]),
        "device": device_name,
        "backbone": args.backbone,
        "image": [args.height, args.width],
        "proposals": args.proposals,
        "pre_nms_top_n": args.pre_nms_top_n,
        "final_nms_iou": args.final_nms_iou,
        "max_caption_length": model.config.max_caption_length,
        "warmup": args.warmup,
        "iterations": args.iterations,
        "threads": torch.get_num_threads(),
        "variants": [asdict(v) for v in variants],
        "fast_over_baseline": ratio,
        "best": best.name if best else None,
        "best_ms_per_image": best.ms_per_image if best else None,
    }
    _print_report(report, variants, ratio, best, args.device)
    if args.json:
        write_json_atomic(args.json, report)
    return report


def _print_report(report: dict[str, Any], variants: list[VariantResult], ratio: float | None,
                  best: VariantResult | None, device: str) -> None:
    height, width = report["image"]
    print(f"FCLN dense-captioning speed: backbone={report['backbone']} device={report['device']} "
          f"image={width}x{height} proposals={report['proposals']} pre_nms_top_n={report['pre_nms_top_n']} caption_steps={report['max_caption_length']} "
          f"iterations={report['iterations']} (warmup {report['warmup']}) threads={report['threads']}")
    header = (f"{'variant':<30}{'ms/image':>10}{'mean':>9}" + "".join(f"{s:>14}" for s in STAGES)
              + f"{'proposals':>11}{'captioned':>11}")
    print(header)
    print("-" * len(header))
    for v in variants:
        if v.error:
            print(f"{v.name:<30}{v.error}")
            continue
        stages = "".join(f"{v.stages_ms[s]:>14.1f}" for s in STAGES)
        print(f"{v.name:<30}{v.ms_per_image:>10.1f}{v.ms_mean:>9.1f}{stages}{v.proposals:>11}{v.regions_captioned:>11}")
    if ratio is not None:
        print(f"speed-up {variants[1].name} / eager-fp32: {ratio:.2f}x")
        if ratio < NOISE_RATIO:
            print(f"no faster variant on this device (the fast path gains less than {NOISE_RATIO - 1:.0%}): "
                  "eager fp32 is the result")
    elif len(variants) == 1:
        print("no fast path configured (float32, no channels_last, no compile): eager fp32 only")
    goal = f"goal <= {GOAL_MS:g} ms/image on a GPU: "
    if not device.startswith("cuda"):
        print(goal + "n/a (measured on the CPU)")
    elif best is not None:
        print(goal + ("met" if best.ms_per_image <= GOAL_MS else "not met")
              + f" (best {best.ms_per_image:.1f} ms with {best.name})")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_benchmark("dam-bench speed-fcln", build_parser(), lambda args: run(args, argv) and 0, argv)


if __name__ == "__main__":
    sys.exit(main())
