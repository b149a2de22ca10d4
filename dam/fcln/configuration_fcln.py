"""FclnConfig: every size and threshold of the DenseCap FCLN (Johnson et al., CVPR 2016).

Defaults follow the paper: VGG-16 conv5_3 features (stride 16), k = 12 anchors, 256 sampled
boxes per image for training, NMS at IoU 0.7 down to 300 proposals at test time, 7 x 7 bilinear
sampling, two 4096-d fully connected layers, a 512-d LSTM, captions of at most 15 tokens
(END included), loss weights 0.1 for the four box/score terms and 1.0 for captioning.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

from transformers import PretrainedConfig

from dam.errors import DamInputError
from dam.fcln.vocabulary import complete_vocabulary

BackboneName = Literal["vgg16", "resnet50", "tiny"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def paper_anchor_sizes() -> list[list[float]]:
    """The 12 default anchors as (width, height): areas 64^2 .. 512^2, aspects 1:2, 2:1, 1:1."""
    sizes = []
    for side in (64.0, 128.0, 256.0, 512.0):
        long_side, short_side = side * math.sqrt(2.0), side / math.sqrt(2.0)
        sizes += [[round(short_side), round(long_side)], [round(long_side), round(short_side)], [side, side]]
    return sizes


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise DamInputError(f"FclnConfig {name}={value!r} must be positive")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise DamInputError(f"FclnConfig {name}={value!r} must lie in [0, 1]")


class FclnConfig(PretrainedConfig):
    """Configuration of the DenseCap fully convolutional localization network.

    Args:
        backbone: "vgg16" (conv5_3, 512 channels, the paper), "resnet50" (up to layer3, 1024
            channels, frozen batch norm) or "tiny" (four stride-2 convs, for tests). All stride 16.
        tiny_backbone_channels: output channels of the "tiny" backbone.
        frozen_backbone_convs: the first N conv layers of the backbone get no gradient. None
            means the backbone's usual choice when FclnModel loads ImageNet weights: 4 for vgg16
            (the paper does not fine-tune conv1_1..conv2_2), 1 for resnet50 (the stem), 0 for
            tiny; and 0 when the backbone starts random (frozen random convs never learn).
            FclnModel writes the number it used back here, so a saved model keeps it.
        anchors: (width, height) in input pixels of the k anchors per position.
        localization_hidden_size: channels of the localization layer's 3x3 conv.
        rpn_batch_size: B, boxes sampled per image for training.
        rpn_positive_fraction: at most this fraction of the B boxes are positives.
        rpn_positive_iou / rpn_negative_iou: IoU at or above which an anchor is positive, below
            which it is negative (in between: ignored).
        anchor_boundary_tolerance: at training, anchors that cross the image border by more than
            this many pixels are neither positives nor negatives (as in Faster R-CNN and the
            DenseCap code); None keeps every anchor.
        proposal_nms_iou: NMS threshold on the localization layer's boxes at test time.
        test_num_proposals: proposals kept after that NMS (the paper's B = 300).
        pre_nms_top_n: score-sorted boxes entering that NMS (None: all of them).
        final_nms_iou: NMS threshold on the recognition network's refined boxes at test time.
        grid_size: (Y, X) points the bilinear sampler reads per box.
        recognition_hidden_size: width of the two fully connected layers (the region code D).
        recognition_dropout: dropout after each of them.
        word_embedding_size, lstm_hidden_size, lstm_num_layers, lstm_dropout: the language model.
        vocabulary: the word list; "<pad>", "<start>", "<end>", "<unk>" are put first (ids
            0-3) when missing. None makes `vocab_size` placeholder words "<w4>", "<w5>", ...
        vocab_size: size when no `vocabulary` is given (ignored otherwise).
        max_caption_length: tokens per caption, END included (longer captions are truncated).
        *_loss_weight: weights of the five loss terms.
        backprop_into_boxes: let the recognition and caption losses reach the localization
            layer's box offsets through the bilinear sampler (the paper's end-to-end training).
        image_longer_side, image_mean, image_std: what the image processor resizes to and
            normalises with.
    """

    model_type = "fcln"

    def __init__(
        self,
        backbone: BackboneName = "vgg16",
        tiny_backbone_channels: int = 64,
        frozen_backbone_convs: int | None = None,
        anchors: list[list[float]] | None = None,
        localization_hidden_size: int = 256,
        rpn_batch_size: int = 256,
        rpn_positive_fraction: float = 0.5,
        rpn_positive_iou: float = 0.7,
        rpn_negative_iou: float = 0.3,
        anchor_boundary_tolerance: float | None = 0.0,
        proposal_nms_iou: float = 0.7,
        test_num_proposals: int = 300,
        pre_nms_top_n: int | None = None,
        final_nms_iou: float = 0.3,
        grid_size: tuple[int, int] | list[int] = (7, 7),
        recognition_hidden_size: int = 4096,
        recognition_dropout: float = 0.5,
        word_embedding_size: int = 512,
        lstm_hidden_size: int = 512,
        lstm_num_layers: int = 1,
        lstm_dropout: float = 0.0,
        vocabulary: list[str] | None = None,
        vocab_size: int = 10000,
        max_caption_length: int = 15,
        objectness_loss_weight: float = 0.1,
        anchor_box_loss_weight: float = 0.1,
        final_score_loss_weight: float = 0.1,
        final_box_loss_weight: float = 0.1,
        caption_loss_weight: float = 1.0,
        backprop_into_boxes: bool = True,
        image_longer_side: int = 720,
        image_mean: tuple[float, float, float] | list[float] = IMAGENET_MEAN,
        image_std: tuple[float, float, float] | list[float] = IMAGENET_STD,
        **kwargs: Any,
    ) -> None:
        if backbone not in get_args(BackboneName):
            raise DamInputError(
                f"FclnConfig backbone={backbone!r} is not one of {', '.join(get_args(BackboneName))}"
            )
        anchors = paper_anchor_sizes() if anchors is None else [[float(w), float(h)] for w, h in anchors]
        if not anchors or any(w <= 0 or h <= 0 for w, h in anchors):
            raise DamInputError(f"FclnConfig anchors={anchors!r} must be a non-empty list of positive (width, height)")
        grid_size = tuple(int(v) for v in grid_size)
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise DamInputError(f"FclnConfig grid_size={grid_size!r} must be two positive ints (Y, X), e.g. (7, 7)")
        sizes = {
            "rpn_batch_size": rpn_batch_size, "test_num_proposals": test_num_proposals,
            "recognition_hidden_size": recognition_hidden_size, "lstm_hidden_size": lstm_hidden_size,
            "word_embedding_size": word_embedding_size, "localization_hidden_size": localization_hidden_size,
            "image_longer_side": image_longer_side, "lstm_num_layers": lstm_num_layers,
        }
        for name, value in sizes.items():
            _check_positive(name, value)
        fractions = {
            "rpn_positive_fraction": rpn_positive_fraction, "rpn_positive_iou": rpn_positive_iou,
            "rpn_negative_iou": rpn_negative_iou, "proposal_nms_iou": proposal_nms_iou,
            "final_nms_iou": final_nms_iou, "recognition_dropout": recognition_dropout, "lstm_dropout": lstm_dropout,
        }
        for name, value in fractions.items():
            _check_fraction(name, value)
        if rpn_negative_iou > rpn_positive_iou:
            raise DamInputError(
                f"FclnConfig rpn_negative_iou={rpn_negative_iou} exceeds rpn_positive_iou={rpn_positive_iou}; "
                "negatives must overlap less than positives"
            )
        if max_caption_length < 2:
            raise DamInputError(
                f"FclnConfig max_caption_length={max_caption_length} leaves no room for a word before END; use >= 2"
            )
        self.backbone = backbone
        self.tiny_backbone_channels = tiny_backbone_channels
        self.frozen_backbone_convs = frozen_backbone_convs
        self.anchors = anchors
        self.localization_hidden_size = localization_hidden_size
        self.rpn_batch_size = rpn_batch_size
        self.rpn_positive_fraction = rpn_positive_fraction
        self.rpn_positive_iou = rpn_positive_iou
        self.rpn_negative_iou = rpn_negative_iou
        self.anchor_boundary_tolerance = anchor_boundary_tolerance
        self.proposal_nms_iou = proposal_nms_iou
        self.test_num_proposals = test_num_proposals
        self.pre_nms_top_n = pre_nms_top_n
        self.final_nms_iou = final_nms_iou
        self.grid_size = list(grid_size)
        self.recognition_hidden_size = recognition_hidden_size
        self.recognition_dropout = recognition_dropout
        self.word_embedding_size = word_embedding_size
        self.lstm_hidden_size = lstm_hidden_size
        self.lstm_num_layers = lstm_num_layers
        self.lstm_dropout = lstm_dropout
        self.vocabulary = None if vocabulary is None else complete_vocabulary(vocabulary)
        self.vocab_size = len(self.vocabulary) if self.vocabulary is not None else vocab_size
        if self.vocab_size <= 4:
            raise DamInputError(f"FclnConfig vocab_size={self.vocab_size} has no room for words beyond the 4 specials")
        self.max_caption_length = max_caption_length
        self.objectness_loss_weight = objectness_loss_weight
        self.anchor_box_loss_weight = anchor_box_loss_weight
        self.final_score_loss_weight = final_score_loss_weight
        self.final_box_loss_weight = final_box_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.backprop_into_boxes = backprop_into_boxes
        self.image_longer_side = image_longer_side
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        super().__init__(**kwargs)

    @property
    def num_anchors(self) -> int:
        """k, anchors per feature position."""
        return len(self.anchors)

    @property
    def resolved_frozen_backbone_convs(self) -> int:
        """`frozen_backbone_convs` with None replaced by the backbone's usual choice with ImageNet weights."""
        if self.frozen_backbone_convs is not None:
            return self.frozen_backbone_convs
        return {"vgg16": 4, "resnet50": 1, "tiny": 0}[self.backbone]
