"""The DenseCap FCLN baseline (Johnson, Karpathy, Fei-Fei, CVPR 2016) in modern PyTorch.

    from dam.fcln import FclnConfig, FclnModel
    model = FclnModel(FclnConfig(backbone="tiny", vocabulary=["red", "box"])).eval()
    detections = model.detect(image, max_regions=10)   # boxes, scores, captions per image

Needs torchvision (backbones, NMS). CPU smoke run: tests/test_fcln.py trains a tiny model in
seconds.
"""

from dam.fcln.backbone import FclnBackbone
from dam.fcln.bilinear import bilinear_sample_boxes
from dam.fcln.boxes import decode_boxes, encode_boxes, make_anchors
from dam.fcln.configuration_fcln import FclnConfig, paper_anchor_sizes
from dam.fcln.language_model import FclnLanguageModel
from dam.fcln.localization import AnchorSample, LocalizationHead, sample_anchors, select_proposals
from dam.fcln.losses import FclnLossParts
from dam.fcln.modeling_fcln import FclnDetections, FclnModel, FclnOutput, FclnPreTrainedModel
from dam.fcln.processing import FclnImageBatch, FclnImageProcessor
from dam.fcln.recognition import RecognitionNetwork
from dam.fcln.vocabulary import FclnVocabulary, build_vocabulary, tokenize

__all__ = [
    "AnchorSample",
    "FclnBackbone",
    "FclnConfig",
    "FclnDetections",
    "FclnImageBatch",
    "FclnImageProcessor",
    "FclnLanguageModel",
    "FclnLossParts",
    "FclnModel",
    "FclnOutput",
    "FclnPreTrainedModel",
    "FclnVocabulary",
    "LocalizationHead",
    "RecognitionNetwork",
    "bilinear_sample_boxes",
    "build_vocabulary",
    "decode_boxes",
    "encode_boxes",
    "make_anchors",
    "paper_anchor_sizes",
    "sample_anchors",
    "select_proposals",
    "tokenize",
]
