"""Images/s of `dam densecap` over a folder: the FCLN alone against SAM proposals + DAM captions.

Each pipeline runs `dam.densecap.run_folder` exactly as `dam densecap` does (images read from a
folder, batched, one JSON per image, a drawn JPEG per image, atomic writes), in one process:
- `fcln`: FCLN proposals and FCLN LSTM captions (the DenseCap baseline);
- `sam-dam`: segment-anything's automatic mask generator, then DAM's `describe_batch` on the masks;
- `fcln-dam`: FCLN boxes, DAM captions (the box is the mask).

The images are smooth random colour fields (`--width` x `--height`, PNG). Weights are random,
so the numbers measure the architectures: the FCLN's <end> is suppressed and DAM generates
exactly `--max-new-tokens` tokens per region, and SAM's quality thresholds are 0 so it keeps
`--max-regions` masks per image, as a trained SAM does on a busy photograph. Each pipeline first
runs on `--warmup` images in a scratch folder (kernels, autotuning, CUDA graphs), then is timed
on all `--images` in a fresh one. The ratio printed is the baseline's rate over the contender's:
how many times more GPU time a DAM-captioned image costs than an FCLN one.

    python -m bench.speed_densecap --shape tiny --images 4 --warmup 1 --max-new-tokens 4   # CPU smoke
    python -m bench.speed_densecap --shape full --device cuda --images 64 --json densecap_speed.json

`--shape full`: VGG-16 FCLN (10,000 words), SAM ViT-H, the DAM-3B shape in bfloat16
(bench.speed_describe.build_describer); `--shape tiny`: small models for a CPU run in seconds.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dam.densecap import DamCaptioner, DenseCaptioner, FclnCaptioner, FclnProposer, SamProposer, run_folder
from dam.errors import DamInputError
from dam.jsonio import read_json, write_json_atomic

from bench.harness import run_benchmark
from bench.speed_data import build_sam
from bench.speed_describe import build_describer
from bench.speed_fcln import build_model as build_fcln

PIPELINES = ("fcln", "sam-dam", "fcln-dam")
BASELINE = "fcln"


def write_images(folder: Path, count: int, width: int, height: int, seed: int = 0) -> None:
    """`count` PNGs of smooth random colour (a coarse random grid, bilinearly enlarged)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(folder / f"image_{index:04d}.png")


class Models:
    """The random-weight models, built once and shared by the pipelines that use them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self._fcln: Any = None
        self._sam: Any = None
        self._describer: Any = None

    @property
    def fcln(self) -> Any:
        if self._fcln is None:
            self._fcln = build_fcln("vgg16" if self.args.shape == "full" else "tiny", 300, self.args.device)
        return self._fcln

    @property
    def sam(self) -> Any:
        if self._sam is None:
            self._sam = build_sam(tiny=self.args.shape == "tiny").to(self.args.device)
        return self._sam

    @property
    def describer(self) -> Any:
        if self._describer is None:
            dtype = getattr(torch, self.args.dtype or ("bfloat16" if self.args.device.startswith("cuda") else "float32"))
            self._describer = build_describer("dam-3b" if self.args.shape == "full" else "tiny", self.args.device, dtype)
        return self._describer

    def dense_captioner(self, pipeline: str) -> DenseCaptioner:
        args = self.args
        if pipeline == "fcln":
            return DenseCaptioner(FclnProposer(self.fcln), FclnCaptioner(self.fcln), args.max_regions)
        if pipeline == "sam-dam":
            proposer: Any = SamProposer(self.sam, points_per_side=args.sam_points_per_side,
                                        pred_iou_thresh=0.0, stability_score_thresh=0.0)
        else:
            proposer = FclnProposer(self.fcln)
        tokens = args.max_new_tokens
        captioner = DamCaptioner(self.describer, None, batch_size=args.batch_size, do_sample=False,
                                 max_new_tokens=tokens, min_new_tokens=tokens)
        return DenseCaptioner(proposer, captioner, args.max_regions)


def regions_written(output: Path) -> int:
    return sum(len(read_json(path, "result").get("regions") or []) for path in output.glob("*.json"))


def time_pipeline(models: Models, pipeline: str, images: Path, scratch: Path) -> dict[str, float]:
    args = models.args
    captioner = models.dense_captioner(pipeline)
    if args.warmup:
        warm = scratch / f"{pipeline}_warmup_images"
        for path in sorted(images.iterdir())[: args.warmup]:
            warm.mkdir(exist_ok=True)
            (warm / path.name).write_bytes(path.read_bytes())
        run_folder(captioner, warm, scratch / f"{pipeline}_warmup", image_batch_size=args.image_batch,
                   viewer=False, progress=False)
    output = scratch / pipeline
    stats = run_folder(captioner, images, output, image_batch_size=args.image_batch, viewer=False,
                       progress=False)
    regions = regions_written(output)
    result = {"images": stats.processed, "seconds": stats.seconds, "images_per_second": stats.images_per_second,
              "regions_per_image": regions / max(stats.processed, 1)}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dam-bench speed-densecap", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["tiny", "full"], default="full")
    parser.add_argument("--pipelines", default="fcln,sam-dam",
                        help=f"comma-separated, from {', '.join(PIPELINES)} (default fcln,sam-dam)")
    parser.add_argument("--images", type=int, default=32, help="timed images per pipeline")
    parser.add_argument("--warmup", type=int, default=2, help="untimed images per pipeline first")
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--max-regions", type=int, default=30, help="regions per image, as `dam densecap`")
    parser.add_argument("--image-batch", type=int, default=8, help="images per step, as `dam densecap`")
    parser.add_argument("--batch-size", type=int, default=32, help="regions DAM captions together")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens DAM generates per region")
    parser.add_argument("--sam-points-per-side", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="DAM weights (default bfloat16 on CUDA, float32 elsewhere)")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    return parser


def run(args: argparse.Namespace) -> int:
    pipelines = [name.strip() for name in args.pipelines.split(",") if name.strip()]
    unknown = sorted(set(pipelines) - set(PIPELINES))
    if unknown or not pipelines:
        raise DamInputError(f"--pipelines {args.pipelines!r}: choose from {', '.join(PIPELINES)}")
    if args.images < 1 or args.warmup < 0:
        raise DamInputError(f"--images {args.images} must be at least 1 and --warmup {args.warmup} at least 0")
    models = Models(args)
    with tempfile.TemporaryDirectory(prefix="speed_densecap_") as tmp:
        scratch = Path(tmp)
        images = scratch / "images"
        write_images(images, args.images, args.width, args.height)
        results = {name: time_pipeline(models, name, images, scratch) for name in pipelines}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device={device} shape={args.shape} images={args.images} ({args.width}x{args.height}) "
          f"max_regions={args.max_regions} image_batch={args.image_batch} dam_batch={args.batch_size} "
          f"dam_new_tokens={args.max_new_tokens}")
    for name, result in results.items():
        print(f"{name:10s} {result['images_per_second']:8.2f} images/s  {result['regions_per_image']:5.1f} regions/image"
              f"  ({result['images']} images in {result['seconds']:.1f} s)")
    report: dict[str, Any] = {"device": device, "args": vars(args), "pipelines": results}
    if BASELINE in results:
        for name, result in results.items():
            if name != BASELINE and result["images_per_second"] > 0:
                ratio = results[BASELINE]["images_per_second"] / result["images_per_second"]
                report[f"{BASELINE}_over_{name}"] = ratio
                print(f"{BASELINE} / {name}: {ratio:.1f}x the images/s")
    if args.json:
        write_json_atomic(args.json, report)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_benchmark("dam-bench speed-densecap", build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
