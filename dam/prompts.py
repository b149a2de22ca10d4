"""Prompt text: the chat templates and the registry of query presets, defined once.

The processor (inference), the training collator and the benchmarks all build prompts here,
so a prompt cannot drift between training and inference.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from dam.errors import DamInputError

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_QUERY = "Describe the masked region in detail."

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

QUERY_PRESETS: dict[str, str] = {
    "image": IMAGE_PLACEHOLDER + "\n" + DEFAULT_QUERY,
    "image_joint": (
        "Image: " + IMAGE_PLACEHOLDER + "\nGiven the image above, describe the object in the masked region."
    ),
    "video_joint": (
        "Video: " + IMAGE_PLACEHOLDER * 8 + "\nGiven the video in the form of a sequence of frames above, "
        "describe the object in the masked region in the video in detail."
    ),
}
"""Named queries with their image slots, as the released checkpoints were prompted."""


def with_image_slots(query: str, num_frames: int) -> str:
    """The user turn: `query` with one `<image>` per frame, prepended unless already present."""
    slots = query.count(IMAGE_PLACEHOLDER)
    if slots == 0:
        return IMAGE_PLACEHOLDER * num_frames + "\n" + query
    if slots != num_frames:
        raise DamInputError(
            f"the query has {slots} {IMAGE_PLACEHOLDER} slots but {num_frames} frames were given: "
            f"use one {IMAGE_PLACEHOLDER} per frame, or none to have them added"
        )
    return query


@dataclass(frozen=True)
class RenderedPrompt:
    """A conversation as text: the prompt up to the assistant's turn and, for training, the answer."""

    prompt: str
    answer: str | None
    bos_on_first_chunk: bool
    """Whether the tokenizer should add its special tokens (BOS) to the first text chunk."""


def render_conversation(
    template: str, tokenizer: PreTrainedTokenizerBase, user_turn: str, answer: str | None = None
) -> RenderedPrompt:
    """Text of one user turn (and optional answer) in the named template.

    - "vicuna_v1": the released DAM format, " USER: ... ASSISTANT:" after the system text; the
      answer follows after a space and ends with the EOS token (added at tokenisation).
    - "chat": the tokenizer's own `apply_chat_template`; the answer is whatever the template
      appends for the assistant message (its end-of-turn marker included).
    - "plain": the user turn, a newline, then the answer (tokenizers without a template).
    """
    if template == "vicuna_v1":
        prompt = f"{VICUNA_V1_SYSTEM} USER: {user_turn} ASSISTANT:"
        return RenderedPrompt(prompt, None if answer is None else " " + answer, True)
    if template == "plain":
        return RenderedPrompt(user_turn + "\n", answer, True)
    if template == "chat":
        if tokenizer.chat_template is None:
            raise DamInputError(
                "prompt_template='chat' needs a tokenizer with a chat template; set "
                "prompt_template='plain' or 'vicuna_v1' in the model config"
            )
        messages = [{"role": "user", "content": user_turn}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if answer is None:
            return RenderedPrompt(prompt, None, False)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": answer}], tokenize=False
        )
        if not full.startswith(prompt):
            raise DamInputError("the tokenizer's chat template does not extend the prompt with the answer")
        return RenderedPrompt(prompt, full[len(prompt) :], False)
    raise DamInputError(f"unknown prompt template {template!r}: use chat, vicuna_v1 or plain")
