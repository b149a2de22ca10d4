"""Speed of the data pipeline (`dam-data`): its CPU cost in regions/s per core, and stage 2's model time per image.

**CPU part** (what a labeling run costs besides its models): N SA-1B-style images (JPEG, H x W,
R masks each as compressed RLE in sa_N.json) are generated, then the real pipeline runs on them
as a subprocess, ``dam-data stage1`` with the zero-cost ``placeholder`` labeler and one
intra-op thread: JSON parsing, RLE decoding and checking, image decoding, filters, row building
and parquet writing, and with ``render_views`` also the focal crop + highlighted full view a VLM
labeler renders and JPEG-encodes per region. Regions/s per core = rows / the shards' own
processing seconds (from their reports, so interpreter start-up is excluded; it is printed
apart). ``--views both`` (default) runs without and with the views, so their cost shows as the
difference.

**GPU part** (stage 2's models, random weights in the released shapes): OWLv2 (``--owl base``:
ViT-B/16 at 960 px, ``large``: ViT-L/14 at 1008 px) per image against a vocabulary of
``--vocabulary`` queries embedded once (the pipeline caches them), SAM ViT-H's image encoder per
image and its mask decoder for ``--boxes`` boxes, and SigLIP so400m (384 px) for the ``--shortlist``
crop-caption pairs per image; each timed after warm-up with the device synchronised. Printed as ms
per image, ms per region (a region = one candidate box) and regions/s of the three together; the
labeler (the stage-1 DAM, see ``dam-bench speed-describe``) and the instance model come on top.

    python -m bench.speed_data --device cpu --tiny                          # CI smoke, seconds
    python -m bench.speed_data --images 16 --regions 32 --gpu none         # the CPU part on this machine
    dam-bench speed-data --device cuda --owl large --cpu none --json data_speed.json   # the GPU part

bench may not import data_pipeline (DESIGN.md), so the CPU part drives it as a command and the GPU
part times the models the pipeline loads (transformers OWLv2 / SigLIP, segment-anything SAM) directly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dam.errors import DamInputError
from dam.jsonio import write_json_atomic
from dam.masks import mask_to_rle

logger = logging.getLogger("bench.speed_data")

REPO = Path(__file__).resolve().parents[1]
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")}


# ---- the CPU part ---------------------------------------------------------------------------


def write_sa1b(folder: Path, images: int, regions: int, height: int, width: int, seed: int = 0) -> int:
    """``images`` SA-1B-style pairs (sa_N.jpg, sa_N.json with ``regions`` ellipse masks each); returns the regions."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ys, xs = np.mgrid[0:height, 0:width]
    for index in range(1, images + 1):
        # Smooth colour fields with noise: JPEG sizes and decode times of a photo, not of white noise.
        base = np.stack([(xs * (c + 1) + ys * (3 - c)) % 256 for c in range(3)], axis=-1).astype(np.float32)
        pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"sa_{index}.jpg", quality=90)
        annotations = []
        for ann in range(regions):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.03, 0.25) * height, rng.uniform(0.03, 0.25) * width  # SA-1B's spread of sizes
            mask = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
            if not mask.any():
                mask[int(min(cy, height - 1)), int(min(cx, width - 1))] = True
            annotations.append({
                "id": ann, "segmentation": mask_to_rle(mask), "area": int(mask.sum()), "bbox": [0, 0, 1, 1],
                "predicted_iou": 0.9, "stability_score": 0.95, "point_coords": [[cx, cy]], "crop_box": [0, 0, width, height],
            })
        image = {"image_id": index, "width": width, "height": height, "file_name": f"sa_{index}.jpg"}
        (folder / f"sa_{index}.json").write_text(json.dumps({"image": image, "annotations": annotations}), encoding="utf-8")
    return images * regions


