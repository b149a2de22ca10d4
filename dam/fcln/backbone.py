"""Stride-16 convolutional backbones of the FCLN and their ImageNet weights from local files.

- "vgg16": torchvision's VGG-16 `features` without the last max-pool, i.e. conv5_3 + ReLU
  (512 channels), as in the paper.
- "resnet50": torchvision's ResNet-50 up to layer3 (1024 channels), batch norm frozen since
  the FCLN trains on one image per batch, where batch statistics are meaningless.
- "tiny": four 3x3 stride-2 convs, for tests and smoke runs.

Weights come from a torchvision state-dict file (e.g. vgg16-397923af.pth) given by path;
nothing is downloaded. The VGG file's fc6/fc7 can also initialise the recognition network.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.vgg import cfgs as vgg_layer_specs
from torchvision.models.vgg import make_layers
from torchvision.ops import FrozenBatchNorm2d

from dam.errors import DamInputError

logger = logging.getLogger(__name__)

STRIDE = 16
BACKBONE_CHANNELS = {"vgg16": 512, "resnet50": 1024}
# Where feature cell (i, j) looks in the input: its receptive field is centred at
# (STRIDE * j + offset, STRIDE * i + offset) in continuous pixel coordinates (pixel k covers
# [k, k + 1)). Centred convs keep the centre; what moves it is how each stage downsamples.
# VGG-16's four 2x2 max-pools each shift it by half their input step (0.5 + 1 + 2 + 4 = 7.5
# pixels), so cell j sees the centre of input block [16j, 16j + 16): 16j + 8. ResNet-50's
# stride-2 layers (7x7 pad 3, 3x3 pad 1 max-pool and convs, 1x1 downsample) and the tiny
# backbone's 3x3 pad-1 stride-2 convs all sample at 2j, so cell j sees input pixel 16j, whose
# centre is 16j + 0.5. Anchors and the bilinear sampler must use these, or every box is read
# half a cell (8 pixels) away from where the features look (tests/test_fcln.py measures it).
FEATURE_OFFSETS = {"vgg16": 8.0, "resnet50": 0.5, "tiny": 0.5}
_RESNET_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")


def backbone_channels(name: str, tiny_channels: int) -> int:
    """Channels of the feature map `name` produces."""
    return tiny_channels if name == "tiny" else BACKBONE_CHANNELS[name]


def build_backbone(name: str, tiny_channels: int = 64) -> nn.Sequential:
    """A randomly initialised stride-16 backbone (see the module docstring for the choices)."""
    if name == "vgg16":
        # make_layers builds `features` alone, without VGG's 100M-parameter classifier;
        # dropping the final max-pool keeps the other indices, so torchvision keys still match.
        features = make_layers(vgg_layer_specs["D"])
        return nn.Sequential(*list(features.children())[:-1])
    if name == "resnet50":
        full = resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        return nn.Sequential(OrderedDict((part, getattr(full, part)) for part in _RESNET_PARTS))
    if name == "tiny":
        layers: list[nn.Module] = []
        in_channels = 3
        for out_channels in (16, 32, tiny_channels, tiny_channels):
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            in_channels = out_channels
        return nn.Sequential(*layers)
    raise DamInputError(f"unknown FCLN backbone {name!r}; use 'vgg16', 'resnet50' or 'tiny'")


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision state-dict file, with user-facing errors."""
    path = Path(path)
    if not path.is_file():
        raise DamInputError(
            f"{what} weights file {str(path)!r} does not exist; give the path of a local torchvision "
            f"state dict (e.g. vgg16-397923af.pth), or none to start from random weights"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for bad files
        raise DamInputError(
            f"{what} weights file {str(path)!r} could not be read as a torch state dict "
            f"({type(exc).__name__}: {exc}); save one with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DamInputError(f"{what} weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def load_backbone_state(backbone: nn.Sequential, name: str, state: dict[str, torch.Tensor], path: str) -> None:
    """Copy a torchvision ImageNet state dict into `backbone`; errors name what does not fit."""
    if name == "tiny":
        raise DamInputError("the 'tiny' FCLN backbone has no ImageNet weights; use backbone='vgg16' or 'resnet50'")
    if name == "vgg16":
        prefix, wanted = "features.", backbone.state_dict().keys()
        picked = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    else:
        wanted = backbone.state_dict().keys()
        picked = {key: value for key, value in state.items() if key.split(".", 1)[0] in _RESNET_PARTS}
    missing = sorted(set(wanted) - set(picked))
    if missing:
        raise DamInputError(
            f"weights file {path!r} is not a torchvision {name} state dict: it lacks {len(missing)} "
            f"backbone tensors (first: {missing[0]!r}); pass the file torchvision's {name} checkpoint came in"
        )
    expected = backbone.state_dict()
    for key in wanted:
        if picked[key].shape != expected[key].shape:
            raise DamInputError(
                f"weights file {path!r} does not fit the {name} backbone: {key!r} has shape "
                f"{tuple(picked[key].shape)}, expected {tuple(expected[key].shape)}"
            )
    backbone.load_state_dict({key: picked[key] for key in wanted})
    logger.info("loaded %s ImageNet weights from %s", name, path)


def freeze_first_convs(backbone: nn.Module, count: int) -> None:
    """Stop gradients into the first `count` Conv2d layers of `backbone` (in module order)."""
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv2d)]
    if count > len(convs):
        raise DamInputError(
            f"FclnConfig frozen_backbone_convs={count} exceeds the backbone's {len(convs)} conv layers"
        )
    for conv in convs[:count]:
        conv.requires_grad_(False)


class FclnBackbone(nn.Module):
    """The chosen backbone: images (B, 3, H, W) -> features (B, C, ~H/16, ~W/16); cell (i, j)
    is centred on input pixel position (stride * j + feature_offset, stride * i + feature_offset)."""

    stride = STRIDE

    def __init__(self, name: str, tiny_channels: int = 64) -> None:
        super().__init__()
        self.name = name
        self.out_channels = backbone_channels(name, tiny_channels)
        self.body = build_backbone(name, tiny_channels)
        self.feature_offset = FEATURE_OFFSETS[name]  # input-pixel centre of cell 0's receptive field

    def reset_parameters(self) -> None:
        """He initialisation of every conv (the backbones are ReLU nets); frozen BN stays identity."""
        for module in self.body.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # (B, C, Hf, Wf)

    def load_imagenet_state(self, state: dict[str, torch.Tensor], path: str) -> None:
        """Load a torchvision ImageNet state dict (already read from `path`) into the body."""
        load_backbone_state(self.body, self.name, state, path)
