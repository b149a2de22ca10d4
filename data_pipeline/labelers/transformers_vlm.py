"""The ``transformers`` labeler: a local VLM (Qwen2-VL, LLaVA, Gemma 3, ...) run in-process.

The generic transformers path: ``AutoProcessor`` + ``AutoModelForImageTextToText`` from a local
folder, the processor's chat template with two image parts (focal crop, full image with the
region highlighted) and the text prompt, left padding, one ``generate`` per batch of
``batch_size`` regions. Images go to the processor as one list per region, the layout every
multi-image processor accepts. A batch that runs out of GPU memory is split in halves.

Greedy by default (``temperature: 0``), so a region's label depends only on its seed (through
the prompt variant). With sampling, the torch seed of a batch is derived from its regions'
seeds and the attempt: reproducible for the same batches, not across batch sizes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dam.errors import DamInputError

from data_pipeline.labelers.base import (
    Generated,
    LabelRequest,
    LabelResult,
    VlmLabelerConfig,
    label_in_rounds,
    split_on_oom,
)
from data_pipeline.devices import resolve_device
from data_pipeline.prompts import PROMPT_VARIANTS, build_prompt, check_templates
from data_pipeline.views import describe_views, render_views

logger = logging.getLogger(__name__)

__all__ = ["TransformersLabelerConfig", "TransformersLabeler", "resolve_dtype", "batch_seed"]


@dataclass(kw_only=True)
class TransformersLabelerConfig(VlmLabelerConfig):
    """``labeler:`` section with ``type: transformers``."""

    path: str
    """Local folder of a transformers image-text-to-text model (config, weights, processor)."""
    device: str | None = None
    """torch device; null: this process's GPU (cuda:LOCAL_RANK, data_pipeline.devices) if CUDA is available, else cpu."""
    dtype: str = "auto"
    """auto (the checkpoint's), float32, bfloat16 or float16."""
    batch_size: int = 8
    max_new_tokens: int = 512
    temperature: float = 0.0
    """0: greedy."""
    top_p: float | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    """e.g. sdpa or flash_attention_2; null: the model's default."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise DamInputError(f"labeler.{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise DamInputError(f"labeler.temperature must be >= 0, got {self.temperature}")
        if self.rejection_retries < 0:
            raise DamInputError(f"labeler.rejection_retries must be >= 0, got {self.rejection_retries}")
        resolve_dtype(self.dtype)
        if self.prompts is not None:
            check_templates(self.prompts)


def resolve_dtype(dtype: str | None) -> torch.dtype | str | None:
    """A dtype name as from_pretrained takes it ("auto" and None pass through)."""
    if dtype is None or dtype == "auto":
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise DamInputError(f"labeler.dtype {dtype!r} is unknown: use auto, float32, bfloat16 or float16")
    return resolved


def batch_seed(items: Sequence[tuple[LabelRequest, int]]) -> int:
    """A torch seed that depends only on the regions of a batch and their attempts."""
    text = ",".join(f"{request.seed}:{attempt}" for request, attempt in items)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


class TransformersLabeler:
    """Labels regions with a local transformers VLM; see the module docstring."""

    def __init__(self, config: TransformersLabelerConfig) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.config = config
        path = Path(config.path).expanduser()
        if not (path / "config.json").is_file():
            raise DamInputError(
                f"labeler.path {config.path!r} is not a transformers model folder (no config.json); pass the local "
                f"folder of an image-text-to-text model (e.g. a downloaded Qwen2.5-VL)"
            )
        self.device = resolve_device(config.device, "labeler.device")
        load: dict[str, Any] = {"trust_remote_code": config.trust_remote_code}
        try:
            self.processor = AutoProcessor.from_pretrained(path, **load)
            if config.attn_implementation is not None:
                load["attn_implementation"] = config.attn_implementation
            self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=resolve_dtype(config.dtype), **load)
        except (OSError, ValueError, KeyError) as error:
            raise DamInputError(
                f"labeler.path {config.path!r}: could not load an image-text-to-text model and its processor "
                f"({type(error).__name__}: {error})"
            ) from error
        self.model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not getattr(self.processor, "chat_template", None):
            raise DamInputError(
                f"labeler.path {config.path!r}: the processor has no tokenizer or no chat template; the transformers "
                f"labeler needs a chat VLM whose processor formats image parts (an instruct checkpoint)"
            )
        self.tokenizer.padding_side = "left"  # generation continues every row from its right end
        self.templates = check_templates(config.prompts) if config.prompts else PROMPT_VARIANTS
        self.views_text = describe_views(config.views)
        generation = self.model.generation_config
        eos = generation.eos_token_id if generation.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(self.eos_ids), 0)
        logger.info("transformers labeler: %s on %s", config.path, self.device)

    def label(self, requests: Sequence[LabelRequest]) -> list[LabelResult]:
        """One result per request, in order."""
        return label_in_rounds(
            list(requests), self._generate_all, cleaning=self.config.cleaning,
            rejection_retries=self.config.rejection_retries,
        )

    def _generate_all(self, items: list[tuple[LabelRequest, int]]) -> list[Generated | LabelResult]:
        outputs: list[Generated | LabelResult] = []
        size = self.config.batch_size
        for start in range(0, len(items), size):
            outputs.extend(split_on_oom(items[start : start + size], self._generate_batch))
        return outputs

    def prompt_text(self, request: LabelRequest, attempt: int) -> str:
        """The chat-formatted prompt of one region (two image parts, then the text)."""
        prompt = build_prompt(request.category, request.seed, attempt, views=self.views_text, templates=self.templates)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    @torch.inference_mode()
    def _generate_batch(self, items: list[tuple[LabelRequest, int]]) -> list[Generated | LabelResult]:
        texts, images = [], []
        for request, attempt in items:
            views = render_views(request.image, request.mask, self.config.views)
            texts.append(self.prompt_text(request, attempt))
            images.append([Image.fromarray(views.crop), Image.fromarray(views.full)])
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        dtype = self.model.dtype
        inputs = {
            key: value.to(self.device, dtype=dtype if value.is_floating_point() else None)
            for key, value in inputs.items()
            if isinstance(value, torch.Tensor)
        }
        config = self.config
        sampling = config.temperature > 0
        kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": sampling, "pad_token_id": self.pad_id}
        if sampling:
            kwargs["temperature"] = config.temperature
            if config.top_p is not None:
                kwargs["top_p"] = config.top_p
            torch.manual_seed(batch_seed(items))
        output = self.model.generate(**inputs, **kwargs)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]  # (B, generated)
        decoded = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
        results: list[Generated | LabelResult] = []
        for row, text in zip(new_tokens.tolist(), decoded):
            stopped = any(token in self.eos_ids for token in row)
            results.append(Generated(text.strip(), not stopped and len(row) >= config.max_new_tokens))
        return results
