"""Map a judge's free-text answer to one of the multiple-choice options.

The cascade below is the reference DLC-Bench parser, rule for rule and in the same order;
changing the order changes scores, so each rule has its own test. Odd answers never raise:
anything the cascade cannot place is "no answer" (None), which scores 0.
"""

from __future__ import annotations

from typing import Any, Sequence

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def parse_answer(answer: str | None, choices: Sequence[Sequence[Any]] | Sequence[str]) -> int | None:
    """Index of the choice the answer names, or None when it names none.

    `choices` are either [text, score] pairs or plain texts.
    """
    texts = [(c if isinstance(c, str) else str(c[0])).lower() for c in choices]
    n = len(texts)
    if answer is None or n == 0:
        return None
    ans = str(answer).strip().lower()
    if not ans:
        # Every choice "contains" the empty string; an empty answer must not match by accident.
        return None

    def letter_index(ch: str) -> int | None:
        idx = _LETTERS.find(ch)
        return idx if 0 <= idx < n else None

    # 1. The exact choice text, "x. choice", or the bare letter.
    for i, text in enumerate(texts):
        letter = _LETTERS[i] if i < len(_LETTERS) else None
        if ans == text or (letter is not None and (ans == f"{letter}. {text}" or ans == letter)):
            return i

    # 2. Exactly one choice text occurs inside the answer.
    contained = [i for i, text in enumerate(texts) if text and text in ans]
    if len(contained) == 1:
        return contained[0]

    # 3. The answer starts with "x." for a letter within the choices.
    if len(ans) >= 2 and ans[1] == "." and (idx := letter_index(ans[0])) is not None:
        return idx

    # 4. Several choices occur: the one mentioned last wins (ties: the longest text).
    if len(contained) > 1:
        return max(contained, key=lambda i: (ans.find(texts[i]), len(texts[i])))

    # 5. The answer occurs inside choices: the longest such choice.
    containing = [i for i, text in enumerate(texts) if ans in text]
    if containing:
        return max(containing, key=lambda i: len(texts[i]))

    # 6. A leading letter a-e, alone or followed by a newline.
    if ans[0] in "abcde" and (len(ans) == 1 or ans[1] == "\n"):
        return letter_index(ans[0])

    return None
