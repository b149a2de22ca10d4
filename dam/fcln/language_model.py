"""The FCLN's LSTM language model, conditioned on a region code.

Input sequence per region: the region code projected to the word-embedding size (Linear +
ReLU, the image encoder of DenseCap's LanguageModel.lua) at t = -1,
the <start> embedding at t = 0, then the caption's words. The output after <start> predicts
the first word, and the output after the last word predicts <end>; the output at t = -1 is
discarded. Generation is batched over regions, stops per sequence at <end> and after
`max_length` tokens (<end> included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dam.fcln.vocabulary import END_ID, PAD_ID, START_ID


def caption_lengths(captions: torch.Tensor) -> torch.Tensor:
    """(R,) words before the first <pad> or <end> of each row of (R, L) ids."""
    stops = (captions == PAD_ID) | (captions == END_ID)  # (R, L)
    stops = torch.cat((stops, torch.ones_like(stops[:, :1])), dim=1)  # (R, L+1): a stop after the end
    return stops.int().argmax(dim=1)


def caption_targets(captions: torch.Tensor, max_words: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs (R, L) and targets (R, L+1) from right-padded word ids (R, L').

    Words stop at the first <pad>/<end> and at `max_words`; the inputs are those words
    (pad after), the targets the same words followed by <end> (pad after).
    """
    lengths = caption_lengths(captions).clamp(max=max_words)  # (R,)
    width = int(lengths.max()) if lengths.numel() else 0
    positions = torch.arange(width, device=captions.device)[None]  # (1, L)
    inputs = torch.where(positions < lengths[:, None], captions[:, :width], PAD_ID)  # (R, L)
    targets = F.pad(inputs, (0, 1), value=PAD_ID)  # (R, L+1)
    targets.scatter_(1, lengths[:, None], END_ID)
    return inputs, targets


class FclnLanguageModel(nn.Module):
    def __init__(self, code_size: int, vocab_size: int, embedding_size: int, hidden_size: int,
                 num_layers: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        self.code_projection = nn.Linear(code_size, embedding_size)
        self.embedding = nn.Embedding(vocab_size, embedding_size, padding_idx=PAD_ID)
        self.lstm = nn.LSTM(embedding_size, hidden_size, num_layers=num_layers, batch_first=True,
                            dropout=dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size, vocab_size)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.code_projection.weight, std=self.code_projection.in_features ** -0.5)
        nn.init.zeros_(self.code_projection.bias)
        nn.init.normal_(self.embedding.weight, std=0.1)
        for name, parameter in self.lstm.named_parameters():
            if "weight" in name:
                nn.init.xavier_uniform_(parameter)
            else:
                nn.init.zeros_(parameter)
        nn.init.xavier_uniform_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def encode_regions(self, codes: torch.Tensor) -> torch.Tensor:
        """The LSTM's input at t = -1, (R, E) from codes (R, D): Linear then ReLU, as the paper's code."""
        return torch.relu(self.code_projection(codes))

    def forward(self, codes: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (R, L+1, V) for codes (R, D) and word ids (R, L) (no start/end).

        Position t of the output predicts word t + 1 (the last position: <end>), matching the
        targets of `caption_targets`.
        """
        start = torch.full_like(words[:, :1], START_ID)  # (R, 1)
        embedded = self.embedding(torch.cat((start, words), dim=1))  # (R, L+1, E)
        inputs = torch.cat((self.encode_regions(codes)[:, None], embedded), dim=1)  # (R, L+2, E)
        hidden, _ = self.lstm(self.dropout(inputs))  # (R, L+2, H)
        return self.output(self.dropout(hidden[:, 1:]))  # (R, L+1, V)

    @torch.no_grad()
    def generate(self, codes: torch.Tensor, max_length: int, do_sample: bool = False,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids (R, T), T <= max_length, for codes (R, D): words, then <end>, then <pad>.

        Greedy by default; `do_sample` draws from softmax(logits / temperature). <pad> and
        <start> are never produced. A sequence that has not ended after `max_length` tokens is
        cut there (no <end>).
        """
        num_regions = codes.shape[0]
        _, state = self.lstm(self.encode_regions(codes)[:, None])  # t = -1
        token = torch.full((num_regions,), START_ID, dtype=torch.long, device=codes.device)
        finished = torch.zeros(num_regions, dtype=torch.bool, device=codes.device)
        produced: list[torch.Tensor] = []
        for _ in range(max_length):
            hidden, state = self.lstm(self.embedding(token)[:, None], state)  # (R, 1, H)
            logits = self.output(hidden[:, 0])  # (R, V)
            logits[:, PAD_ID] = float("-inf")
            logits[:, START_ID] = float("-inf")
            if do_sample:
                probabilities = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probabilities, 1, generator=generator).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            token = token.masked_fill(finished, PAD_ID)
            produced.append(token)
            finished |= token == END_ID
            if bool(finished.all()):
                break
        if not produced:
            return torch.zeros(num_regions, 0, dtype=torch.long, device=codes.device)
        return torch.stack(produced, dim=1)  # (R, T)
