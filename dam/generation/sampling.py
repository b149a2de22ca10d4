"""Generation settings of the fast path and the choice of the next token from logits.

`SamplingSettings.resolve` reads a transformers `GenerationConfig` plus per-call overrides the
way `generate` does, and refuses (returns a reason) whatever the fast path does not implement
(beam search, repetition penalties, streamers, stopping criteria, ...), so that the caller can
fall back to the plain `generate` instead of silently ignoring a setting.

`choose_tokens` does what transformers' greedy search / sampling do for these settings, in the
same order (min-new-tokens EOS suppression, temperature, top-k, top-p), in float32.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

# Settings the fast path implements, and those it may ignore because they do not change the
# tokens of a single-sequence, cached, text-only generation.
_IMPLEMENTED = {"max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "eos_token_id"}
_HARMLESS = {
    "pad_token_id", "bos_token_id", "use_cache", "cache_implementation", "output_attentions",
    "output_hidden_states", "return_dict_in_generate", "output_scores", "output_logits",
    "transformers_version", "_from_model_config", "max_length", "decoder_start_token_id",
    "compile_config", "disable_compile",
}
# transformers' defaults for what a config leaves unset (GenerationConfig keeps None there).
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_new_tokens": 0}


def _transformers_defaults() -> dict[str, Any]:
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return dict(defaults()) if callable(defaults) else {}


@dataclass(frozen=True)
class SamplingSettings:
    """What decides each sequence's tokens and when it stops."""

    max_new_tokens: int
    """Stop a sequence after this many new tokens (its EOS included)."""
    min_new_tokens: int = 0
    """EOS cannot be chosen before this many new tokens."""
    do_sample: bool = False
    """Sample (temperature, top-k, top-p) instead of taking the most likely token."""
    temperature: float = 1.0
    top_k: int = 0
    """Keep the k most likely tokens when sampling (0: all)."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probability reaches top_p when sampling."""
    eos_token_ids: tuple[int, ...] = ()
    """Any of these ends a sequence (it is kept as the sequence's last token)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @classmethod
    def resolve(
        cls, generation_config: GenerationConfig, overrides: Mapping[str, Any]
    ) -> "SamplingSettings | str":
        """Settings of `generation_config` updated by `overrides` (generate's keyword arguments),
        or a sentence naming what the fast path does not implement."""
        config = copy.deepcopy(generation_config)
        not_generation_settings = config.update(**dict(overrides))
        if not_generation_settings:
            return f"arguments {sorted(not_generation_settings)} are not supported by fast generation"
        defaults = _transformers_defaults()
        unsupported = sorted(
            key for key, value in config.to_diff_dict().items()
            if key not in _IMPLEMENTED and key not in _HARMLESS and value != defaults.get(key, None)
        )
        if unsupported:
            return f"generation settings {unsupported} are not supported by fast generation"
        if config.max_new_tokens is None:
            return "fast generation needs max_new_tokens (max_length counts the prompt)"
        eos = config.eos_token_id
        eos_ids = () if eos is None else (int(eos),) if isinstance(eos, int) else tuple(int(e) for e in eos)
        value = {key: getattr(config, key) for key in _SAMPLING_DEFAULTS}
        value = {key: _SAMPLING_DEFAULTS[key] if v is None else v for key, v in value.items()}
        return cls(
            max_new_tokens=int(config.max_new_tokens),
            min_new_tokens=int(value["min_new_tokens"]),
            do_sample=bool(config.do_sample),
            temperature=float(value["temperature"]),
            top_k=int(value["top_k"]),
            top_p=float(value["top_p"]),
            eos_token_ids=eos_ids,
        )


def filter_scores(scores: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """(R, V) float scores -> temperature-scaled scores with what top-k / top-p drop at -inf."""
    scores = scores / settings.temperature
    if 0 < settings.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, settings.top_k, dim=-1).values[:, -1:]  # (R, 1)
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if settings.top_p < 1.0:
        # As transformers' TopPLogitsWarper: drop the least likely tokens whose total mass
        # stays within 1 - top_p, always keeping the most likely one.
        ascending, order = torch.sort(scores, dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - settings.top_p
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return scores


def choose_tokens(
    logits: torch.Tensor,
    generated: torch.Tensor,
    settings: SamplingSettings,
    eos_ids: torch.Tensor | None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(R, V) next-token logits and (R,) counts of tokens generated so far -> (R,) token ids."""
    scores = logits.float()  # (R, V)
    if eos_ids is not None and settings.min_new_tokens > 0:
        too_early = (generated < settings.min_new_tokens)[:, None]  # (R, 1)
        eos_scores = scores.index_select(1, eos_ids).masked_fill(too_early, float("-inf"))
        scores = scores.index_copy(1, eos_ids, eos_scores)
    if not settings.do_sample:
        return scores.argmax(dim=-1)
    probabilities = filter_scores(scores, settings).softmax(dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential race) without a host sync.
    race = torch.empty_like(probabilities).exponential_(generator=generator)
    return (probabilities / race).argmax(dim=-1)
