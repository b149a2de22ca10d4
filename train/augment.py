"""Prompt augmentation for training: vary the query so the model learns to follow length hints.

DAM is trained with 15 phrasings of "describe the masked region {suffix}". The suffix is
"in detail" (60%), a sentence count (20%) or a word count (20%) measured on the target caption,
so that at inference "in one sentence" or "in about 50 words" controls the answer's length.
Optionally a sentence naming the region's category is appended. Every draw comes from the
caller's `random.Random`, so a seeded generator reproduces the same queries.
"""

from __future__ import annotations

import functools
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from dam.errors import DamInputError

if TYPE_CHECKING:
    import inflect

SuffixKind = Literal["detail", "sentences", "words"]

PHRASINGS: tuple[str, ...] = (
    "Describe the masked region {suffix}.",
    "Give a description of the masked region {suffix}.",
    "What is in the masked region? Describe it {suffix}.",
    "Describe what you see in the masked region {suffix}.",
    "Please describe the masked region {suffix}.",
    "Provide a description of the masked region {suffix}.",
    "Write a description of the masked region {suffix}.",
    "Describe the object in the masked region {suffix}.",
    "Tell me about the masked region {suffix}.",
    "Explain what is shown in the masked region {suffix}.",
    "Caption the masked region {suffix}.",
    "Look at the masked region and describe it {suffix}.",
    "Focus on the masked region and describe it {suffix}.",
    "Can you describe the masked region {suffix}?",
    "How would you describe the masked region {suffix}?",
)
"""Query templates; each holds one `{suffix}` and no `<image>` slot (added by with_image_slots)."""

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s|$)")
_ALNUM = re.compile(r"[^\W_]")
# Singular words that inflect mistakes for plurals ("bus" -> "bu", "cactus" -> "cactu").
_SINGULAR_ENDINGS = ("us", "is", "as", "ss")


def count_words(caption: str) -> int:
    """Number of whitespace-separated tokens holding at least one letter or digit."""
    return sum(1 for token in caption.split() if _ALNUM.search(token))


def count_sentences(caption: str) -> int:
    """Number of sentences: runs ended by . ! ? before whitespace or the end, plus a trailing fragment.

    "3.5" does not split (no whitespace after the dot); abbreviations such as "e.g. a" do.
    Non-empty text counts at least one sentence; empty text counts none.
    """
    if not caption.strip():
        return 0
    pieces = _SENTENCE_END.split(caption)
    return max(1, sum(1 for piece in pieces if _ALNUM.search(piece)))


def word_count_suffix(n: int) -> str:
    """"in N words" up to 20, "in about R words" up to 200 (n rounded half up to tens), then "more than 200"."""
    if n < 1:
        raise DamInputError(f"word count {n} is not positive: give a caption with at least one word")
    if n <= 20:
        return "in 1 word" if n == 1 else f"in {n} words"
    if n <= 200:
        return f"in about {(n + 5) // 10 * 10} words"
    return "in more than 200 words"


def sentence_count_suffix(n: int) -> str:
    """"in one sentence" or "in N sentences"."""
    if n < 1:
        raise DamInputError(f"sentence count {n} is not positive: give a caption with at least one sentence")
    return "in one sentence" if n == 1 else f"in {n} sentences"


@functools.cache
def _engine() -> inflect.engine:
    """The inflect engine, built on first use (importing inflect takes seconds)."""
    import inflect

    return inflect.engine()


def _noun_phrase(name: str) -> str:
    """`name` with "a"/"an", or bare if it is plural ("glasses", "traffic lights")."""
    singular = _engine().singular_noun(name)
    plural = singular is not False and singular != name and not name.endswith(_SINGULAR_ENDINGS)
    return name if plural else _engine().a(name)


def category_phrase(category: str) -> str:
    """Noun phrase for a category: "a dog", "an apple", "glasses"; PACO parts "dog:ear" -> "the ear of a dog".

    Underscores become spaces and parenthesised qualifiers are dropped, so LVIS names such as
    "bow_(weapon)" read "a bow". Returns "" for a name with no words left.
    """
    name = " ".join(re.sub(r"\([^)]*\)", " ", category.replace("_", " ")).split())
    whole, _, part = (s.strip() for s in name.partition(":"))
    if whole and part:
        return f"the {part} of {_noun_phrase(whole)}"
    name = whole or part
    return _noun_phrase(name) if name else ""


@dataclass
class PromptAugmentation:
    """How training queries are drawn: phrasing, length suffix and optional category hint."""

    enabled: bool = True
    """Draw varied queries; when False every sample uses `fixed_query`."""
    detail_prob: float = 0.6
    """Probability of the suffix "in detail"."""
    sentence_prob: float = 0.2
    """Probability of a sentence-count suffix taken from the target caption."""
    word_prob: float = 0.2
    """Probability of a word-count suffix taken from the target caption."""
    category_prob: float = 0.0
    """Probability of appending "The masked region contains a <category>." when a category is known."""
    fixed_query: str = "Describe the masked region in detail."
    """The query used for every sample when `enabled` is False."""

    def __post_init__(self) -> None:
        for field in ("detail_prob", "sentence_prob", "word_prob", "category_prob"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise DamInputError(f"PromptAugmentation.{field} is {value!r}: set it to a probability in [0, 1]")
        total = self.detail_prob + self.sentence_prob + self.word_prob
        if abs(total - 1.0) > 1e-6:
            raise DamInputError(
                f"PromptAugmentation.detail_prob + sentence_prob + word_prob is {total:g}: "
                "set them so that they sum to 1"
            )
        if not self.fixed_query.strip():
            raise DamInputError("PromptAugmentation.fixed_query is empty: give the query to use when disabled")

    def suffix_kind(self, rng: random.Random) -> SuffixKind:
        """Which suffix to use, drawn with one `rng.random()`."""
        u = rng.random()
        if u < self.detail_prob:
            return "detail"
        return "sentences" if u < self.detail_prob + self.sentence_prob else "words"

    def suffix(self, caption: str, rng: random.Random) -> str:
        """A length suffix for `caption`: "in detail", "in 3 sentences", "in about 40 words"..."""
        if not caption.strip():
            raise DamInputError("the target caption is empty: drop the sample or give it a caption")
        kind = self.suffix_kind(rng)
        if kind == "detail":
            return "in detail"
        if kind == "sentences":
            return sentence_count_suffix(count_sentences(caption))
        return word_count_suffix(count_words(caption))

    def query(self, caption: str, category: str | None, rng: random.Random) -> str:
        """The query text (no image slots) for a sample whose target is `caption`."""
        if not self.enabled:
            return self.fixed_query
        suffix = self.suffix(caption, rng)
        text = rng.choice(PHRASINGS).format(suffix=suffix)
        if category and category.strip() and rng.random() < self.category_prob:
            phrase = category_phrase(category)
            if phrase:
                text += f" The masked region contains {phrase}."
        return text
