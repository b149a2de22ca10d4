"""Projectors from vision features (N, T, C) to LLM embeddings (N, T', D).

`mlp2x_gelu` keeps every token; `mlp_downsample` merges each 2x2 block of the patch grid
into one token (VILA's, used by the released DAM): a 27x27 grid is zero-padded at the bottom
and right to 28x28 and becomes 14x14 = 196 tokens of 4C channels ordered
(r0,c0), (r0,c1), (r1,c0), (r1,c1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dam.modeling.configuration_dam import DamConfig


class TokenDownsample2x2(nn.Module):
    """(N, G*G, C) row-major patch tokens -> (N, ceil(G/2)^2, 4C), 2x2 blocks merged.

    The merged tokens follow the blocks row by row, or column by column with `column_major`
    (the released DAM/VILA projector's order); within a block the channels are always
    (r0,c0), (r0,c1), (r1,c0), (r1,c1).
    """

    def __init__(self, column_major: bool = False) -> None:
        super().__init__()
        self.column_major = column_major

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, channels = tokens.shape
        grid = math.isqrt(length)
        if grid * grid != length:
            raise ValueError(f"mlp_downsample needs a square token grid, got {length} tokens")
        grid_tokens = tokens.view(batch, grid, grid, channels)
        if grid % 2:  # one zero row at the bottom, one zero column at the right
            grid_tokens = F.pad(grid_tokens, (0, 0, 0, 1, 0, 1))
            grid += 1
        half = grid // 2
        # (N, R, C, D) -> (N, R/2, 2, C/2, 2, D) -> (N, R/2, C/2, 2r, 2c, D), or (N, C/2, R/2, ...)
        block_axes = (3, 1) if self.column_major else (1, 3)
        blocks = grid_tokens.view(batch, half, 2, half, 2, channels).permute(0, *block_axes, 2, 4, 5)
        return blocks.reshape(batch, half * half, 4 * channels)


def build_projector(config: DamConfig) -> nn.Sequential:
    """The projector named by `config.projector_type`, as an nn.Sequential (checkpoint indices)."""
    vision_width = config.vision_config.hidden_size
    text_width = config.text_config.hidden_size
    if config.projector_type == "mlp_downsample":
        return nn.Sequential(
            TokenDownsample2x2(column_major=config.downsample_order == "column_major"),
            nn.LayerNorm(4 * vision_width),
            nn.Linear(4 * vision_width, text_width),
            nn.GELU(),
            nn.Linear(text_width, text_width),
        )
    return nn.Sequential(
        nn.Linear(vision_width, text_width), nn.GELU(), nn.Linear(text_width, text_width)
    )
