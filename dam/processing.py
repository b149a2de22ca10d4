"""DamProcessor: images + masks -> focal-prompt tensors; queries -> token ids with image slots.

One processor serves inference (`describe`), the training collator and the benchmarks, so
preprocessing cannot drift between them. Pixels: each of the four focal views is resized to
the tower's square input (bicubic, antialiased, no aspect preservation), quantised to 8 bits
as the reference's PIL path does, and scaled to [-1, 1] (mask 0 -> -1, 1 -> +1). With
`config.resize_backend == "pil"` the resize is PIL's own bicubic on the 8-bit image, which is
what the released checkpoints' SigLIP image processor does, bit for bit (torch's float
bicubic differs by up to tens of levels on noisy upsampled images). Text: the
prompt is tokenised in chunks around each `<image>` (special tokens only on the first chunk,
as the released checkpoints were), with `num_image_tokens` placeholder ids per slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import PreTrainedTokenizerBase

from dam.errors import DamInputError
from dam.focal import FocalPrompt, build_focal_prompt
from dam.modeling.configuration_dam import DamConfig
from dam.prompts import IMAGE_PLACEHOLDER, render_conversation, with_image_slots

IGNORE_INDEX = -100
_PROMPT_CACHE_SIZE = 4096


@dataclass
class EncodedText:
    """Token ids of one conversation; `labels` mark the answer (IGNORE_INDEX elsewhere)."""

    input_ids: list[int]
    labels: list[int] | None = None


def _resize_views_torch(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(h, w, C) or (h, w) uint8 -> (C, size, size) in [-1, 1]: torch bicubic (antialiased),
    8-bit quantised like PIL output."""
    tensor = torch.from_numpy(np.ascontiguousarray(pixels)).float()
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (C, h, w)
    resized = F.interpolate(tensor[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0].clamp_(0, 255).round_().div_(127.5).sub_(1.0)


def _resize_views_pil(pixels: np.ndarray, size: int) -> torch.Tensor:
    """(h, w, C) or (h, w) uint8 -> (C, size, size) in [-1, 1], resized by PIL's bicubic filter.

    As the SigLIP image processor: PIL resize (BICUBIC, no aspect preservation) of the 8-bit
    image, then (x / 255 - 0.5) / 0.5, which equals x / 127.5 - 1 in float32 for every level.
    """
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(pixels)).resize((size, size), Image.BICUBIC))
    tensor = torch.from_numpy(resized.copy()).float()
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)  # (C, S, S)
    return tensor.div_(127.5).sub_(1.0)


