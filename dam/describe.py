"""DescribeAnything: caption a masked region, a box, clicked points or a video masklet.

    from dam import DescribeAnything
    model = DescribeAnything.from_pretrained("path/to/dam", device="cuda", dtype="bfloat16")
    text = model.describe(image, mask)
    texts = model.describe_batch([(image, mask), ...], batch_size=32)

`describe_batch` really batches: regions sorted by prompt length so that padding stays small,
the vision tower run once per batch; greedy results equal one-at-a-time calls. Text comes from
one of two generation paths (`generation=`, default "auto": "fast" on CUDA, "plain" elsewhere):
- "plain": transformers `generate`, one left-padded batch of `batch_size` regions at a time;
- "fast" (dam.generation): continuous batching over a pre-allocated per-slot KV cache with
  CUDA-graph-captured decode steps; `batch_size` regions decode together, each stopping on its
  own, freed slots refilled with waiting regions. Same greedy text as "plain"; settings it does
  not implement (beams, repetition penalty, streamers, stopping criteria, ...) fall back to
  "plain" with one log line. `stream` always uses "plain".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TextIteratorStreamer

from dam.errors import DamInputError
from dam.generation import FastGenerator, PromptQueue, SamplingSettings, unsupported_reason
from dam.generation.steps import DECODE_STEP_KINDS, DecodeStepKind
from dam.images import load_image_and_alpha
from dam.masks import load_mask
from dam.modeling import DamForConditionalGeneration, convert_nvlabs_checkpoint, is_nvlabs_layout
from dam.processing import DamProcessor
from dam.video import prepare_video_inputs

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 512
BUILTIN_MODEL = Path(__file__).resolve().parent / "builtin" / "shapes_tiny"
"""The built-in model: a tiny DAM trained on ShapesDLC (configs/train/shapes_tiny.yaml), a few MB."""

GenerationMode = Literal["auto", "plain", "fast"]
GENERATION_MODES: tuple[str, ...] = ("auto", "plain", "fast")


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
    """A loaded DAM with its processor (and optionally SAM for boxes and points).

    `generation` picks how text is generated: "fast" (dam.generation: slot KV cache,
    continuous batching, graph-captured decode steps), "plain" (transformers `generate`), or
    "auto" (fast on CUDA, plain elsewhere). `decode_step` is the fast path's step: "auto"
    (CUDA graphs on CUDA, eager elsewhere), "eager", "cuda_graph" or "compile" (torch.compile,
    plus CUDA graphs on CUDA). Both are attributes and may be changed between calls. The fast
    path keeps its KV cache allocated between calls, and captures a CUDA graph the first time
    it meets a (batch, length) bucket: first calls are slower, later ones replay the graphs.
    """

    def __init__(
        self,
        model: DamForConditionalGeneration,
        tokenizer: PreTrainedTokenizerBase,
        sam: Any = None,
        *,
        generation: GenerationMode = "auto",
        decode_step: DecodeStepKind = "auto",
    ) -> None:
        self.model = model.eval()
        self.processor = DamProcessor(tokenizer, model.config)
        self.tokenizer = tokenizer
        self.sam = sam
        self.generation = generation
        self.decode_step = decode_step
        self._fast: FastGenerator | None = None
        self._fallbacks_logged: set[str] = set()

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
        generation: GenerationMode = "auto",
        decode_step: DecodeStepKind = "auto",
    ) -> "DescribeAnything":
        """Load a DAM checkpoint (a folder written by `save_pretrained`, or a hub id); without
        a path, the built-in ShapesDLC model (it knows only ShapesDLC scenes).

        `sam_checkpoint` (a segment-anything .pth) enables `box=` and `points=` prompts.
        A released NVlabs checkpoint folder (DAM-3B, DAM-3B-Video: llm/, vision_tower/, ...) is
        converted in memory (`dam convert --from-nvlabs` saves the conversion);
        `nvlabs_variant` ("auto", "image" or "joint") then picks its default queries.
        `generation` and `decode_step`: see the class docstring.
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
        return cls(model.to(device), tokenizer, sam=sam, generation=generation, decode_step=decode_step)

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

    def _fast_settings(self, generate_kwargs: dict[str, Any]) -> SamplingSettings | None:
        """The fast path's settings for this call, or None to use the plain `generate`."""
        if self.generation not in GENERATION_MODES:
            raise DamInputError(f"generation must be one of {GENERATION_MODES}, got {self.generation!r}")
        if self.decode_step not in DECODE_STEP_KINDS:
            raise DamInputError(f"decode_step must be one of {DECODE_STEP_KINDS}, got {self.decode_step!r}")
        if self.generation == "plain" or (self.generation == "auto" and self.device.type != "cuda"):
            return None
        settings = unsupported_reason(self.model.language_model) or SamplingSettings.resolve(
            self.model.generation_config, self._generation_kwargs(generate_kwargs)
        )
        if isinstance(settings, str):
            if settings not in self._fallbacks_logged:  # once per reason, not once per call
                self._fallbacks_logged.add(settings)
                level = logging.WARNING if self.generation == "fast" else logging.INFO
                logger.log(level, "fast generation is off for %s; using transformers generate", settings)
            return None
        return settings

    def _fast_generator(self) -> FastGenerator:
        fast = self._fast
        if fast is None or fast.requested_step != self.decode_step or fast.device != self.device:
            self._fast = FastGenerator(self.model.language_model, decode_step=self.decode_step)
        return self._fast

    def _generate_fast(
        self,
        requests: Sequence[_Request],
        settings: SamplingSettings,
        slots: int,
        on_finish: Callable[[int, list[int]], None] | None = None,
    ) -> list[str]:
        lengths = [len(self.processor.prompt_ids(r.query, len(r.frames))) for r in requests]

        def prepare(indices: list[int]) -> dict[str, torch.Tensor]:
            # CPU only (focal crops, resizing, token ids): runs ahead on the queue's thread.
            return self.processor([requests[i].frames for i in indices], [requests[i].query for i in indices])

        def embed(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            # One batched vision call (global and regional pass) per chunk of regions.
            pixel_values = batch["pixel_values"].to(self.device, self.model.vision.mask_patch_embedding.weight.dtype)
            input_ids, attention_mask = batch["input_ids"].to(self.device), batch["attention_mask"]
            embeds = self.model.embed_inputs(
                input_ids, pixel_values, batch["crop_is_full_image"].to(self.device)
            )  # (B, L, D), left-padded
            return [embeds[row, embeds.shape[1] - int(length) :] for row, length in enumerate(attention_mask.sum(-1))]

        with PromptQueue(lengths, embed, chunk_size=slots, prepare=prepare) as queue:
            tokens = self._fast_generator().generate(queue, settings, max_slots=slots, on_finish=on_finish)
        return [text.strip() for text in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]

    def _generate(self, requests: Sequence[_Request], generate_kwargs: dict[str, Any]) -> list[str]:
        settings = self._fast_settings(generate_kwargs)
        if settings is not None:
            return self._generate_fast(requests, settings, slots=len(requests))
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
        """Describe many regions; results in input order.

        Each region is (image, mask), (image, mask, query), or a dict with image and one of
        mask / box / points (optionally query), or a dict with video and masks. `batch_size`
        regions go through the vision tower together and decode together: one `generate` per
        batch on the plain path; on the fast path, `batch_size` decode slots that waiting
        regions refill as captions end (see the class docstring for `generation`).
        """
        if batch_size < 1:
            raise DamInputError(f"batch_size must be >= 1, got {batch_size}")
        requests = [self._request(item, query) for item in regions]
        # Similar prompt lengths side by side keep padding small; order is restored below.
        lengths = [len(self.processor.prompt_ids(r.query, len(r.frames))) for r in requests]
        order = sorted(range(len(requests)), key=lambda index: lengths[index])
        texts: list[str | None] = [None] * len(requests)
        settings = self._fast_settings(generate_kwargs)
        if settings is not None:
            with tqdm(total=len(order), desc="describe", unit="region", disable=not progress) as bar:
                generated = self._generate_fast(
                    [requests[i] for i in order], settings, slots=batch_size, on_finish=lambda *_: bar.update()
                )
            for index, text in zip(order, generated):
                texts[index] = text
            return texts  # type: ignore[return-value]
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
        """Yield the description of one region piece by piece as it is generated (always
        through transformers `generate`, whose streamer this uses)."""
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
