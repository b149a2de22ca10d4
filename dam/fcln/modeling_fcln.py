"""FclnModel: the DenseCap fully convolutional localization network (Johnson et al., 2016).

image -> backbone (stride 16) -> localization layer (anchor scores and offsets) -> B boxes
(sampled against the ground truth in training; NMS'd proposals at test time) -> bilinear
sampling (Y x X per box) -> recognition network (region code, final score, refinement) ->
LSTM captions. One image at a time from the localization layer on, as in the paper; a batch
tensor shares one backbone pass, a list of differently sized images is looped.

    model = FclnModel(FclnConfig(vocabulary=words), backbone_weights="vgg16-397923af.pth")
    loss = model(images, targets).loss                     # training
    detections = model.eval().detect([pil_image], max_regions=20)   # inference, original pixels
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.ops import nms
from transformers import PreTrainedModel
from transformers.initialization import guard_torch_init_functions
from transformers.utils import ModelOutput

from dam.errors import DamInputError
from dam.fcln.backbone import FclnBackbone, freeze_first_convs, read_state_dict
from dam.fcln.bilinear import bilinear_sample_boxes
from dam.fcln.boxes import boxes_inside, clip_boxes, decode_boxes, encode_boxes
from dam.fcln.configuration_fcln import FclnConfig
from dam.fcln.language_model import FclnLanguageModel, caption_targets
from dam.fcln.localization import LocalizationHead, LocalizationOutput, sample_anchors, select_proposals
from dam.fcln.losses import FclnLossParts, box_offset_loss, caption_loss, logistic_loss
from dam.fcln.processing import FclnImageProcessor
from dam.fcln.recognition import RecognitionNetwork
from dam.fcln.targets import ImageTarget, prepare_targets
from dam.fcln.vocabulary import FclnVocabulary

logger = logging.getLogger(__name__)

Images = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class FclnOutput(ModelOutput):
    """Training: the weighted total loss and its five unweighted parts (means over images).
    Inference: per image the final boxes (R, 4) xyxy in input pixels, their scores (R,) in
    [0, 1] and region codes (R, D), sorted by decreasing score after the final NMS."""

    loss: torch.Tensor | None = None
    objectness_loss: torch.Tensor | None = None
    anchor_box_loss: torch.Tensor | None = None
    final_score_loss: torch.Tensor | None = None
    final_box_loss: torch.Tensor | None = None
    caption_loss: torch.Tensor | None = None
    boxes: list[torch.Tensor] | None = None
    scores: list[torch.Tensor] | None = None
    region_codes: list[torch.Tensor] | None = None

    def loss_parts(self) -> dict[str, float]:
        """The unweighted loss terms as floats, for logging."""
        names = ("objectness_loss", "anchor_box_loss", "final_score_loss", "final_box_loss", "caption_loss")
        return {name: float(getattr(self, name).detach()) for name in names if getattr(self, name) is not None}


@dataclass
class FclnDetections:
    """Dense captions of one image, sorted by decreasing score."""

    boxes: torch.Tensor  # (N, 4) xyxy pixels
    scores: torch.Tensor  # (N,) in [0, 1]
    captions: list[str]
    token_ids: torch.Tensor  # (N, T): words, <end>, then <pad>


class FclnPreTrainedModel(PreTrainedModel):
    config_class = FclnConfig
    base_model_prefix = "fcln"
    main_input_name = "images"

    _parts = (FclnBackbone, LocalizationHead, RecognitionNetwork, FclnLanguageModel)

    def _init_weights(self, module: nn.Module) -> None:
        """Leaf layers are initialised by the part that owns them (see `initialize_weights`)."""

    @torch.no_grad()
    def initialize_weights(self) -> None:
        # Each part knows its scheme (He for ReLU convs, near-zero box heads, Xavier LSTM), which
        # transformers' per-leaf dispatch cannot express: it skips parameter-less containers in
        # custom models. The guard makes nn.init leave alone tensors loaded from a checkpoint.
        with guard_torch_init_functions():
            for module in self.modules():
                if isinstance(module, self._parts):
                    module.reset_parameters()


class FclnModel(FclnPreTrainedModel):
    """Dense captioning: images in, boxes with scores and captions out (see the module docstring).

    `backbone_weights` is a local torchvision ImageNet state dict for the config's backbone;
    with VGG-16 its fc6/fc7 also initialise the recognition network when the sizes match.
    """

    def __init__(self, config: FclnConfig, backbone_weights: str | os.PathLike | None = None) -> None:
        super().__init__(config)
        self.backbone = FclnBackbone(config.backbone, config.tiny_backbone_channels)
        channels, stride = self.backbone.out_channels, self.backbone.stride
        self.localization = LocalizationHead(channels, config.localization_hidden_size, config.anchors, stride,
                                             self.backbone.feature_offset)
        grid_y, grid_x = config.grid_size
        self.recognition = RecognitionNetwork(
            channels * grid_y * grid_x, config.recognition_hidden_size, config.recognition_dropout
        )
        self.language_model = FclnLanguageModel(
            config.recognition_hidden_size, config.vocab_size, config.word_embedding_size,
            config.lstm_hidden_size, config.lstm_num_layers, config.lstm_dropout,
        )
        self.vocabulary = FclnVocabulary.from_config(config)
        self.post_init()
        if config.frozen_backbone_convs is None:
            # The paper keeps conv1_1..conv2_2 at their ImageNet values; random convs frozen that
            # way would stay random for ever, so without weights nothing is frozen. The choice is
            # written into the config so that a saved model (and a resumed run) keeps it.
            usual = config.resolved_frozen_backbone_convs
            config.frozen_backbone_convs = usual if backbone_weights is not None else 0
            if backbone_weights is None and usual:
                logger.warning(
                    "the %s FCLN backbone starts from random weights, so its first %d convs are trained instead of "
                    "frozen; the paper's setup starts from ImageNet weights: pass backbone_weights (dam-train fcln: "
                    "model.backbone_weights, e.g. torchvision's vgg16-397923af.pth)", config.backbone, usual,
                )  # fmt: skip
        freeze_first_convs(self.backbone, config.frozen_backbone_convs)
        if backbone_weights is not None:
            self.load_imagenet_weights(backbone_weights)

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> "FclnModel":
        """transformers' loading, then the config's frozen convs frozen again: loading replaces the
        parameters, which drops their requires_grad, and a resumed training must not train them."""
        model = super().from_pretrained(*args, **kwargs)
        freeze_first_convs(model.backbone, model.config.frozen_backbone_convs)
        return model

    def load_imagenet_weights(self, path: str | os.PathLike) -> None:
        """Load a torchvision ImageNet state dict into the backbone (and VGG fc6/fc7 into fc1/fc2)."""
        if self.config.backbone == "tiny":
            raise DamInputError(
                f"backbone_weights={str(path)!r} given for the 'tiny' backbone, which has no ImageNet "
                "weights; use backbone='vgg16' or 'resnet50', or drop backbone_weights"
            )
        state = read_state_dict(path, self.config.backbone)
        self.backbone.load_imagenet_state(state, str(path))
        if self.config.backbone == "vgg16":
            if self.recognition.load_vgg_classifier(state):
                logger.info("recognition fc1/fc2 initialised from VGG-16 fc6/fc7 in %s", path)
            else:
                logger.info("recognition network starts random: its sizes do not match VGG-16 fc6/fc7")

    # -- shared pieces -------------------------------------------------------------------------

    def _encode_images(self, images: Images) -> list[tuple[torch.Tensor, LocalizationOutput, tuple[int, int]]]:
        """Per image: features (C, Hf, Wf), localization output and (H, W) of the input."""
        dtype = next(self.backbone.parameters()).dtype
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                images = images[None]
            if images.ndim != 4 or images.shape[1] != 3:
                raise DamInputError(
                    f"images has shape {tuple(images.shape)}; pass normalised (B, 3, H, W) float images "
                    "(FclnImageProcessor makes them from uint8 arrays or PIL images)"
                )
            groups = [images]
        else:
            if len(images) == 0:
                raise DamInputError("images is an empty list; pass at least one (3, H, W) tensor")
            for index, image in enumerate(images):
                if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
                    raise DamInputError(f"images[{index}] must be a normalised (3, H, W) float tensor")
            groups = [image[None] for image in images]
        encoded = []
        for group in groups:
            height, width = group.shape[-2:]
            if min(height, width) < self.backbone.stride:
                raise DamInputError(
                    f"an image of {height}x{width} pixels is smaller than the backbone stride "
                    f"{self.backbone.stride}; resize it (FclnImageProcessor scales the longer side to "
                    f"{self.config.image_longer_side})"
                )
            features = self.backbone(group.to(dtype))  # (b, C, Hf, Wf)
            for feature, localization in zip(features, self.localization(features)):
                encoded.append((feature, localization, (int(height), int(width))))
        return encoded

    def _sample_regions(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return bilinear_sample_boxes(features, boxes, tuple(self.config.grid_size), self.backbone.stride,
                                     self.backbone.feature_offset)

    # -- training ------------------------------------------------------------------------------

    def _image_losses(self, features: torch.Tensor, localization: LocalizationOutput, size: tuple[int, int],
                      target: ImageTarget) -> FclnLossParts:
        config = self.config
        anchors, gt_boxes = localization.anchors, target.boxes
        valid = None
        if config.anchor_boundary_tolerance is not None:
            valid = boxes_inside(anchors, *size, tolerance=config.anchor_boundary_tolerance)
            if not bool(valid.any()):
                logger.warning("no anchor fits inside a %dx%d image; training on boundary-crossing anchors", *size)
                valid = None
        sample = sample_anchors(
            anchors, gt_boxes, config.rpn_batch_size, config.rpn_positive_fraction,
            config.rpn_positive_iou, config.rpn_negative_iou, valid,
        )
        positive, matched = sample.positive, sample.matched_gt
        num_positive = positive.numel()
        sampled = torch.cat((positive, sample.negative))  # (S,)
        labels = torch.zeros(sampled.numel(), device=anchors.device)
        labels[:num_positive] = 1.0
        matched_boxes = gt_boxes[matched]  # (P, 4)

        objectness = logistic_loss(localization.scores[sampled], labels)
        anchor_box = box_offset_loss(localization.offsets[positive], encode_boxes(matched_boxes, anchors[positive]))

        proposals = decode_boxes(localization.offsets[sampled], anchors[sampled])  # (S, 4)
        if not config.backprop_into_boxes:
            proposals = proposals.detach()
        codes, final_logits, refinements = self.recognition(self._sample_regions(features, proposals))
        final_score = logistic_loss(final_logits, labels)
        final_targets = encode_boxes(matched_boxes, proposals[:num_positive].detach())  # (P, 4)
        final_box = box_offset_loss(refinements[:num_positive], final_targets)

        words, targets = caption_targets(target.captions[matched], config.max_caption_length - 1)
        logits = self.language_model(codes[:num_positive], words)  # (P, L+1, V)
        caption = caption_loss(logits, targets)
        return FclnLossParts(objectness, anchor_box, final_score, final_box, caption)

    # -- inference -----------------------------------------------------------------------------

    def _image_detections(self, features: torch.Tensor, localization: LocalizationOutput,
                          size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        config = self.config
        boxes = localization.boxes()  # (N, 4)
        keep = select_proposals(boxes, localization.scores, *size, config.proposal_nms_iou,
                                config.test_num_proposals, config.pre_nms_top_n)
        proposals = clip_boxes(boxes[keep], *size)  # (R, 4)
        codes, logits, refinements = self.recognition(self._sample_regions(features, proposals))
        final = clip_boxes(decode_boxes(refinements, proposals), *size)  # (R, 4)
        scores = torch.sigmoid(logits)  # (R,)
        order = nms(final.float(), scores.float(), config.final_nms_iou)  # sorted by score
        return final[order], scores[order], codes[order]

    def forward(self, images: Images, targets: Sequence[Mapping[str, Any]] | None = None) -> FclnOutput:
        """With `targets` (one dict per image, see dam.fcln.targets): the losses. Without: the
        final boxes, scores and region codes per image (no captions; `generate` adds them)."""
        encoded = self._encode_images(images)
        if targets is None:
            boxes, scores, codes = zip(*(self._image_detections(*item) for item in encoded))
            return FclnOutput(boxes=list(boxes), scores=list(scores), region_codes=list(codes))
        prepared = prepare_targets(
            targets, len(encoded), self.vocabulary, self.config.max_caption_length - 1,
            encoded[0][0].device, encoded[0][0].dtype,
        )
        parts = FclnLossParts.mean([self._image_losses(*item, target) for item, target in zip(encoded, prepared)])
        config = self.config
        loss = (
            config.objectness_loss_weight * parts.objectness
            + config.anchor_box_loss_weight * parts.anchor_box
            + config.final_score_loss_weight * parts.final_score
            + config.final_box_loss_weight * parts.final_box
            + config.caption_loss_weight * parts.caption
        )
        return FclnOutput(
            loss=loss, objectness_loss=parts.objectness, anchor_box_loss=parts.anchor_box,
            final_score_loss=parts.final_score, final_box_loss=parts.final_box, caption_loss=parts.caption,
        )

    @torch.no_grad()
    def generate(self, images: Images, max_regions: int | None = None, score_threshold: float | None = None,
                 do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> list[FclnDetections]:
        """Boxes (input pixels), scores and captions per image, best first.

        `max_regions` caps the regions per image (None: all that survive the final NMS);
        `score_threshold` drops regions scoring below it. Captions are greedy unless `do_sample`.
        Call `.eval()` first: in training mode dropout is active.
        """
        if max_regions is not None and max_regions < 0:
            raise DamInputError(f"max_regions={max_regions} must be >= 0 (or None for all regions)")
        if do_sample and not temperature > 0:
            raise DamInputError(f"temperature={temperature} must be positive when sampling")
        output = self.forward(images)
        detections = []
        for boxes, scores, codes in zip(output.boxes, output.scores, output.region_codes):
            keep = torch.ones_like(scores, dtype=torch.bool) if score_threshold is None else scores >= score_threshold
            boxes, scores, codes = boxes[keep][:max_regions], scores[keep][:max_regions], codes[keep][:max_regions]
            token_ids = self.language_model.generate(
                codes, self.config.max_caption_length, do_sample, temperature, generator
            )
            detections.append(FclnDetections(boxes, scores, self.vocabulary.decode_batch(token_ids), token_ids))
        return detections

    @torch.no_grad()
    def detect(self, images: Any | Sequence[Any], max_regions: int | None = None,
               score_threshold: float | None = None, **generate_kwargs: Any) -> list[FclnDetections]:
        """Dense captions of raw images (paths, PIL, uint8 arrays), boxes in original pixels.

        Images are resized and normalised by the config's FclnImageProcessor; other arguments
        are those of `generate`. Returns one FclnDetections per image.
        """
        processor = FclnImageProcessor.from_config(self.config)
        batch = processor(images)
        device, dtype = next(self.parameters()).device, next(self.parameters()).dtype
        pixels = batch.stacked()
        pixels = pixels.to(device, dtype) if isinstance(pixels, torch.Tensor) else [p.to(device, dtype) for p in pixels]
        detections = self.generate(pixels, max_regions, score_threshold, **generate_kwargs)
        for index, detection in enumerate(detections):
            detection.boxes = processor.boxes_to_original(detection.boxes, batch, index)
        return detections
