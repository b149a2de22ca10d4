"""The ``dam`` command: caption a region of an image or an object through a video from a shell.

    dam describe --model ./dam-3b --image photo.jpg --mask mask.png
    dam describe --model ./dam-3b --image photo.jpg --box 40 30 200 180 \\
        --sam-checkpoint sam_vit_h_4b8939.pth --out overlay.png --json
    dam describe --model ./dam-3b --video clip.mp4 --mask masklet.json
    dam serve --model ./dam-3b --port 8000 --max-batch 32 --ui
    dam convert --from-nvlabs ./DAM-3B --out ./dam-3b
    dam densecap --input photos/ --output out/ --fcln runs/fcln/final   (dam.densecap.cli)

Only the result goes to stdout (the caption, or one JSON object with ``--json``), so the
command composes with pipes; diagnostics go through ``logging`` to stderr (``-v`` for more).
Errors the user can fix (missing files, bad masks, missing options) print one line prefixed
``dam: error:`` and exit with status 2, as argparse does for bad options; no traceback.

Subcommands register themselves in :func:`build_parser` with ``set_defaults(handler=...)``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dam.commandline import int_at_least, run_command
from dam.densecap.cli import add_densecap_parser
from dam.errors import DamInputError
from dam.jsonio import read_json

logger = logging.getLogger(__name__)

_MASK_IMAGE_SUFFIXES = {".png", ".bmp", ".tif", ".tiff", ".webp", ".jpg", ".jpeg"}


# ---- argument types ---------------------------------------------------------------------


def _point(text: str) -> tuple[float, float]:
    """'X,Y' -> (x, y) in pixels."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is X,Y in pixels (e.g. 120,45), got {text!r}") from None


