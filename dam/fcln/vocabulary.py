"""The FCLN's word vocabulary: captions <-> token ids, with four fixed special tokens.

DenseCap captions are short lower-case phrases ("a red car parked on the street"), so the
tokenizer is a plain lower-case word split, as the paper's preprocessing did; punctuation is
dropped. Ids 0-3 are <pad>, <start>, <end>, <unk> in every vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from dam.errors import DamInputError

if TYPE_CHECKING:  # the config imports this module for `complete_vocabulary`
    from dam.fcln.configuration_fcln import FclnConfig

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
PAD_ID, START_ID, END_ID, UNK_ID = range(4)

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> list[str]:
    """Lower-case words of `text`, punctuation dropped ("The dog's ball." -> the, dog's, ball)."""
    return _WORD.findall(text.lower())


def complete_vocabulary(words: Sequence[str]) -> list[str]:
    """`words` with the four special tokens first (ids 0-3) and duplicates removed."""
    rest = [w for w in dict.fromkeys(words) if w not in SPECIAL_TOKENS]
    return [*SPECIAL_TOKENS, *rest]


def build_vocabulary(captions: Iterable[str], min_count: int = 1) -> list[str]:
    """A vocabulary of the words that occur at least `min_count` times, most frequent first.

    The paper kept words seen at least 15 times in Visual Genome; rarer words become <unk>.
    """
    counts = Counter(word for caption in captions for word in tokenize(caption))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return complete_vocabulary(words)


class FclnVocabulary:
    """Maps words to ids and back; built from a word list or, lacking one, a size.

    With only a size, words are placeholders "<w4>", "<w5>", ... so that a model can be built
    and trained on id-level data before a real vocabulary exists.
    """

    def __init__(self, words: Sequence[str] | None = None, size: int | None = None) -> None:
        if words is None:
            if size is None or size <= len(SPECIAL_TOKENS):
                raise DamInputError(f"FclnVocabulary needs a word list or a size above 4, got size={size!r}")
            words = [*SPECIAL_TOKENS, *(f"<w{i}>" for i in range(len(SPECIAL_TOKENS), size))]
        self.words = complete_vocabulary(words)
        self.ids = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def from_config(cls, config: "FclnConfig") -> "FclnVocabulary":
        """The vocabulary an FclnConfig describes (its word list, or placeholders of its size)."""
        return cls(config.vocabulary, config.vocab_size)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """Word ids of `text` (no <start>/<end>); unknown words become <unk>."""
        return [self.ids.get(word, UNK_ID) for word in tokenize(text)]

    def encode_batch(self, texts: Sequence[str], max_words: int | None = None) -> torch.Tensor:
        """(N, L) right-padded word ids of `texts`, each cut to `max_words` when given."""
        encoded = [self.encode(text)[:max_words] for text in texts]
        width = max((len(ids) for ids in encoded), default=0)
        batch = torch.full((len(encoded), max(width, 1)), PAD_ID, dtype=torch.long)
        for row, ids in enumerate(encoded):
            batch[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        """The words of `ids` up to the first <end>, joined by spaces; <pad>/<start> skipped."""
        words = []
        for token in ids:
            token = int(token)
            if token == END_ID:
                break
            if token in (PAD_ID, START_ID):
                continue
            words.append(self.words[token])
        return " ".join(words)

    def decode_batch(self, ids: torch.Tensor) -> list[str]:
        """Captions of each row of an (N, L) id tensor."""
        return [self.decode(row) for row in ids.tolist()]