def run_pipeline(images: Path, out: Path, render_views: bool, workers: int, shard_size: int) -> dict[str, float]:
    """``dam-data stage1`` over ``images`` with the placeholder labeler, in ``workers`` one-thread processes."""
    config = out.parent / f"{out.name}.yaml"
    labeler = {"type": "placeholder", "render_views": render_views}
    config.write_text(json.dumps({
        "source": {"type": "sa1b", "images": str(images)}, "labeler": labeler,
        "output": {"dir": str(out), "shard_size": shard_size}, "batch_size": 16,
    }), encoding="utf-8")  # JSON is YAML
    env = {**os.environ, **_ONE_THREAD, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "data_pipeline.cli", "stage1", "--config", str(config), "--no-progress"]
    start = time.perf_counter()
    processes = [
        subprocess.Popen([*command, "--shard", str(i), "--num-shards", str(workers)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(workers)
    ]
    failures = []
    for process in processes:
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {process.returncode}")
    wall = time.perf_counter() - start
    if failures:
        raise DamInputError(f"dam-data stage1 failed: {failures[0]}")
    reports = [json.loads(path.read_text()) for path in sorted(out.glob("shard-*.report.json"))]
    rows = sum(report["rows"] for report in reports)
    # A worker's first shard also pays the pipeline's lazy imports (pyarrow, datasets): leave it out when there are others.
    first = {min(r["shard"] for r in reports if r["worker"] == worker) for worker in {r["worker"] for r in reports}}
    steady = [r for r in reports if r["shard"] not in first] or reports
    busy = sum(r["seconds"] for r in steady)  # processing + writing, summed over every worker
    return {"rows": rows, "seconds": busy, "timed_rows": sum(r["rows"] for r in steady), "wall_seconds": wall,
            "per_core": sum(r["rows"] for r in steady) / busy if busy else 0.0, "total_rate": rows / wall if wall else 0.0}


# ---- the GPU part ---------------------------------------------------------------------------

OWL_SHAPES: dict[str, dict[str, Any]] = {
    "base": dict(image_size=960, patch_size=16, hidden_size=768, layers=12, heads=12, text_hidden=512, text_heads=8, projection=512),
    "large": dict(image_size=1008, patch_size=14, hidden_size=1024, layers=24, heads=16, text_hidden=768, text_heads=12, projection=768),
    "tiny": dict(image_size=64, patch_size=16, hidden_size=32, layers=2, heads=4, text_hidden=32, text_heads=4, projection=32),
}


def build_owlv2(shape: str) -> Any:
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    s = OWL_SHAPES[shape]
    config = Owlv2Config(
        text_config=dict(hidden_size=s["text_hidden"], intermediate_size=4 * s["text_hidden"], num_hidden_layers=12 if shape != "tiny" else 2,
                         num_attention_heads=s["text_heads"], max_position_embeddings=16),
        vision_config=dict(image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["hidden_size"],
                           intermediate_size=4 * s["hidden_size"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"]),
        projection_dim=s["projection"],
    )
    return Owlv2ForObjectDetection(config).eval()


def build_sam(tiny: bool) -> Any:
    from segment_anything import build_sam_vit_h
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    if not tiny:
        return build_sam_vit_h(checkpoint=None).eval()  # random weights, ViT-H shapes (636M parameters)
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2.0, out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8),
        mask_decoder=MaskDecoder(transformer_dim=dim, transformer=TwoWayTransformer(depth=1, embedding_dim=dim, num_heads=2, mlp_dim=64),
                                 num_multimask_outputs=3, iou_head_depth=1, iou_head_hidden_dim=16),
    ).eval()


def build_siglip(tiny: bool) -> Any:
    from transformers import SiglipConfig, SiglipModel

    ids = dict(pad_token_id=1, bos_token_id=None, eos_token_id=1)  # the released SigLIP's (the defaults are CLIP's)
    if tiny:
        layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
        config = SiglipConfig(text_config=dict(vocab_size=99, max_position_embeddings=16, **ids, **layers),
                              vision_config=dict(image_size=32, patch_size=8, **layers))
    else:  # so400m-patch14-384
        layers = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
        config = SiglipConfig(text_config=dict(vocab_size=32000, max_position_embeddings=64, **ids, **layers),
                              vision_config=dict(image_size=384, patch_size=14, **layers))
    return SiglipModel(config).eval()


def timed(run: Callable[[], Any], device: torch.device, iterations: int, warmup: int) -> float:
    """Median seconds of ``run()`` over ``iterations`` after ``warmup`` calls, the device synchronised around each."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gpu_part(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, float]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = "tiny" if args.tiny else args.owl
    result: dict[str, float] = {}
    torch.manual_seed(0)
    height, width = args.height, args.width
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    with torch.inference_mode():
        owl = build_owlv2(shape).to(device, dtype)
        size = owl.config.vision_config.image_size
        ids = torch.randint(1, owl.config.text_config.vocab_size, (args.vocabulary, 16), device=device)
        query_seconds = timed(lambda: owl.owlv2.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids)), device, 1, 0)
        queries = owl.owlv2.get_text_features(input_ids=ids, attention_mask=torch.ones_like(ids))
        queries = getattr(queries, "pooler_output", queries)
        pixels = torch.randn(1, 3, size, size, device=device, dtype=dtype)

        def detect() -> Any:
            feature_map, _ = owl.image_embedder(pixel_values=pixels)
            batch, rows, cols, dim = feature_map.shape
            features = feature_map.reshape(batch, rows * cols, dim)
            logits, _ = owl.class_predictor(features, queries[None].to(features.dtype), None)
            return owl.box_predictor(features, feature_map), logits.max(dim=-1)

        result["owl_ms"] = 1e3 * timed(detect, device, args.iterations, args.warmup)
        result["owl_queries_ms"] = 1e3 * query_seconds
        del owl
        sam = build_sam(args.tiny).to(device)
        from segment_anything import SamPredictor

        predictor = SamPredictor(sam)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else torch.autocast(device.type, enabled=False)
        rng = np.random.default_rng(1)
        x0, y0 = rng.uniform(0, width * 0.7, args.boxes), rng.uniform(0, height * 0.7, args.boxes)
        boxes = np.stack([x0, y0, x0 + rng.uniform(16, width * 0.3, args.boxes), y0 + rng.uniform(16, height * 0.3, args.boxes)], 1)
        prompts = predictor.transform.apply_boxes_torch(torch.as_tensor(boxes, dtype=torch.float32, device=device), (height, width))
        with autocast:
            result["sam_encoder_ms"] = 1e3 * timed(lambda: predictor.set_image(image), device, args.iterations, args.warmup)
            decode = lambda: predictor.predict_torch(None, None, boxes=prompts, multimask_output=False)  # noqa: E731
            result["sam_decoder_ms"] = 1e3 * timed(decode, device, args.iterations, args.warmup)
        del sam, predictor
        siglip = build_siglip(args.tiny).to(device, dtype)
        crop = siglip.config.vision_config.image_size
        text_length = siglip.config.text_config.max_position_embeddings
        crops = torch.randn(args.shortlist, 3, crop, crop, device=device, dtype=dtype)
        texts = torch.randint(1, siglip.config.text_config.vocab_size, (args.shortlist, text_length), device=device)
        result["siglip_ms"] = 1e3 * timed(lambda: siglip(input_ids=texts, pixel_values=crops), device, args.iterations, args.warmup)
    per_image = result["owl_ms"] + result["sam_encoder_ms"] + result["sam_decoder_ms"] + result["siglip_ms"]
    result.update(
        image_ms=per_image, region_ms=per_image / args.boxes, sam_decoder_ms_per_region=result["sam_decoder_ms"] / args.boxes,
        images_per_s=1e3 / per_image, regions_per_s=1e3 * args.boxes / per_image,
    )
    name = "tiny shapes" if args.tiny else f"OWLv2-{args.owl} @{OWL_SHAPES[args.owl]['image_size']}, SAM ViT-H, SigLIP so400m"
    say(f"gpu part ({device}, {str(dtype).removeprefix('torch.')}, {name}; random weights; median of {args.iterations}):")
    say(f"  OWLv2 per image ({args.vocabulary} cached queries):  {result['owl_ms']:9.2f} ms   "
        f"(embedding the queries once: {result['owl_queries_ms']:.1f} ms)")
    say(f"  SAM image encoder per image:              {result['sam_encoder_ms']:9.2f} ms")
    say(f"  SAM mask decoder, {args.boxes} boxes:               {result['sam_decoder_ms']:9.2f} ms   "
        f"({result['sam_decoder_ms_per_region']:.2f} ms per region)")
    say(f"  SigLIP, {args.shortlist} crop-caption pairs:            {result['siglip_ms']:9.2f} ms")
    say(f"  together: {per_image:.1f} ms per image, {result['region_ms']:.2f} ms per region: {result['images_per_s']:.2f} images/s, "
        f"{result['regions_per_s']:.1f} regions/s at {args.boxes} candidate regions per image")
    return result


def cpu_part(args: argparse.Namespace, say: Callable[[str], None]) -> dict[str, float]:
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="speed_data_") as scratch:
        root = Path(scratch)
        start = time.perf_counter()
        regions = write_sa1b(root / "sa1b", args.images, args.regions, args.height, args.width)
        logger.info("wrote %d images with %d regions in %.1f s", args.images, regions, time.perf_counter() - start)
        variants = {"off": [False], "on": [True], "both": [False, True]}[args.views]
        say(f"cpu part: dam-data stage1 on {args.images} SA-1B-style images ({args.height}x{args.width} JPEG, {args.regions} "
            f"masks each), placeholder labeler, {args.workers} one-thread worker(s):")
        for views in variants:
            name = "views" if views else "no_views"
            run = run_pipeline(root / "sa1b", root / f"out_{name}", views, args.workers, args.shard_size)
            if run["rows"] != regions:
                raise DamInputError(f"the pipeline wrote {run['rows']} rows for {regions} regions; see its logs")
            result.update({f"{name}_{key}": value for key, value in run.items()})
            label = "with the VLM views (crop + full, JPEG)" if views else "without views                        "
            say(f"  {label}: {run['per_core']:8.1f} regions/s per core  ({run['timed_rows']} regions in {run['seconds']:.2f} s of "
                f"shard time; all {run['rows']}: {run['total_rate']:.1f} regions/s over {run['wall_seconds']:.1f} s wall incl. start-up)")
        if args.views == "both":
            cost = 1e3 * (1 / result["views_per_core"] - 1 / result["no_views_per_core"])
            result["views_ms_per_region"] = cost
            say(f"  the views cost {cost:.2f} ms per region per core")
    return result


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="dam-bench speed-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device of the GPU part")
    parser.add_argument("--dtype", default=None, help="GPU part: default bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--tiny", action="store_true", help="small images and tiny models: a smoke run in seconds")
    parser.add_argument("--cpu", choices=["run", "none"], default="run", help="run the CPU part (or not)")
    parser.add_argument("--gpu", choices=["run", "none"], default="run", help="run the GPU part (or not)")
    parser.add_argument("--images", type=int, default=None, help="CPU part: images (default 8; tiny 3)")
    parser.add_argument("--regions", type=int, default=None, help="CPU part: masks per image (default 32; tiny 4)")
    parser.add_argument("--height", type=int, default=None, help="image height (default 1500, SA-1B's; tiny 96)")
    parser.add_argument("--width", type=int, default=None, help="image width (default 2250; tiny 128)")
    parser.add_argument("--views", choices=["off", "on", "both"], default="both", help="CPU part: render the VLM views")
    parser.add_argument("--workers", type=int, default=1, help="CPU part: one-thread dam-data processes")
    parser.add_argument("--shard-size", type=int, default=None, help="CPU part: images per shard (default 2; tiny 1)")
    parser.add_argument("--owl", choices=["base", "large"], default="large", help="GPU part: OWLv2 shape")
    parser.add_argument("--vocabulary", type=int, default=None, help="GPU part: text queries (default 1203, LVIS; tiny 8)")
    parser.add_argument("--boxes", type=int, default=32, help="GPU part: candidate boxes per image through SAM's decoder")
    parser.add_argument("--shortlist", type=int, default=4, help="GPU part: crop-caption pairs per image through SigLIP")
    parser.add_argument("--iterations", type=int, default=None, help="GPU part: timed calls (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="GPU part: untimed calls first (default 2; tiny 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    tiny = args.tiny
    defaults = dict(shard_size=(1, 2), images=(3, 8), regions=(4, 32), height=(96, 1500), width=(128, 2250), vocabulary=(8, 1203),
                    iterations=(2, 10), warmup=(1, 2))
    for name, (small, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    for name in ("images", "regions", "height", "width", "workers", "shard_size", "vocabulary", "boxes", "shortlist", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.gpu == "run" and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA GPU here; use --device cpu (with --tiny) or --gpu none")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    say = print  # the report is this script's output (stdout); library messages go to logging
    result: dict[str, float] = {}
    try:
        if args.cpu == "run":
            result.update(cpu_part(args, say))
        if args.gpu == "run":
            result.update(gpu_part(args, say))
    except DamInputError as error:
        parser.exit(2, f"dam-bench speed-data: error: {error}\n")
    if args.json:
        write_json_atomic(args.json, {"argv": list(sys.argv[1:] if argv is None else argv), **result})
    return result


if __name__ == "__main__":
    main()
