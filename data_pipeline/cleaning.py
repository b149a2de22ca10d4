"""Cleaning of VLM labels: a raw answer -> a caption fit for training data, or a reason it is not.

A VLM asked about a highlighted region answers in its chat voice: "Sure! Here is a description:",
markdown bullets, quotes, "The highlighted region shows a brown dog ...", "I'm sorry, I cannot
see ...", or a loop that repeats one phrase until max_tokens. A DLC model trained on that learns
to say "the highlighted region" and to refuse, so stage 1 keeps only clean descriptions:

- format: ``<think>`` blocks, code fences, headings, bold/italic markers, bullets and
  "Description:" labels go; bullet items become sentences; whitespace is collapsed; wrapping
  quotes are dropped; a "Sure, here is ...:" preamble and "I hope this helps" tails are dropped.
- self-reference: a leading "The highlighted region shows|is|contains X" (and "In the masked
  area, there is X", "The image shows X", "Based on the images, X") is rewritten to "X";
  "the dog outlined in red" / "the dog in the highlighted region" lose the phrase;
  "the highlighted dog" becomes "the dog". A later sentence that still talks about the
  highlighting ("The rest of the image is darkened.") is dropped; a first sentence that still
  does is rejected as ``self_reference`` (rewriting it would guess).
- rejection reasons (``LabelResult.reason``): ``refusal`` (apologies, "I cannot ...", "unable to
  determine what ...", "there is no highlighted object"), ``repetition`` (a generation loop: at
  least ``repetition_min_trigrams`` word trigrams, fewer than ``repetition_max_unique`` of them distinct),
  ``empty`` (nothing left, or fewer than ``min_words`` words).
- ``truncated`` (the answer hit max_tokens): the unfinished last sentence is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dam.errors import DamInputError

from data_pipeline.prompts import normalize_category

__all__ = ["CleaningConfig", "Cleaned", "clean_caption", "RETRYABLE_REASONS"]

RETRYABLE_REASONS = frozenset({"empty", "refusal", "self_reference", "repetition"})
"""Rejections that asking again (with another prompt variant) may fix."""


@dataclass
class CleaningConfig:
    """How labels are cleaned (the ``cleaning:`` section of a labeler config)."""

    min_words: int = 5
    """Captions with fewer words are rejected as "empty" (DLC captions are detailed)."""
    rewrite_self_reference: bool = True
    """Rewrite "The highlighted region shows X" to "X"; false: reject every self-reference."""
    repetition_min_trigrams: int = 24
    """Captions this long (in word trigrams) or longer are checked for a generation loop; shorter ones
    repeat phrases legitimately ("a red cup and a red plate")."""
    repetition_max_unique: float = 0.5
    """A checked caption whose share of distinct word trigrams is below this is a loop ("repetition")."""

    def __post_init__(self) -> None:
        if self.min_words < 1:
            raise DamInputError(f"cleaning.min_words must be >= 1, got {self.min_words}")
        if self.repetition_min_trigrams < 1:
            raise DamInputError(f"cleaning.repetition_min_trigrams must be >= 1, got {self.repetition_min_trigrams}")
        if not 0 <= self.repetition_max_unique <= 1:
            raise DamInputError(f"cleaning.repetition_max_unique must be in [0, 1] (0: never reject), got {self.repetition_max_unique}")


@dataclass(frozen=True)
class Cleaned:
    """A cleaned caption, or None and why (a ``LabelResult`` reason)."""

    caption: str | None
    reason: str | None


_F = re.IGNORECASE
_THINK = re.compile(r"<think>.*?(?:</think>|\Z)", _F | re.DOTALL)
_FENCE = re.compile(r"```[\w-]*")
_HEADING = re.compile(r"^\s{0,3}#{1,6}(?:\s+|$)")
_BULLET = re.compile(r"^\s*(?:[-*•+‣◦]|\d{1,2}[.)])\s+")
_BLOCKQUOTE = re.compile(r"^\s*>+\s?")
_BOLD = re.compile(r"(\*\*|__)(.+?)\1")
_ITALIC = re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])")
_LABEL = re.compile(
    r"^(?:(?:detailed|final|short|object|region|localized)\s+)?(?:description|caption|answer|response)"
    r"(?:\s+of\s+the\s+[\w ]{1,30}?)?\s*:\s*",
    _F,
)
_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’", "`": "`", "«": "»"}
_PREAMBLE = re.compile(
    r"^(?:(?:sure|certainly|of\s+course|okay|ok|absolutely|alright|great)(?:[,.!]+\s*|\s+(?=here\b)))?"
    r"(?:here(?:'s|’s|\s+is|\s+are)\b(?:[^:.!?]{0,160}:|[^:.!?]{0,60}\b(?:description|caption)\b[^:.!?]{0,100}[:.])\s*)?",
    _F,
)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"”’)]*\s+(?=[\"“(]?[A-Z0-9])")

# -- refusals ------------------------------------------------------------------------------------
_REFUSAL_START = re.compile(
    r"""^(?:
      (?:i'?m|i\s+am|i’m)\s+(?:sorry|afraid|unable|not\s+able)
    | (?:sorry|apologies)\b
    | (?:unfortunately|regrettably),?\s+(?:i|there|the\s+image|it)\b
    | (?:i|we)\s+(?:cannot|can't|can’t|can\s+not|could\s+not|couldn't|couldn’t|am\s+not\s+able\s+to|do\s+not|don't|don’t)
        \s+(?:see|determine|identify|tell|provide|describe|help|assist|make\s+out|discern|find|locate|view|access|comply)
    | (?:unable|impossible|not\s+possible)\s+to\s
    | no\s+(?:object|region|highlight|mask|outline)s?\s+(?:is|are|was|were|can)\b
    | there\s+(?:is|are|appears\s+to\s+be|seems\s+to\s+be)\s+no\s+(?:(?:visible|discernible|clear|identifiable|distinct)\s+)?
        (?:(?:highlighted|masked|marked|outlined|selected)\s+)?(?:object|region|area|mask|outline|highlight|item)
    | the\s+(?:highlighted|masked|marked|outlined|selected)\s+(?:region|area|object|part)\s+(?:is|appears\s+to\s+be|seems\s+to\s+be)\s+
        (?:empty|blank|not\s+visible|too\s+(?:small|dark|blurry)|unclear|black|missing|indistinct)
    )""",
    _F | re.VERBOSE,
)
_REFUSAL_FIRST_SENTENCE = re.compile(
    r"\b(?:(?:it\s+is|it's|it’s)\s+(?:not\s+possible|impossible|unclear|difficult|hard)\s+to\s+"
    r"(?:determine|identify|tell|say|see|discern)\s+(?:exactly\s+)?(?:what|which)\b"
    r"|unable\s+to\s+(?:determine|identify|see|discern|tell|make\s+out)\b)",
    _F,
)
_REFUSAL_ANYWHERE = re.compile(
    r"\b(?:as\s+an\s+ai\b|i\s+apologi[sz]e|i'?m\s+sorry|i’m\s+sorry|i\s+am\s+sorry"
    r"|i\s+(?:cannot|can't|can’t)\s+(?:assist|help|provide|comply|describe|identify|see)\b"
    r"|i(?:'m|’m|\s+am)\s+(?:unable|not\s+able)\s+to\b)",
    _F,
)

# -- self-reference ------------------------------------------------------------------------------
_ADJ = (
    r"(?:highlighted|masked|marked|outlined|selected|indicated|specified|designated|delineated|segmented"
    r"|boxed|circled|(?:red|green|blue|yellow)[- ]outlined)"
)
_NOUN = (
    r"(?:region|area|object|part|portion|section|segment|item|element|zone|mask|outline|contour|box"
    r"|highlight|crop|entity|thing|subject)"
)
_COLOR = r"(?:red|green|blue|yellow|magenta|cyan)"  # highlight colours; "a white border" is a description
_VIEW = r"(?:images?|pictures?|photos?|crops?|close-ups?|views?)"
_PRESENT = (
    r"(?:shows\s+what\s+appears\s+to\s+be|shows|is\s+(?:a\s+)?(?:close-up|view)\s+of|is|are|contains|depicts|features"
    r"|displays|appears\s+to\s+(?:be|show|contain)|seems\s+to\s+(?:be|show)|consists\s+of|includes|represents"
    r"|captures|presents|illustrates|corresponds\s+to|is\s+occupied\s+by|highlights|outlines|covers|encloses)"
)
_LEAD_SUBJECT = re.compile(
    rf"^(?:the|this|that)\s+(?:{_ADJ}\s+)+{_NOUN}s?(?:\s+(?:of|in|within)\s+(?:the|this)\s+{_VIEW})?"
    rf"\s*,?\s+{_PRESENT}\s+(?:that\s+of\s+)?",
    _F,
)
_LEAD_IN = re.compile(
    rf"^(?:in|within|inside)\s+(?:the|this)\s+(?:{_ADJ}\s+)+{_NOUN}s?(?:\s+of\s+the\s+{_VIEW})?\s*,?\s*"
    r"(?:(?:there|we|you|one)\s+(?:is|are|can\s+see|see|sees|can\s+be\s+seen)\s+)?",
    _F,
)
_LEAD_VIEW = re.compile(
    rf"^(?:the|this|these)\s+(?:(?:first|second|two|provided|given|cropped|close-up|zoomed[- ]in|full)\s+)?{_VIEW}"
    rf"(?:\s+(?:of|around)\s+the\s+(?:{_ADJ}\s+)*(?:{_NOUN}|object))?\s*,?\s+(?:clearly\s+)?"
    r"(?:shows?|depicts?|features?|displays?|contains?|presents?|captures?|illustrates?|focus(?:es)?\s+on)\s+"
    r"(?:(?:a|the)\s+(?:close-up|closer\s+look|zoomed[- ]in\s+view|detailed\s+view|view)\s+(?:of|at)\s+)?",
    _F,
)
_LEAD_BASED = re.compile(
    rf"^(?:based\s+on|from|looking\s+at|in)\s+(?:the|these|this|both)\s+(?:(?:two|provided|given|first|second)\s+)?{_VIEW}\s*,\s*",
    _F,
)
_LEAD_GENERIC = re.compile(
    rf"^(?:the|this)\s+(?:object|item|region|thing)(?:\s+(?:in|shown\s+in)\s+(?:the|this)\s+{_VIEW})?"
    r"\s+(?:is|appears\s+to\s+be|seems\s+to\s+be)\s+(?=(?:a|an)\s)"
    r"|^this\s+is\s+a\s+(?:close-up|zoomed[- ]in\s+view|detailed\s+view|cropped\s+view)\s+(?:of|showing)\s+",
    _F,
)
_MID_PARTICIPLE = re.compile(
    r",?\s*(?:which\s+is\s+|that\s+is\s+)?(?:highlighted|outlined|marked|masked|shown|indicated|delineated|circled|boxed|enclosed)\s+"
    rf"(?:in\s+{_COLOR}|by\s+(?:the|a|an)\s+(?:[\w-]+\s+){{0,2}}(?:outline|contour|box|mask|border|highlight|line)"
    r"|with\s+(?:a|an|the)\s+(?:[\w-]+\s+){0,2}(?:outline|contour|box|border|line)"
    rf"|in\s+the\s+{_VIEW})\b(?:\s*,)?",
    _F,
)
_MID_LOCATION = re.compile(
    rf",?\s*(?:(?:located|situated|shown|visible|seen|found)\s+)?(?:in|within|inside)\s+the\s+"
    rf"(?:(?:{_ADJ}\s+)+{_NOUN}s?|{_COLOR}\s+(?:outline|contour|box|border)s?)"
    rf"(?:\s+of\s+the\s+{_VIEW})?\b(?:\s*,)?",
    _F,
)
_REFERENCE = re.compile(
    rf"\b{_ADJ}\s+(?:region|area|portion|part|section|segment|zone|outline|contour|box|highlight|object|item|crop)s?\b"
    rf"|\bthe\s+{_COLOR}\s+(?:outline|contour|border|box|highlight|line)s?\b"
    rf"|\b{_COLOR}\s+(?:outline|contour|border|box|line)s?\s+(?:surround|enclose|mark|highlight|outline|indicate|delineate)s?\b"
    r"|\b(?:the\s+)?(?:first|second)\s+(?:image|picture|photo)\b"
    rf"|\boutlined\s+in\s+{_COLOR}\b"
    rf"|\bhighlighted\s+(?:in|by|with)\s+(?:a\s+|the\s+)?(?:{_COLOR}|outline|contour|box|border|mask)\b"
    rf"|\b(?:is|are)\s+(?:highlighted|outlined)(?:\s+in\s+{_COLOR})?(?=\s*(?:[.,;]|$))"
    r"|\b(?:darkened|dimmed)\s+(?:background|surroundings|area|region|rest|image)\b"
    r"|\b(?:background|surroundings|rest\s+of\s+the\s+(?:image|picture|scene))\s+(?:is|are|has\s+been|have\s+been)\s+(?:darkened|dimmed)\b"
    r"|\bthe\s+crop\b(?!\s+of)|\bcropped\s+(?:image|view)\b",
    _F,
)
_CHITCHAT = re.compile(
    r"^(?:i\s+hope|hope\s+this|let\s+me\s+know|feel\s+free|if\s+you\s+(?:need|have|would|want)|is\s+there\s+anything"
    r"|please\s+let\s+me)",
    _F,
)
_WORD = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")
_VOWEL_SOUND = re.compile(r"^[aeiou]", _F)


def _strip_markdown(text: str) -> str:
    """Markdown and chat formatting off; one line, bullet items turned into sentences."""
    text = _THINK.sub(" ", text)
    text = _FENCE.sub(" ", text)
    lines: list[str] = []
    for raw in text.splitlines():
        if _HEADING.match(raw):
            continue  # section titles ("### Appearance") are not part of a description
        is_item = bool(_BULLET.match(raw))
        line = _BULLET.sub("", _BLOCKQUOTE.sub("", raw))
        line = _ITALIC.sub(r"\1", _BOLD.sub(r"\2", line)).strip()
        line = _LABEL.sub("", line).strip()
        if not line:
            continue
        if is_item and line[-1] not in ".!?:;,":
            line += "."
        lines.append(line)
    return " ".join(" ".join(lines).split())


def _strip_quotes(text: str) -> str:
    while len(text) >= 2 and text[0] in _QUOTES:
        closing = _QUOTES[text[0]]
        body = text[1:]
        if body.endswith(closing):
            inner = body[:-1]
        elif body.endswith(closing + ".") or body.endswith(closing + ","):
            inner = body[:-2]
        else:
            break
        if closing == '"' and '"' in inner:
            break  # "a" and "b": two quotations, not one wrapped answer
        text = inner.strip()
    if text[:1] in _QUOTES and _QUOTES[text[0]] not in text[1:]:
        text = text[1:].lstrip()  # an opening quote never closed
    return text


def _capitalize(text: str) -> str:
    text = text.lstrip(" ,;:-")
    return text[:1].upper() + text[1:]


def _tidy(sentence: str) -> str:
    sentence = re.sub(r"\s+([,.;:!?])", r"\1", sentence)
    sentence = re.sub(r",\s*([,.;:!?])", r"\1", sentence)
    return " ".join(sentence.split())


def _fix_article(match: re.Match[str]) -> str:
    article, noun = match.group(1), match.group(2)
    if article.lower() in ("a", "an"):
        new = "an" if _VOWEL_SOUND.match(noun) else "a"
        article = new.capitalize() if article[0].isupper() else new
    return f"{article} {noun}"


def _rewrite(sentence: str, first: bool, category: str | None) -> str:
    """Remove the self-referential phrases of one sentence that can be removed safely."""
    if first:
        for pattern in (_LEAD_BASED, _LEAD_SUBJECT, _LEAD_IN, _LEAD_VIEW):
            rewritten = pattern.sub("", sentence, count=1)
            if rewritten != sentence:
                sentence = _capitalize(rewritten)
    sentence = _MID_PARTICIPLE.sub(" ", sentence)
    sentence = _MID_LOCATION.sub(" ", sentence)
    nouns = r"object|item|thing|entity|subject"
    if category:
        nouns += "|" + re.escape(category)
    sentence = re.sub(
        rf"\b(the|this|that|a|an)\s+(?:highlighted|outlined|selected|masked|marked|indicated)\s+({nouns})\b",
        _fix_article, sentence, flags=_F,
    )
    if first:
        sentence = _capitalize(_LEAD_GENERIC.sub("", sentence, count=1))
    return _tidy(sentence)


def _is_fragment(sentence: str) -> bool:
    """What is left of a sentence that was only about the highlighting ("The object is .")."""
    words = _WORD.findall(sentence)
    return len(words) < 3 or bool(re.fullmatch(r"(?:it|this|the\s+\w+)\s+(?:is|are)\W*", sentence, _F))


def _is_loop(text: str, config: CleaningConfig) -> bool:
    """A generation loop: most word trigrams of a long text are repeats (thresholds in ``config``)."""
    words = [w.lower() for w in _WORD.findall(text)]
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(trigrams) >= config.repetition_min_trigrams and len(set(trigrams)) / len(trigrams) < config.repetition_max_unique


def clean_caption(
    text: str | None,
    config: CleaningConfig | None = None,
    *,
    category: str | None = None,
    truncated: bool = False,
) -> Cleaned:
    """Clean one raw labeler answer: ``Cleaned(caption, None)`` or ``Cleaned(None, reason)``.

    ``category`` (the region's category name) lets "the highlighted dog" become "the dog";
    ``truncated`` says the answer was cut by the token limit (its last sentence is unfinished).
    """
    config = config or CleaningConfig()
    if not text or not text.strip():
        return Cleaned(None, "empty")
    text = _strip_quotes(_strip_markdown(text))
    text = _strip_quotes(_PREAMBLE.sub("", text, count=1).strip())
    if not text:
        return Cleaned(None, "empty")
    sentences = [s.strip() for s in _SENTENCE_BREAK.split(text) if s.strip()]
    if _REFUSAL_START.match(sentences[0]) or _REFUSAL_FIRST_SENTENCE.search(sentences[0]) or _REFUSAL_ANYWHERE.search(text):
        return Cleaned(None, "refusal")
    if truncated and len(sentences) > 1 and sentences[-1][-1] not in ".!?\"”’)":
        sentences.pop()  # cut off by max_tokens mid-sentence
    category = normalize_category(category)
    kept: list[str] = []
    for sentence in sentences:
        if _CHITCHAT.match(sentence):
            continue
        if not config.rewrite_self_reference:
            if _REFERENCE.search(sentence) or any(
                p.match(sentence) for p in (_LEAD_BASED, _LEAD_SUBJECT, _LEAD_IN, _LEAD_VIEW)
            ):
                return Cleaned(None, "self_reference")
            kept.append(sentence)
            continue
        first = not kept
        rewritten = _rewrite(sentence, first, category)
        if rewritten != _tidy(sentence) and _is_fragment(rewritten):
            continue  # nothing but the self-reference was in it
        if _REFERENCE.search(rewritten):
            if first:
                return Cleaned(None, "self_reference")
            continue  # a later aside about the highlighting ("The rest is darkened.")
        if rewritten not in kept:  # a repeated sentence is a loop, not information
            kept.append(rewritten)
    caption = " ".join(kept)
    if _is_loop(caption, config):
        return Cleaned(None, "repetition")
    if len(_WORD.findall(caption)) < config.min_words:
        return Cleaned(None, "empty")
    caption = _capitalize(caption)
    if caption[-1].isalnum():
        caption += "."
    return Cleaned(caption, None)
