"""Generation settings of the fast path and the choice of the next token from logits.

`SamplingSettings.resolve` reads a transformers `GenerationConfig` plus per-call overrides the
way `generate` does, and refuses (returns a reason) whatever the fast path does not implement
(beam search, repetition penalties, streamers, stopping criteria, ...), so that the caller can
fall back to the plain `generate` instead of silently ignoring a setting.

`choose_tokens` does what transformers' greedy search / sampling do for these settings, in the
same order (min-new-tokens EOS suppression, temperature, top-k, top-p), in float32, when every
row shares one set of settings. `RowChooser` does the same for rows that each have their own
(a server's requests): each row's token depends on its own logits, settings and, with a `seed`,
its own generator only, so a seeded request gets the same text whatever it is batched with.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
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
    seed: int | None = None
    """Sample this sequence from a generator of its own seeded with this (see `row_generator`),
    so that its tokens do not depend on the sequences it shares decode steps with."""

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


def row_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """The generator of one sequence with a seed (None without one: the caller's or torch's)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed % (1 << 64))  # any int64 seed, as OpenAI's


class RowChooser:
    """Next tokens of rows that each have their own `SamplingSettings` (None: an empty row).

    Build one per set of rows (again when rows start, end or move). Row r's token depends only
    on its own logits, settings and `generators[r]`: min-new-tokens masks its EOS ids, greedy
    rows take the argmax, sampled rows draw from softmax(scores / temperature) restricted to
    the top-k, then to the smallest set whose mass reaches top-p (renormalised after top-k), by
    the exponential race argmax(p / E), E ~ Exp(1), which draws what `torch.multinomial(p, 1)`
    draws from the same generator, without a host sync. Sampled rows without a generator of
    their own share the `generator` passed to the call (None: torch's global one).
    """

    def __init__(
        self,
        settings: Sequence[SamplingSettings | None],
        generators: Sequence[torch.Generator | None],
        device: torch.device | str,
    ) -> None:
        if len(generators) != len(settings):
            raise ValueError(f"{len(settings)} rows of settings but {len(generators)} generators")
        self.rows = len(settings)
        waits = [s is not None and s.min_new_tokens > 0 for s in settings]
        eos = sorted({e for s, w in zip(settings, waits) if w for e in s.eos_token_ids})  # type: ignore[union-attr]
        self.eos_ids: torch.Tensor | None = None
        if eos:
            self.eos_ids = torch.tensor(eos, device=device)  # (E,)
            # (R, E): which of the ids are row r's own EOS (rows may end on different ids).
            self.eos_of_row = torch.tensor(
                [[w and e in s.eos_token_ids for e in eos] for s, w in zip(settings, waits)],  # type: ignore[union-attr]
                dtype=torch.bool, device=device,
            )
            self.min_new = torch.tensor([s.min_new_tokens if s is not None else 0 for s in settings], device=device)
        sampled = [r for r, s in enumerate(settings) if s is not None and s.do_sample]
        self.sampled: torch.Tensor | None = torch.tensor(sampled, device=device) if sampled else None
        chosen = [settings[r] for r in sampled]
        self.temperature = torch.tensor([[s.temperature] for s in chosen], dtype=torch.float32, device=device)  # (K, 1)
        self.top_k = torch.tensor([[s.top_k] for s in chosen], dtype=torch.long, device=device)  # (K, 1), 0: all
        self.use_top_k = any(s.top_k > 0 for s in chosen)
        self.use_top_p = any(s.top_p < 1.0 for s in chosen)
        self.top_p = torch.tensor(
            [[s.top_p if s.top_p < 1.0 else float("inf")] for s in chosen], dtype=torch.float32, device=device
        )  # (K, 1); inf: keep all, even where rounding makes the preceding mass reach 1.0
        self.seeded = [(k, generators[r]) for k, r in enumerate(sampled) if generators[r] is not None]
        shared = [k for k, r in enumerate(sampled) if generators[r] is None]
        self.shared: torch.Tensor | None = torch.tensor(shared, device=device) if shared else None

    @property
    def changes_scores(self) -> bool:
        """Whether any row's choice differs from the plain argmax of its logits."""
        return self.eos_ids is not None or self.sampled is not None

    def __call__(
        self, logits: torch.Tensor, generated: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(R, V) next-token logits and (R,) counts of tokens generated so far -> (R,) token ids."""
        scores = logits.float()  # (R, V)
        if self.eos_ids is not None:
            too_early = (generated < self.min_new)[:, None] & self.eos_of_row  # (R, E)
            eos_scores = scores.index_select(1, self.eos_ids).masked_fill(too_early, float("-inf"))
            scores = scores.index_copy(1, self.eos_ids, eos_scores)
        tokens = scores.argmax(dim=-1)  # (R,)
        if self.sampled is None:
            return tokens
        probabilities = (scores.index_select(0, self.sampled) / self.temperature).softmax(dim=-1)  # (K, V)
        if self.use_top_k or self.use_top_p:
            probabilities = self._restrict(probabilities)
        race = torch.empty_like(probabilities)
        for k, own in self.seeded:  # one draw of V exponentials per token, as multinomial makes
            race[k].exponential_(generator=own)
        if self.shared is not None:
            noise = torch.empty((self.shared.shape[0], race.shape[1]), device=race.device)
            race.index_copy_(0, self.shared, noise.exponential_(generator=generator))
        return tokens.index_copy(0, self.sampled, (probabilities / race).argmax(dim=-1))

    def _restrict(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(K, V) probabilities -> the same with what top-k / top-p drop at zero."""
        ordered, order = probabilities.sort(dim=-1, descending=True)  # (K, V)
        ranks = torch.arange(ordered.shape[1], device=ordered.device)[None, :]  # (1, V)
        limited = self.top_k > 0  # (K, 1)
        drop = limited & (ranks >= self.top_k)
        if self.use_top_p:
            kept = ordered.masked_fill(drop, 0.0)
            preceding = kept.cumsum(dim=-1) - kept  # mass of the more likely tokens kept
            # After top-k, top-p applies to the renormalised distribution, as in transformers.
            threshold = torch.where(limited, self.top_p * kept.sum(dim=-1, keepdim=True), self.top_p)
            drop = drop | (preceding >= threshold)  # the most likely token always stays
        return torch.zeros_like(probabilities).scatter_(1, order, ordered.masked_fill(drop, 0.0))
