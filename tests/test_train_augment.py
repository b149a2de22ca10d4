"""Training prompt augmentation: suffix distribution, length counts, phrasings, category hints."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dam.errors import DamInputError
from train.augment import (
    PHRASINGS,
    PromptAugmentation,
    category_phrase,
    count_sentences,
    count_words,
    sentence_count_suffix,
    word_count_suffix,
)

CAPTION = "A brown dog lies on the grass. Its ears are up! It looks at 3.5 ducks"


def _kind_of(query: str) -> str:
    if "in detail" in query:
        return "detail"
    if "sentence" in query:
        return "sentences"
    assert "word" in query, query
    return "words"


def _assert_close_to(counts: Counter, expected: dict[str, float], n: int) -> None:
    # 5 sigma of a binomial proportion: a correct mapping cannot fail (and the rng is seeded),
    # while a swapped or shifted mapping (0.1 off at these sizes) is far outside it.
    for kind, p in expected.items():
        tolerance = 5 * math.sqrt(p * (1 - p) / n)
        assert abs(counts[kind] / n - p) <= tolerance, (kind, counts[kind] / n, p)


@pytest.mark.parametrize(
    "probs", [(0.6, 0.2, 0.2), (0.3, 0.3, 0.4), (0.1, 0.7, 0.2)], ids=["default", "30-30-40", "10-70-20"]
)
def test_suffix_distribution(probs: tuple[float, float, float]) -> None:
    detail, sentence, word = probs
    aug = PromptAugmentation(detail_prob=detail, sentence_prob=sentence, word_prob=word)
    n = 20000
    rng = random.Random(1234)
    kinds = Counter(aug.suffix_kind(rng) for _ in range(n))
    expected = {"detail": detail, "sentences": sentence, "words": word}
    _assert_close_to(kinds, expected, n)
    rng = random.Random(99)
    queries = Counter(_kind_of(aug.query(CAPTION, None, rng)) for _ in range(n))
    _assert_close_to(queries, expected, n)


def test_degenerate_distributions() -> None:
    rng = random.Random(0)
    only_words = PromptAugmentation(detail_prob=0, sentence_prob=0, word_prob=1)
    assert {only_words.suffix_kind(rng) for _ in range(500)} == {"words"}
    only_detail = PromptAugmentation(detail_prob=1, sentence_prob=0, word_prob=0)
    assert {only_detail.suffix(CAPTION, rng) for _ in range(500)} == {"in detail"}


@pytest.mark.parametrize(
    ("n", "suffix"),
    [
        (1, "in 1 word"),
        (7, "in 7 words"),
        (20, "in 20 words"),
        (21, "in about 20 words"),
        (25, "in about 30 words"),
        (37, "in about 40 words"),
        (194, "in about 190 words"),
        (195, "in about 200 words"),
        (200, "in about 200 words"),
        (201, "in more than 200 words"),
        (250, "in more than 200 words"),
    ],
)
def test_word_count_suffix(n: int, suffix: str) -> None:
    assert word_count_suffix(n) == suffix


def test_sentence_count_suffix() -> None:
    assert sentence_count_suffix(1) == "in one sentence"
    assert sentence_count_suffix(3) == "in 3 sentences"
    with pytest.raises(DamInputError):
        sentence_count_suffix(0)
    with pytest.raises(DamInputError):
        word_count_suffix(0)


@pytest.mark.parametrize(
    ("caption", "words", "sentences"),
    [
        ("A red apple.", 3, 1),
        ("A red apple", 3, 1),
        (CAPTION, 16, 3),
        ("The bottle holds 3.5 liters. It is 1.75 m tall.", 10, 2),
        ("Wait... what? Yes!", 3, 3),
        ('He says "hello." Then he leaves.', 6, 2),
        ("A cat - sleeping , quietly .", 4, 1),
        ("", 0, 0),
        ("   \n", 0, 0),
        ("...", 0, 1),
    ],
)
def test_counts(caption: str, words: int, sentences: int) -> None:
    assert count_words(caption) == words
    assert count_sentences(caption) == sentences


def _caption_of(words: int, sentences: int) -> str:
    per = [words // sentences + (i < words % sentences) for i in range(sentences)]
    return " ".join(" ".join(["word"] * k) + "." for k in per)


@pytest.mark.parametrize(
    ("caption", "suffix"),
    [
        (_caption_of(7, 1), "in 7 words"),
        (_caption_of(37, 3), "in about 40 words"),
        (_caption_of(195, 9), "in about 200 words"),
        (_caption_of(250, 12), "in more than 200 words"),
    ],
)
def test_word_suffix_from_caption(caption: str, suffix: str) -> None:
    aug = PromptAugmentation(detail_prob=0, sentence_prob=0, word_prob=1)
    assert suffix in aug.query(caption, None, random.Random(0))


@pytest.mark.parametrize(
    ("caption", "suffix"),
    [
        (_caption_of(12, 3), "in 3 sentences"),
        ("A dog with 2.5 legs sits", "in one sentence"),
        ("Version 3.5 is out. It is 2.0 times faster.", "in 2 sentences"),
    ],
)
def test_sentence_suffix_from_caption(caption: str, suffix: str) -> None:
    aug = PromptAugmentation(detail_prob=0, sentence_prob=1, word_prob=0)
    assert suffix in aug.query(caption, None, random.Random(0))


@given(st.integers(1, 30), st.integers(1, 5))
def test_counts_of_built_captions(words_per_sentence: int, sentences: int) -> None:
    caption = _caption_of(words_per_sentence * sentences, sentences)
    assert count_words(caption) == words_per_sentence * sentences
    assert count_sentences(caption) == sentences


@given(st.integers(21, 200))
def test_word_rounding_is_to_nearest_ten(n: int) -> None:
    rounded = int(word_count_suffix(n).split()[2])
    assert rounded % 10 == 0 and -5 < rounded - n <= 5


@given(st.text())
def test_count_sentences_is_positive_for_nonempty_text(text: str) -> None:
    assert (count_sentences(text) >= 1) == bool(text.strip())


def test_phrasings_are_fifteen_distinct_and_well_formed() -> None:
    assert len(PHRASINGS) == 15
    assert len(set(PHRASINGS)) == 15
    for phrasing in PHRASINGS:
        assert phrasing.count("{suffix}") == 1
        assert "masked region" in phrasing
        assert "<image>" not in phrasing
        assert phrasing.format(suffix="in detail").count("in detail") == 1


def test_all_phrasings_used_and_contain_suffix() -> None:
    aug = PromptAugmentation()
    rng = random.Random(7)
    seen = set()
    for _ in range(3000):
        query = aug.query(CAPTION, None, rng)
        suffixes = ("in detail", "in 3 sentences", "in 16 words")
        matches = [p for p in PHRASINGS for s in suffixes if query == p.format(suffix=s)]
        assert len(matches) == 1, query
        seen.add(matches[0])
    assert seen == set(PHRASINGS)


@pytest.mark.parametrize(
    ("category", "phrase"),
    [
        ("dog", "a dog"),
        ("apple", "an apple"),
        ("umbrella", "an umbrella"),
        ("hour", "an hour"),
        ("bus", "a bus"),
        ("glasses", "glasses"),
        ("traffic_lights", "traffic lights"),
        ("knives", "knives"),
        ("bow_(weapon)", "a bow"),
        ("dog:ear", "the ear of a dog"),
        ("apple:stem", "the stem of an apple"),
        ("mug:handle", "the handle of a mug"),
    ],
)
def test_category_phrase(category: str, phrase: str) -> None:
    assert category_phrase(category) == phrase
    aug = PromptAugmentation(category_prob=1.0)
    query = aug.query(CAPTION, category, random.Random(0))
    assert query.endswith(f". The masked region contains {phrase}.") or query.endswith(
        f"? The masked region contains {phrase}."
    )


def test_category_probability() -> None:
    rng = random.Random(3)
    never = PromptAugmentation(category_prob=0.0)
    assert not any("contains" in never.query(CAPTION, "dog", rng) for _ in range(1000))
    always = PromptAugmentation(category_prob=1.0)
    for category in (None, "", "  "):
        assert "contains" not in always.query(CAPTION, category, rng)
    half = PromptAugmentation(category_prob=0.5)
    n = 4000
    hits = sum("contains a dog" in half.query(CAPTION, "dog", rng) for _ in range(n))
    assert abs(hits / n - 0.5) <= 5 * math.sqrt(0.25 / n)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"detail_prob": 1.5, "sentence_prob": -0.25, "word_prob": -0.25}, "detail_prob"),
        ({"sentence_prob": -0.1, "word_prob": 0.5}, "sentence_prob"),
        ({"word_prob": float("nan")}, "word_prob"),
        ({"category_prob": 2.0}, "category_prob"),
        ({"category_prob": "often"}, "category_prob"),
        ({"detail_prob": 0.5}, "sum to 1"),
        ({"fixed_query": " "}, "fixed_query"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(DamInputError, match=field):
        PromptAugmentation(**kwargs)


def test_sum_tolerance() -> None:
    PromptAugmentation(detail_prob=0.7, sentence_prob=0.2, word_prob=0.1)  # 0.99999999... in floats
    with pytest.raises(DamInputError, match="detail_prob"):
        PromptAugmentation(detail_prob=0.6, sentence_prob=0.2, word_prob=0.2001)


def test_empty_caption_raises() -> None:
    aug = PromptAugmentation()
    with pytest.raises(DamInputError, match="caption"):
        aug.query("  ", None, random.Random(0))


def test_disabled_uses_fixed_query() -> None:
    aug = PromptAugmentation(enabled=False, category_prob=1.0)
    rng = random.Random(0)
    state = rng.getstate()
    assert {aug.query(CAPTION, "dog", rng) for _ in range(50)} == {"Describe the masked region in detail."}
    assert rng.getstate() == state
    custom = PromptAugmentation(enabled=False, fixed_query="What is this?")
    assert custom.query(CAPTION, None, rng) == "What is this?"


def test_same_seed_same_queries() -> None:
    aug = PromptAugmentation(category_prob=0.5)
    captions = [CAPTION, _caption_of(37, 3), _caption_of(250, 10), "A mug."]
    categories = ["dog", None, "apple", "mug:handle"]

    def draw(seed: int) -> list[str]:
        rng = random.Random(seed)
        return [aug.query(c, k, rng) for _ in range(200) for c, k in zip(captions, categories)]

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
