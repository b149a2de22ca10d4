"""DescribeAnything: caption a masked region, a box, clicked points or a video masklet.

    from dam import DescribeAnything
    model = DescribeAnything.from_pretrained("path/to/dam", device="cuda", dtype="bfloat16")
    text = model.describe(image, mask)
    texts = model.describe_batch([(image, mask), ...], batch_size=32)

`describe_batch` really batches: left-padded prompts, one `generate` per batch, regions sorted
by prompt length so that padding stays small; greedy results equal one-at-a-time calls.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TextIteratorStreamer

from dam.errors import DamInputError
from dam.images import load_image_and_alpha
from dam.masks import load_mask
from dam.modeling import DamForConditionalGeneration, convert_nvlabs_checkpoint, is_nvlabs_layout
from dam.processing import DamProcessor
from dam.video import prepare_video_inputs

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
BUILTIN_MODEL = Path(__file__).resolve().parent / "builtin" / "shapes_tiny"
"""The built-in model: a tiny DAM trained on ShapesDLC (configs/train/shapes_tiny.yaml), a few MB."""


@dataclass
class _Request:
    frames: list[tuple[np.ndarray, np.ndarray]]
    query: str | None


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise DamInputError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return resolved


class DescribeAnything:
    """A loaded DAM with its processor (and optionally SAM for boxes and points)."""

    def __init__(
        self,
        model: DamForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        sam: Any = None,
    ) -> None:
        self.model = model.eval()
        self.processor = DamProcessor(tokenizer, model.config)
        self.tokenizer = tokenizer
        self.sam = sam

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        sam_checkpoint: str | Path | None = None,
        sam_model_type: str = "vit_h",
        nvlabs_variant: str = "auto",
    ) -> "DescribeAnything":
        """Load a DAM checkpoint (a folder written by `save_pretrained`, or a hub id); without
        a path, the built-in ShapesDLC model (it knows only ShapesDLC scenes).

        `sam_checkpoint` (a segment-anything .pth) enables `box=` and `points=` prompts.
        A released NVlabs checkpoint folder (DAM-3B, DAM-3B-Video: llm/, vision_tower/, ...) is
        converted in memory (`dam convert --from-nvlabs` saves the conversion);
        `nvlabs_variant` ("auto", "image" or "joint") then picks its default queries.
        """
        dtype = _resolve_dtype(dtype)
        if path is None:
            if not (BUILTIN_MODEL / "config.json").is_file():
                raise DamInputError(
                    "DescribeAnything.from_pretrained() needs a model: the built-in ShapesDLC model is "
                    f"missing from this install ({BUILTIN_MODEL}); pass the path of a DAM checkpoint folder"
                )
            path = BUILTIN_MODEL
        local = Path(str(path))
        looks_local = isinstance(path, Path) or local.is_absolute() or str(path).startswith(".") or local.exists()
        if looks_local and not local.is_dir():
            raise DamInputError(f"model folder {path} does not exist: pass the folder of a DAM checkpoint")
        if looks_local and not (local / "config.json").is_file():
            raise DamInputError(f"{path} is not a DAM checkpoint folder (it has no config.json)")
        if looks_local and is_nvlabs_layout(local):
            model, tokenizer = convert_nvlabs_checkpoint(local, dtype=dtype, variant=nvlabs_variant)
            logger.info(
                "%s is a released NVlabs DAM checkpoint: converted in memory "
                "(`dam convert --from-nvlabs %s --out DIR` saves the conversion)", path, path,
            )
        else:
            try:
                model = DamForConditionalGeneration.from_pretrained(path, dtype=dtype)
                tokenizer = AutoTokenizer.from_pretrained(path)
            except OSError as error:
                raise DamInputError(f"could not load a DAM checkpoint from {path!r}: {error}") from error
        sam = None
        if sam_checkpoint is not None:
            from dam.sam import SamPrompter

            sam = SamPrompter.from_checkpoint(sam_checkpoint, sam_model_type, device=str(device))
        return cls(model.to(device), tokenizer, sam=sam)

    def save_pretrained(self, path: str | Path) -> None:
        """Write model, config and tokenizer so that `from_pretrained(path)` restores this."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- inputs -------------------------------------------------------------------------

    def resolve_region(
        self, image: Any, mask: Any = None, box: Any = None, points: Any = None, point_labels: Any = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 image, bool mask) from any accepted image and one of mask / box / points
        (boxes and points through SAM; with none of them, the image's alpha channel)."""
        given = [name for name, value in (("mask", mask), ("box", box), ("points", points)) if value is not None]
        if len(given) > 1:
            raise DamInputError(f"give one of mask, box or points, not {' and '.join(given)}")
        pixels, alpha = load_image_and_alpha(image)
        if mask is None and not given:
            mask = alpha
            if mask is None:
                raise DamInputError(
                    "no region given: pass mask=..., box=[x0, y0, x1, y1] or points=[[x, y], ...] "
                    "(or an RGBA image whose alpha channel is the mask)"
                )
        if mask is None:
            if self.sam is None:
                raise DamInputError(
                    "box and points prompts need segment-anything: load with "
                    "DescribeAnything.from_pretrained(..., sam_checkpoint='sam_vit_h_4b8939.pth')"
                )
            if box is not None:
                mask = self.sam.mask_from_box(pixels, box)
            else:
                mask = self.sam.mask_from_points(pixels, points, point_labels)
        return pixels, load_mask(mask, pixels.shape[:2])

    def _request(self, item: Any, query: str | None) -> _Request:
        if isinstance(item, dict):
            item_query = item.get("query", query)
            if "video" in item:
                frames, masks = prepare_video_inputs(item["video"], item["masks"], self.model.config.num_video_frames)
                return _Request([(f, load_mask(m, f.shape[:2])) for f, m in zip(frames, masks)], item_query)
            keys = {"image", "mask", "box", "points", "point_labels"}
            unknown = set(item) - keys - {"query"}
            if unknown:
                raise DamInputError(f"unknown keys {sorted(unknown)} in a region dict; use {sorted(keys | {'query'})}")
            region = self.resolve_region(**{key: item[key] for key in keys & set(item)})
            return _Request([region], item_query)
        if isinstance(item, (tuple, list)) and len(item) in (2, 3):
            item_query = item[2] if len(item) == 3 else query
            return _Request([self.resolve_region(item[0], item[1])], item_query)
        raise DamInputError(
            f"a region must be (image, mask), (image, mask, query) or a dict with image and mask/box/points, "
            f"got {type(item).__name__}"
        )

    # ---- generation ---------------------------------------------------------------------

    def _generation_kwargs(self, overrides: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(overrides)
        if "max_new_tokens" not in kwargs and self.model.generation_config.max_new_tokens is None:
            kwargs["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        return kwargs

    def _inputs(self, requests: Sequence[_Request]) -> dict[str, torch.Tensor]:
        batch = self.processor([r.frames for r in requests], [r.query for r in requests])
        dtype = self.model.vision.mask_patch_embedding.weight.dtype
        batch["pixel_values"] = batch["pixel_values"].to(dtype)
        return {key: value.to(self.device) for key, value in batch.items()}

    def _generate(self, requests: Sequence[_Request], generate_kwargs: dict[str, Any]) -> list[str]:
        output_ids = self.model.generate(**self._inputs(requests), **self._generation_kwargs(generate_kwargs))
        return [text.strip() for text in self.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]

    def describe(
        self,
        image: Any,
        mask: Any = None,
        *,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        query: str | None = None,
        **generate_kwargs: Any,
    ) -> str:
        """Describe one region of `image`, given as a mask, a box or clicked points."""
        request = _Request([self.resolve_region(image, mask, box, points, point_labels)], query)
        return self._generate([request], generate_kwargs)[0]

    def describe_batch(
        self,
        regions: Sequence[Any],
        *,
        batch_size: int = 32,
        query: str | None = None,
        progress: bool = False,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Describe many regions, `batch_size` per `generate`; results in input order.

        Each region is (image, mask), (image, mask, query), or a dict with image and one of
        mask / box / points (optionally query), or a dict with video and masks.
        """
        if batch_size < 1:
            raise DamInputError(f"batch_size must be >= 1, got {batch_size}")
        requests = [self._request(item, query) for item in regions]
        # Similar prompt lengths side by side keep padding small; order is restored below.
        lengths = [len(self.processor.prompt_ids(r.query, len(r.frames))) for r in requests]
        order = sorted(range(len(requests)), key=lambda index: lengths[index])
        texts: list[str | None] = [None] * len(requests)
        batches = range(0, len(order), batch_size)
        for start in tqdm(batches, desc="describe", unit="batch", disable=not progress):
            chunk = order[start : start + batch_size]
            for index, text in zip(chunk, self._generate([requests[i] for i in chunk], generate_kwargs)):
                texts[index] = text
        return texts  # type: ignore[return-value]

    def describe_video(
        self, video: Any, masks: Any, *, query: str | None = None, **generate_kwargs: Any
    ) -> str:
        """Describe an object through a video: an mp4 path or a list of frames, with its masklet
        (one mask per frame, a {frame: mask} dict, or SA-V RLEs); frames are sampled evenly
        among those where the object is visible."""
        request = self._request({"video": video, "masks": masks, "query": query}, query)
        return self._generate([request], generate_kwargs)[0]

    def stream(
        self,
        image: Any,
        mask: Any = None,
        *,
        box: Sequence[float] | None = None,
        points: Sequence[Sequence[float]] | None = None,
        point_labels: Sequence[int] | None = None,
        query: str | None = None,
        **generate_kwargs: Any,
    ) -> Iterator[str]:
        """Yield the description of one region piece by piece as it is generated."""
        request = _Request([self.resolve_region(image, mask, box, points, point_labels)], query)
        inputs = self._inputs([request])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                self.model.generate(**inputs, streamer=streamer, **self._generation_kwargs(generate_kwargs))
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for piece in streamer:
            if piece:
                yield piece
        worker.join()
        if failure:
            raise failure[0]