def _float_in(low: float, high: float, low_inclusive: bool, description: str) -> Any:
    """An argparse type accepting floats in the range (NaN and non-numbers rejected)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        above_low = value >= low if low_inclusive else value > low
        if not (above_low and value <= high):
            raise argparse.ArgumentTypeError(f"must be {description}, got {text!r}")
        return value

    return parse


_non_negative_float = _float_in(0.0, float("inf"), True, "a number >= 0")
_probability = _float_in(0.0, 1.0, False, "in (0, 1]")


# ---- parser -----------------------------------------------------------------------------


def _common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (used as an argparse parent parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more to stderr (-v: info, -vv: debug)"
    )
    return common


def _add_describe(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "describe",
        parents=[common],
        help="caption a masked region of an image, or an object through a video",
        description=(
            "Caption one region: of an image (given as a mask, a box or clicked points; boxes and "
            "points are turned into a mask with segment-anything), or of a video (given as a "
            "masklet, one mask per frame). Prints the caption, or one JSON object with --json."
        ),
    )
    parser.add_argument(
        "--model", metavar="PATH", help="DAM checkpoint folder (default: the built-in ShapesDLC model)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image", metavar="IMG", help="image file (PNG, JPEG, ...)")
    source.add_argument("--video", metavar="VIDEO", help="video file (mp4, ...); needs --mask with the masklet")
    region = parser.add_mutually_exclusive_group()
    region.add_argument(
        "--mask",
        metavar="MASK",
        help=(
            "image: a mask image (PNG), or a .json file with a COCO RLE dict, a polygon list or a "
            "COCO annotation with 'segmentation'. video: a .json file with a list of per-frame RLEs "
            "(null where the object is absent) or a {frame: RLE} object, or a folder of per-frame "
            "mask PNGs (sorted by name). Without a region option, an RGBA image's alpha is the mask"
        ),
    )
    region.add_argument(
        "--box", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"),
        help="box in pixels, segmented with SAM (needs --sam-checkpoint)",
    )
    region.add_argument(
        "--points", nargs="+", type=_point, metavar="X,Y",
        help="clicked points in pixels, segmented with SAM (needs --sam-checkpoint)",
    )
    parser.add_argument(
        "--point-labels", nargs="+", type=int, metavar="L",
        help="one label per point: 1 foreground (default), 0 background",
    )
    parser.add_argument("--prompt", metavar="TEXT", help="the query (default: the model's default query)")
    parser.add_argument("--out", metavar="PNG", help="write an overlay (region outlined, caption below); images only")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the plain caption")
    sam = parser.add_argument_group("segment-anything (for --box and --points)")
    sam.add_argument("--sam-checkpoint", metavar="PTH", help="SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
    sam.add_argument("--sam-model-type", default="vit_h", metavar="TYPE", help="vit_h (default), vit_l or vit_b")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    runtime.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32)")
    generation = parser.add_argument_group(
        "generation (default: the model's generation_config.json; greedy for the built-in model, "
        "temperature 0.2, top-p 0.5, 512 tokens for a converted NVlabs DAM-3B)"
    )
    generation.add_argument("--max-new-tokens", type=int_at_least(1), metavar="N", help="caption length limit in tokens")
    generation.add_argument(
        "--temperature", type=_non_negative_float, metavar="T",
        help="sampling temperature; 0 decodes greedily (default: the model's)",
    )
    generation.add_argument("--top-p", type=_probability, metavar="P", help="nucleus sampling (default: the model's)")
    parser.set_defaults(handler=_run_describe)


def _add_convert(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "convert",
        parents=[common],
        help="convert a released NVlabs DAM checkpoint (DAM-3B, DAM-3B-Video) into a toolkit checkpoint",
        description=(
            "Convert a released NVlabs DAM folder (config.json, llm/, vision_tower/, mm_projector/, "
            "context_provider/) into a checkpoint of this toolkit (config.json, safetensors, tokenizer) "
            "that gives the reference's outputs. Prints the output folder."
        ),
    )
    parser.add_argument("--from-nvlabs", required=True, metavar="SRC", help="folder of the released checkpoint")
    parser.add_argument("--out", required=True, metavar="DST", help="output folder (new or empty, unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="weights' dtype (default: as stored, float16)"
    )
    parser.add_argument(
        "--variant", choices=["auto", "image", "joint"], default="auto",
        help="default queries: image (DAM-3B) or joint image+video (DAM-3B-Video); auto: 'video' in the name",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.set_defaults(handler=_run_convert)


def _add_server_options(parser: argparse.ArgumentParser) -> None:
    """Options of `dam serve` and `dam demo-ui` (the fields of dam.server.ServerSettings)."""
    parser.add_argument(
        "--model", metavar="PATH", help="DAM checkpoint folder (default: the built-in ShapesDLC model)"
    )
    parser.add_argument("--served-model-name", metavar="NAME", help="model id in /v1/models (default: the folder name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int_at_least(0), default=8000, help="port (default 8000)")
    batching = parser.add_argument_group("dynamic batching")
    batching.add_argument(
        "--max-batch", type=int_at_least(1), default=32, metavar="N", help="most requests per batched generate (default 32)"
    )
    batching.add_argument(
        "--max-wait-ms", type=_non_negative_float, default=10.0, metavar="MS",
        help="longest a request waits for others to join its batch once the model is free (default 10)",
    )
    batching.add_argument(
        "--max-queue", type=int_at_least(1), default=256, metavar="N",
        help="most waiting requests; more get 503 with Retry-After (default 256)",
    )
    batching.add_argument(
        "--generation", choices=["auto", "plain", "fast"], default="auto",
        help="fast: continuous batching (requests join and leave the running batch at every decode step); "
        "plain: one transformers generate per batch; auto (default): fast where the model supports it",
    )
    parser.add_argument(
        "--max-image-pixels", type=int_at_least(1), default=None, metavar="N",
        help="largest image (width x height) a request may send (default 50000000)",
    )
    sam = parser.add_argument_group("segment-anything (box and point prompts on the demo page)")
    sam.add_argument("--sam-checkpoint", metavar="PTH", help="SAM checkpoint, e.g. sam_vit_h_4b8939.pth")
    sam.add_argument("--sam-model-type", default="vit_h", metavar="TYPE", help="vit_h (default), vit_l or vit_b")
    runtime = parser.add_argument_group("runtime")
    runtime.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    runtime.add_argument("--dtype", help="float32, bfloat16 or float16 (default: float32)")
    runtime.add_argument(
        "--threads", type=int_at_least(1), metavar="N",
        help="CPU threads for torch (default: torch's choice); 1 is fastest for small models on a busy CPU",
    )


def _add_serve(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "serve",
        parents=[common],
        help="serve the model behind an OpenAI-compatible chat-completions API",
        description=(
            "Serve POST /v1/chat/completions (plain and streamed), GET /v1/models and /health with FastAPI "
            "and uvicorn; concurrent requests share batched generations. A request's user message holds the "
            "image as a data URL (an RGBA PNG whose alpha is the mask, or the image followed by a mask image), "
            "or 8 such frames for a video, and a text part with the query."
        ),
    )
    _add_server_options(parser)
    parser.add_argument("--ui", action="store_true", help="also serve the demo page at /")
    parser.set_defaults(handler=_run_serve)


def _add_demo_ui(subparsers: Any, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser(
        "demo-ui",
        parents=[common],
        help="the web demo: upload an image, mark a region, watch the caption stream in",
        description="`dam serve --ui`: the demo page at http://HOST:PORT/ and the same API beside it.",
    )
    _add_server_options(parser)
    parser.set_defaults(handler=_run_serve, ui=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``dam`` argument parser with all its subcommands."""
    parser = argparse.ArgumentParser(
        prog="dam",
        description="Describe Anything: detailed captions of image regions and video masklets.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_options()
    _add_describe(subparsers, common)
    _add_convert(subparsers, common)
    _add_serve(subparsers, common)
    _add_demo_ui(subparsers, common)
    add_densecap_parser(subparsers, common)
    return parser


# ---- describe ---------------------------------------------------------------------------


def _image_mask_source(path: str) -> Any:
    """--mask for an image: the loaded JSON object for .json files, else the path itself."""
    if Path(path).suffix.lower() == ".json":
        return read_json(path, "mask")
    return path


def _natural_key(path: Path) -> list[Any]:
    """Sort key putting frame_2.png before frame_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _masklet_source(path: str) -> Any:
    """--mask for a video: a JSON list / {frame: RLE} object, or a folder of per-frame masks."""
    folder = Path(path)
    if folder.is_dir():
        files = sorted(
            (f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in _MASK_IMAGE_SUFFIXES),
            key=_natural_key,
        )
        if not files:
            raise DamInputError(f"mask folder {path!r} has no mask images (.png); put one mask per video frame there")
        logger.info("masklet: %d mask files from %s", len(files), folder)
        return [str(f) for f in files]
    if folder.suffix.lower() != ".json":
        raise DamInputError(
            f"--mask {path!r}: a video's masklet is a .json file (a list of per-frame RLEs, null where the "
            f"object is absent) or a folder of per-frame mask PNGs"
        )
    masklet = read_json(path, "masklet")
    if not isinstance(masklet, (list, dict)):
        raise DamInputError(
            f"masklet file {path!r} holds a {type(masklet).__name__}; expected a list with one RLE (or null) "
            f"per frame, or a {{frame: RLE}} object"
        )
    return masklet


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options given; what is left out stays the model's generation config's (describe's)."""
    kwargs: dict[str, Any] = {}
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    if args.temperature is not None:
        kwargs["do_sample"] = args.temperature > 0
        if args.temperature > 0:
            kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        kwargs["top_p"] = args.top_p
    return kwargs


def _check_describe_args(args: argparse.Namespace) -> None:
    """Option combinations argparse cannot express, checked before anything is loaded."""
    prompted = args.box is not None or args.points is not None
    if args.point_labels is not None and args.points is None:
        raise DamInputError("--point-labels needs --points (one label per point)")
    if args.video is not None:
        if prompted:
            raise DamInputError(
                "--box and --points are for images; for --video give the masklet with --mask "
                "(a .json list of per-frame RLEs or a folder of per-frame mask PNGs)"
            )
        if args.mask is None:
            raise DamInputError("--video needs --mask: a .json list of per-frame RLEs or a folder of per-frame mask PNGs")
        if args.out is not None:
            raise DamInputError("--out: overlays are for images; drop --out when describing a --video")
    if prompted and args.sam_checkpoint is None:
        raise DamInputError(
            "--box and --points need segment-anything to turn them into a mask: pass "
            "--sam-checkpoint sam_vit_h_4b8939.pth (pip install 'describe-anything-toolkit[sam]'), "
            "or give the region as --mask"
        )
    if args.sam_checkpoint is not None and not Path(args.sam_checkpoint).is_file():
        raise DamInputError(
            f"SAM checkpoint {args.sam_checkpoint!r} does not exist; download an official one "
            f"(sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth) and pass its path"
        )


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _save_overlay(path: str, pixels: np.ndarray, mask: np.ndarray, caption: str) -> None:
    from dam.overlay import draw_overlay

    overlay = draw_overlay(pixels, mask, caption)
    try:
        overlay.save(path, format=None if Path(path).suffix else "PNG")
    except ValueError:
        raise DamInputError(f"--out {path!r}: unknown image extension; use a .png file name") from None
    logger.info("wrote overlay %s", path)


def _run_describe(args: argparse.Namespace) -> int:
    from dam.describe import DescribeAnything
    from dam.focal import focal_crop_box
    from dam.images import load_image_and_alpha
    from dam.masks import load_mask

    _check_describe_args(args)
    generate_kwargs = _generation_kwargs(args)

    # Inputs first: a wrong path should fail in a second, not after loading the model.
    pixels = mask = masklet = None
    if args.image is not None:
        pixels, alpha = load_image_and_alpha(args.image)
        if args.mask is not None:
            mask = load_mask(_image_mask_source(args.mask), pixels.shape[:2])
        elif args.box is None and args.points is None:
            if alpha is None:
                raise DamInputError(
                    f"no region given for {args.image!r}: pass --mask MASK, --box X0 Y0 X1 Y1 or "
                    f"--points X,Y (or use an RGBA image whose alpha channel is the mask)"
                )
            mask = load_mask(alpha, pixels.shape[:2])
    else:
        masklet = _masklet_source(args.mask)

    describer = DescribeAnything.from_pretrained(
        args.model,
        device=args.device or _default_device(),
        dtype=args.dtype,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type,
    )
    if args.top_p is not None and not generate_kwargs.get("do_sample", describer.model.generation_config.do_sample):
        logger.warning("--top-p has no effect with greedy decoding; give --temperature > 0 to sample")
    config = describer.model.config
    record: dict[str, Any] = {}
    if pixels is not None:
        pixels, mask = describer.resolve_region(pixels, mask, args.box, args.points, args.point_labels)
        caption = describer.describe(pixels, mask, query=args.prompt, **generate_kwargs)
        record.update(
            caption=caption,
            image=args.image,
            mask_area=int(mask.sum()),
            box=list(focal_crop_box(mask, config.focal_alpha, config.focal_min_size)),
        )
        if args.out is not None:
            _save_overlay(args.out, pixels, mask, caption)
            record["overlay"] = args.out
    else:
        from dam.video import prepare_video_inputs

        # Decode the sampled frames once; describing exactly num_video_frames visible frames
        # samples all of them again, so the caption equals describe_video(path, masklet).
        frames, masks = prepare_video_inputs(args.video, masklet, config.num_video_frames)
        caption = describer.describe_video(frames, masks, query=args.prompt, **generate_kwargs)
        record.update(
            caption=caption,
            video=args.video,
            mask_area=[int(m.sum()) for m in masks],
            box=[list(focal_crop_box(m, config.focal_alpha, config.focal_min_size)) for m in masks],
        )
    record["model"] = args.model or "built-in"
    print(json.dumps(record) if args.json else caption)
    return 0


# ---- convert ----------------------------------------------------------------------------


def _run_convert(args: argparse.Namespace) -> int:
    from dam.modeling.nvlabs import convert_nvlabs_checkpoint

    convert_nvlabs_checkpoint(
        args.from_nvlabs, dst=args.out, dtype=args.dtype, variant=args.variant, overwrite=args.overwrite
    )
    print(args.out)
    return 0


# ---- serve ------------------------------------------------------------------------------


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from dam.server import ServerSettings, create_app, run_server
    except ImportError as error:
        raise ImportError(
            f"dam serve needs FastAPI and uvicorn ({error}): pip install 'describe-anything-toolkit[demo]'"
        ) from error
    from dam.describe import DescribeAnything
    from dam.server.app import DEFAULT_MAX_IMAGE_PIXELS

    if args.sam_checkpoint is not None and not Path(args.sam_checkpoint).is_file():
        raise DamInputError(
            f"SAM checkpoint {args.sam_checkpoint!r} does not exist; download an official one "
            f"(sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth or sam_vit_b_01ec64.pth) and pass its path"
        )
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)  # the batching worker and request threads inherit it
    describer = DescribeAnything.from_pretrained(
        args.model,
        device=args.device or _default_device(),
        dtype=args.dtype,
        sam_checkpoint=args.sam_checkpoint,
        sam_model_type=args.sam_model_type,
    )
    settings = ServerSettings(
        model_name=args.served_model_name or (Path(args.model).resolve().name if args.model else "dam-builtin"),
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_image_pixels=args.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
        ui=args.ui,
        generation=args.generation,
    )
    if args.ui:
        logger.info("demo page: http://%s:%d/", args.host, args.port)
    run_server(create_app(describer, settings), args.host, args.port, access_log=args.verbose > 0)
    return 0


# ---- entry point ------------------------------------------------------------------------


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING if args.verbose <= 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="dam: %(levelname)s: %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    """Run the ``dam`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    return run_command(build_parser(), argv, _configure_logging, (DamInputError, FileNotFoundError, ImportError))


if __name__ == "__main__":
    sys.exit(main())
