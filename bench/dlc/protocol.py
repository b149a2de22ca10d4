"""The DLC-Bench judge protocol, byte for byte: the user-message template, the recognition
question prepended to every region, and the request parameters.

Scores are only comparable to published numbers if these strings and parameters match the
reference evaluation exactly, so they are constants here and tested verbatim.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Sequence

PROMPT_TEMPLATE = (
    "Answer the multiple-choice question based on the text description of an object in an image. "
    "You need to follow these rules:\n"
    "1. Do not output any reasoning. Do not perform correction. Please output exactly one answer "
    "from the choices for each question. Do not repeat the question.\n"
    "2. There is no need for exact matching. Please choose the closest option based on the "
    "description.\n"
    "\n"
    "The description is:\n"
    "{caption}\n"
    "\n"
    "From the description above, please answer the following question with one of the choices:\n"
    "{question}\n"
    "{choices}"
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

RECOGNITION_CHOICES: list[list[str]] = [["Yes", "correct"], ["No", "incorrect"]]
RECOGNITION_CORRECT = "correct"
RECOGNITION_INCORRECT = "incorrect"

# Sampling parameters of the reference judge calls (greedy, one user message).
JUDGE_PARAMS: dict[str, Any] = {
    "temperature": 0.0,
    "max_tokens": 300,
    "top_p": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
}


@lru_cache(maxsize=1)
def _inflect_engine() -> Any:
    import inflect  # deferred: only the benchmark needs it, not `import bench`

    return inflect.engine()


def recognition_question(class_name: str) -> dict[str, Any]:
    """The recognition question for a region of class `class_name` (plural or singular form)."""
    engine = _inflect_engine()
    # inflect's singular_noun returns False for singular nouns; it wrongly calls "bus" plural
    # ("bu"), which the reference protocol special-cases.
    is_plural = engine.singular_noun(class_name) is not False and class_name != "bus"
    if is_plural:
        question = (
            f"Is it likely that the objects in the description are {class_name} or objects of a "
            "similar type? Again, It does not have to be an exact match."
        )
    else:
        question = (
            f"Is it likely that the object in the description is {engine.a(class_name)} or an "
            "object of a similar type? Again, It does not have to be an exact match."
        )
    return {
        "question": question,
        "choices": [list(c) for c in RECOGNITION_CHOICES],
        "type": "recognition",
    }


def format_choices(choices: Sequence[Sequence[Any]]) -> str:
    """Lettered choice lines "A. text", joined by newlines, no trailing newline."""
    if len(choices) > len(LETTERS):
        raise ValueError(f"a question has {len(choices)} choices; at most {len(LETTERS)} are supported")
    return "\n".join(f"{LETTERS[i]}. {choice[0]}" for i, choice in enumerate(choices))


def build_prompt(caption: str, question: str, choices: Sequence[Sequence[Any]]) -> str:
    """The exact user message sent to the judge for one question about one caption."""
    return PROMPT_TEMPLATE.format(caption=caption, question=question, choices=format_choices(choices))


def chat_request(model: str, prompt: str) -> dict[str, Any]:
    """Keyword arguments of one chat-completions request of the protocol."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], **JUDGE_PARAMS}
