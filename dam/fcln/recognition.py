"""The recognition network: region features -> region code, final score, box refinement.

Flattened Y x X x C features go through two fully connected layers with ReLU and dropout (the
paper's fc6/fc7, 4096 wide, which can start from VGG-16's ImageNet classifier). The resulting
region code feeds the language model, a 1-logit confidence and 4 offsets refining the proposal
with the same parameterisation as the anchors.
"""

from __future__ import annotations

import torch
from torch import nn


class RecognitionNetwork(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(hidden_size, 1)
        self.box = nn.Linear(hidden_size, 4)

    def reset_parameters(self) -> None:
        for layer in (self.fc1, self.fc2):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
        # Near-zero refinements at the start, so final boxes begin as the proposals.
        nn.init.normal_(self.score.weight, std=0.01)
        nn.init.normal_(self.box.weight, std=0.001)
        nn.init.zeros_(self.score.bias)
        nn.init.zeros_(self.box.bias)

    def forward(self, region_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R, C, Y, X) -> codes (R, D), score logits (R,), refinement offsets (R, 4)."""
        flat = region_features.flatten(1)  # (R, C*Y*X)
        hidden = self.dropout(torch.relu(self.fc1(flat)))  # (R, D)
        codes = self.dropout(torch.relu(self.fc2(hidden)))  # (R, D)
        return codes, self.score(codes).squeeze(-1), self.box(codes)

    def load_vgg_classifier(self, state: dict[str, torch.Tensor]) -> bool:
        """Initialise fc1/fc2 from VGG-16's fc6/fc7 when the shapes agree; returns whether it did.

        VGG's fc6 reads pool5 (7 x 7 x 512, channel-major flattening), which is exactly what a
        7 x 7 sample of conv5_3 flattens to here, as in the paper.
        """
        pairs = {"fc1": "classifier.0", "fc2": "classifier.3"}
        for ours, theirs in pairs.items():
            layer = getattr(self, ours)
            weight, bias = state.get(f"{theirs}.weight"), state.get(f"{theirs}.bias")
            if weight is None or bias is None or weight.shape != layer.weight.shape or bias.shape != layer.bias.shape:
                return False
        with torch.no_grad():
            for ours, theirs in pairs.items():
                getattr(self, ours).weight.copy_(state[f"{theirs}.weight"])
                getattr(self, ours).bias.copy_(state[f"{theirs}.bias"])
        return True
