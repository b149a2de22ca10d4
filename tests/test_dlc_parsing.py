"""DLC-Bench protocol text and the answer-parser cascade, one case per rule."""

import pytest

from bench.dlc.parsing import parse_answer
from bench.dlc.protocol import JUDGE_PARAMS, build_prompt, chat_request, recognition_question

CHOICES = [["The mug is red.", 1], ["The mug is blue.", 0], ["There is no mug.", -1]]


def test_prompt_is_the_protocol_text_byte_for_byte():
    prompt = build_prompt("A red mug.", "What color is the mug?", CHOICES)
    expected = (
        "Answer the multiple-choice question based on the text description of an object in an image. "
        "You need to follow these rules:\n"
        "1. Do not output any reasoning. Do not perform correction. Please output exactly one answer from the "
        "choices for each question. Do not repeat the question.\n"
        "2. There is no need for exact matching. Please choose the closest option based on the description.\n"
        "\n"
        "The description is:\n"
        "A red mug.\n"
        "\n"
        "From the description above, please answer the following question with one of the choices:\n"
        "What color is the mug?\n"
        "A. The mug is red.\n"
        "B. The mug is blue.\n"
        "C. There is no mug."
    )
    assert prompt == expected


def test_request_parameters():
    req = chat_request("judge", "hi")
    assert req["messages"] == [{"role": "user", "content": "hi"}]
    assert req["model"] == "judge"
    assert JUDGE_PARAMS == {
        "temperature": 0.0, "max_tokens": 300, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
    }


@pytest.mark.parametrize(
    "name, question",
    [
        ("cars", "Is it likely that the objects in the description are cars or objects of a similar type? "
                 "Again, It does not have to be an exact match."),
        ("bus", "Is it likely that the object in the description is a bus or an object of a similar type? "
                "Again, It does not have to be an exact match."),
        ("apple", "Is it likely that the object in the description is an apple or an object of a similar type? "
                  "Again, It does not have to be an exact match."),
        ("umbrella", "Is it likely that the object in the description is an umbrella or an object of a similar "
                     "type? Again, It does not have to be an exact match."),
    ],
)
def test_recognition_question(name, question):
    q = recognition_question(name)
    assert q["question"] == question
    assert q["choices"] == [["Yes", "correct"], ["No", "incorrect"]]


@pytest.mark.parametrize(
    "answer, expected",
    [
        # 1. exact text / "x. text" / bare letter (case and whitespace ignored)
        ("The mug is blue.", 1),
        ("  the MUG is blue.  ", 1),
        ("c. there is no mug.", 2),
        ("B", 1),
        # 2. exactly one choice text inside the answer
        ("I think the mug is red. yes", 0),
        # 3. starts with "x." (text not matching any choice)
        ("B. blue-ish", 1),
        # 4. several choices inside: the one starting last wins
        ("the mug is red. no wait, the mug is blue.", 1),
        # 5. answer inside choices: the longest such choice
        ("is blue", 1),
        ("mug", 1),  # inside all three; the longest (first of the two 16-character ones) wins
        # 6. a leading letter a-e alone or before a newline
        ("c\nbecause the description says so", 2),
        # no answer
        ("", None),
        ("   ", None),
        ("purple", None),
        ("z.", None),
        (None, None),
    ],
)
def test_parse_answer_cascade(answer, expected):
    assert parse_answer(answer, CHOICES) == expected


def test_rule_order_exact_before_contained():
    # "yes" is contained in "yes, no" but the exact rule wins for "no" only when it is the whole answer.
    assert parse_answer("No", [["Yes", "correct"], ["No", "incorrect"]]) == 1
    assert parse_answer("yes.", [["Yes", "correct"], ["No", "incorrect"]]) == 0


def test_several_choices_tie_prefers_longest():
    choices = [["red", 1], ["red mug", 0]]
    # Both start at the same position; the longest wins.
    assert parse_answer("red mug!", choices) == 1


def test_letter_beyond_the_choices_is_no_answer():
    yes_no = [["Yes", "correct"], ["No", "incorrect"]]
    assert parse_answer("d", yes_no) is None
    assert parse_answer("d.", yes_no) is None


def test_bare_letter_before_other_text_is_not_rule_6():
    assert parse_answer("a bit of everything", CHOICES) is None