class DamProcessor:
    """Builds model inputs from (image, mask) regions and queries for one DAM configuration."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: DamConfig) -> None:
        self.tokenizer = tokenizer
        self.image_size = config.vision_config.image_size
        self.num_image_tokens = config.num_image_tokens
        self.image_token_id = config.image_token_id
        self.template = config.prompt_template
        self.alpha = config.focal_alpha
        self.min_size = config.focal_min_size
        self.default_query = config.default_query
        self.default_video_query = getattr(config, "default_video_query", None)
        self.resize_backend = getattr(config, "resize_backend", "torch")
        if tokenizer.pad_token_id is None:
            raise DamInputError("the tokenizer has no pad token: set tokenizer.pad_token (e.g. to its EOS token)")
        self._prompt_ids: dict[tuple[str | None, int], list[int]] = {}

    # ---- pixels -------------------------------------------------------------------------

    def focal_prompts(self, regions: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[FocalPrompt]:
        """Focal prompts of (uint8 (H, W, 3) image, bool (H, W) mask) pairs."""
        return [build_focal_prompt(image, mask, self.alpha, self.min_size) for image, mask in regions]

    def pixel_values(self, prompts: Sequence[FocalPrompt]) -> torch.Tensor:
        """(N, 8, S, S) float32 tensors [full RGB, full mask, crop RGB, crop mask] in [-1, 1].

        The full image of regions that share one image array is resized once.
        """
        resize = _resize_views_pil if self.resize_backend == "pil" else _resize_views_torch
        size = self.image_size
        out = torch.empty((len(prompts), 8, size, size), dtype=torch.float32)
        full_rgb_cache: dict[int, torch.Tensor] = {}
        for row, prompt in enumerate(prompts):
            key = id(prompt.image)
            if key not in full_rgb_cache:
                full_rgb_cache[key] = resize(prompt.image, size)
            out[row, 0:3] = full_rgb_cache[key]
            out[row, 3:4] = resize(prompt.mask.astype(np.uint8) * 255, size)
            out[row, 4:7] = resize(prompt.crop, size)
            out[row, 7:8] = resize(prompt.crop_mask.astype(np.uint8) * 255, size)
        return out

    # ---- text ---------------------------------------------------------------------------

    def _default_query(self, num_frames: int) -> str:
        """The configured query for `num_frames` frames (the video one for several frames)."""
        query = self.default_video_query
        if num_frames == 1 or not query:
            return self.default_query
        slots = query.count(IMAGE_PLACEHOLDER)
        run = IMAGE_PLACEHOLDER * slots
        if 0 < slots != num_frames and run in query:  # one run of slots: resize it to the frame count
            query = query.replace(run, IMAGE_PLACEHOLDER * num_frames)
        return query

    def _tokenize_chunks(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for index, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if index:
                ids.extend([self.image_token_id] * self.num_image_tokens)
            if chunk or (index == 0 and add_special_tokens):
                ids.extend(self.tokenizer(chunk, add_special_tokens=add_special_tokens and index == 0)["input_ids"])
        return ids

    def encode(self, query: str | None = None, num_frames: int = 1, answer: str | None = None) -> EncodedText:
        """Token ids of the prompt for `num_frames` frames; with `answer`, also training labels."""
        user_turn = with_image_slots(query or self._default_query(num_frames), num_frames)
        rendered = render_conversation(self.template, self.tokenizer, user_turn, answer)
        input_ids = self._tokenize_chunks(rendered.prompt, rendered.bos_on_first_chunk)
        if rendered.answer is None:
            return EncodedText(input_ids)
        answer_ids = self.tokenizer(rendered.answer, add_special_tokens=False)["input_ids"]
        if self.template != "chat":  # chat templates close the turn themselves
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
        return EncodedText(input_ids + answer_ids, [IGNORE_INDEX] * len(input_ids) + answer_ids)

    def prompt_ids(self, query: str | None, num_frames: int) -> list[int]:
        """`encode(query, num_frames).input_ids`, tokenised once per distinct (query, frames)."""
        key = (query, num_frames)
        if key not in self._prompt_ids:
            if len(self._prompt_ids) >= _PROMPT_CACHE_SIZE:  # many distinct free-form queries
                self._prompt_ids.clear()
            self._prompt_ids[key] = self.encode(query, num_frames).input_ids
        return self._prompt_ids[key]

    def pad(
        self, sequences: Sequence[Sequence[int]], side: str = "left", value: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) padded ids and attention mask; left padding for generation, right for training."""
        if side not in ("left", "right"):
            raise DamInputError(f"padding side must be 'left' or 'right', got {side!r}")
        pad_value = self.tokenizer.pad_token_id if value is None else value
        length = max(len(seq) for seq in sequences)
        ids = torch.full((len(sequences), length), pad_value, dtype=torch.long)
        attention = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            ids[row, span] = torch.tensor(list(seq), dtype=torch.long)
            attention[row, span] = 1
        return ids, attention

    # ---- both ---------------------------------------------------------------------------

    def __call__(
        self,
        regions: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]],
        queries: Sequence[str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Generation inputs for a batch: each item is a list of (image, mask) frames.

        Returns input_ids and attention_mask (left-padded), pixel_values (all frames in
        order, (sum F, 8, S, S)) and crop_is_full_image ((sum F,) bool).
        """
        queries = list(queries) if queries is not None else [None] * len(regions)
        if len(queries) != len(regions):
            raise DamInputError(f"{len(queries)} queries given for {len(regions)} regions")
        prompts = [prompt for frames in regions for prompt in self.focal_prompts(frames)]
        encoded = [self.prompt_ids(query, len(frames)) for frames, query in zip(regions, queries)]
        input_ids, attention_mask = self.pad(encoded, side="left")
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": self.pixel_values(prompts),
            "crop_is_full_image": torch.tensor([p.crop_is_full_image for p in prompts], dtype=torch.bool),
        }
