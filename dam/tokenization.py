"""Word-level tokenizers built with `tokenizers`, for tiny models, synthetic tasks and benchmarks.

Real checkpoints bring their own tokenizer; this one exists so that tests, benchmarks with
random weights and the small built-in models need no download.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from dam.prompts import IMAGE_PLACEHOLDER, VICUNA_V1_SYSTEM

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_PLACEHOLDER)
"""Ids 0..4 in this order: pad, BOS, EOS, unknown, image placeholder."""


def words_of(texts: Iterable[str]) -> list[str]:
    """Distinct lower-cased words and punctuation marks of `texts`, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for word in re.findall(r"\w+|[^\w\s]", text.lower()):
            seen.setdefault(word, None)
    return list(seen)


def build_word_level_tokenizer(
    words: Iterable[str],
    vocab_size: int | None = None,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over SPECIAL_TOKENS + `words` (+ the vicuna system
    prompt's words); with `vocab_size`, filler tokens pad the vocabulary to that size."""
    vocab: dict[str, int] = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for word in [*words, *words_of([VICUNA_V1_SYSTEM, "USER: ASSISTANT:"])]:
        vocab.setdefault(word.lower(), len(vocab))
    if vocab_size is not None:
        if vocab_size < len(vocab):
            raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(vocab)} words given")
        for index in range(len(vocab), vocab_size):
            vocab[f"<filler_{index}>"] = index
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    # BOS on encode with special tokens, as Llama tokenizers do.
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=[IMAGE_PLACEHOLDER],
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
