"""Stage 2's candidate objects: open-vocabulary boxes (OWLv2) and a mask per box (SAM).

    detector = OwlDetector.from_config(config.detector, device="cuda", dtype="bfloat16")
    found = detector.detect(image)                       # Detections: boxes, scores, class names
    segmenter = BoxSegmenter.from_config(config.sam, device="cuda")
    masks, ious = segmenter.segment(image, found.boxes)  # (N, H, W) bool, SAM's predicted IoUs

**OWLv2** (transformers ``Owlv2ForObjectDetection`` + its processor, from a local folder). The
vocabulary (hundreds of class names, LVIS-sized lists included) becomes text queries through
``query_template`` and is embedded once, ``text_batch_size`` queries per text-encoder call,
then cached: per image only the vision tower and the heads run, and the class logits of every
patch against every query are one matrix product. Each patch's box takes its best class;
``score = sigmoid(best logit)`` as the processor's post-processing computes it. Boxes come out
relative to the processor's padded square (OWLv2 pads images bottom/right to a square before
resizing), so they are scaled by the square's side and clipped to the image. Candidates are
the boxes scoring at least ``min_score``, after per-class NMS at ``nms_iou``, best
``max_detections`` first; boxes less than a pixel wide or high are dropped.

**SAM** (segment-anything, the model ``dam.sam.SamPrompter`` loads). The image is encoded once;
the boxes go through the prompt encoder and mask decoder ``batch_size`` at a time
(``SamPredictor.predict_torch``), each giving one mask and its predicted IoU (with
``multimask_output`` the best of three by predicted IoU). Half dtypes run under autocast: the
predictor feeds float32 inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dam.configio import ConfigError
from dam.errors import DamInputError
from data_pipeline.devices import resolve_device

if TYPE_CHECKING:
    import torch

    from data_pipeline.config import DetectorConfig, SamConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Detections", "OwlDetector", "BoxSegmenter", "load_vocabulary", "torch_dtype", "load_hf_model", "on_device",
]


def torch_dtype(name: str) -> "torch.dtype":
    """A dtype name of the config ("float32", "bfloat16", "float16") as a torch.dtype."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def on_device(image_processor: Any, device: "torch.device") -> dict[str, str]:
    """Keyword arguments that make a torchvision-backed image processor resize on ``device``.

    OWLv2's anti-aliased resize of an SA-1B image to 960 px takes seconds on one CPU core and
    milliseconds on a GPU; processors without a ``device`` option get none.
    """
    valid = getattr(image_processor, "valid_kwargs", None)
    return {"device": str(device)} if "device" in getattr(valid, "__annotations__", {}) else {}


def load_hf_model(path: str | None, key: str, what: str, load: Any) -> Any:
    """``load(folder)`` for the model folder at config key ``key``; clear errors for a missing or unloadable one."""
    if not path:
        raise ConfigError(f"{key} is required: the local folder of {what}")
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{key}: {path!r} is not a transformers model folder (no config.json); pass the local folder of {what}")
    try:
        return load(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DamInputError(f"{key}: could not load {what} from {path!r} ({type(error).__name__}: {error})") from error


def load_vocabulary(value: list[str] | str | None, key: str = "detector.vocabulary") -> list[str]:
    """The class names of a vocabulary given as a list or as a text file (one per line, '#' comments)."""
    if value is None:
        raise ConfigError(f"{key} is required: a list of class names, or a text file with one name per line")
    if isinstance(value, str):
        path = Path(value)
        if not path.is_file():
            raise ConfigError(f"{key}: {value!r} is not a file; give a list of class names or a text file with one per line")
        lines = path.read_text(encoding="utf-8").splitlines()
        names = [line.split("#", 1)[0].strip() for line in lines]
        names = [name for name in names if name]
    else:
        names = [str(name).strip() for name in value]
    if not names or not all(names):
        raise ConfigError(f"{key} must name at least one class and no empty names")
    seen: set[str] = set()
    repeated = sorted({name for name in names if name in seen or seen.add(name)})  # type: ignore[func-returns-value]
    if repeated:
        raise ConfigError(f"{key} names {', '.join(map(repr, repeated[:5]))} more than once; each class once")
    return names


@dataclass
class Detections:
    """An image's candidate boxes, best score first."""

    boxes: np.ndarray  # (N, 4) float32, [x0, y0, x1, y1] in pixels of the image
    scores: np.ndarray  # (N,) float32, sigmoid of the best class logit
    labels: np.ndarray  # (N,) int64, index into the vocabulary
    categories: list[str]  # the class names of labels
    over_cap: int = 0
    """Boxes above min_score after NMS that max_detections left out."""

    def __len__(self) -> int:
        return len(self.scores)


class OwlDetector:
    """OWLv2 over a fixed vocabulary (see the module docstring)."""

    def __init__(
        self, model: Any, processor: Any, vocabulary: list[str], *, query_template: str = "a photo of a {}",
        min_score: float = 0.1, nms_iou: float = 0.3, max_detections: int = 32, text_batch_size: int = 256,
    ) -> None:
        self.model = model.eval()
        self.processor = processor
        self.vocabulary = list(vocabulary)
        self.queries = [query_template.replace("{}", name.replace("_", " ")) for name in self.vocabulary]
        self.min_score, self.nms_iou, self.max_detections = min_score, nms_iou, max_detections
        self.text_batch_size = text_batch_size
        self._query_embeds: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: "DetectorConfig", device: str | None = None, dtype: str = "float32") -> "OwlDetector":
        """Load the checkpoint at ``config.path`` onto ``device`` in ``dtype``."""
        from transformers import AutoProcessor, Owlv2ForObjectDetection

        vocabulary = load_vocabulary(config.vocabulary)
        what = "an OWLv2 checkpoint (Owlv2ForObjectDetection + Owlv2Processor)"
        processor = load_hf_model(config.path, "detector.path", what, AutoProcessor.from_pretrained)
        model = load_hf_model(
            config.path, "detector.path", what, lambda p: Owlv2ForObjectDetection.from_pretrained(p, dtype=torch_dtype(dtype))
        )
        model.to(resolve_device(device))
        logger.info("detector: OWLv2 %s on %s, %d classes", config.path, model.device, len(vocabulary))
        return cls(
            model, processor, vocabulary, query_template=config.query_template, min_score=config.min_score,
            nms_iou=config.nms_iou, max_detections=config.max_detections, text_batch_size=config.text_batch_size,
        )

    @property
    def device(self) -> "torch.device":
        return self.model.device

    def query_embeds(self) -> "torch.Tensor":
        """(Q, D) projected text embeddings of the vocabulary, computed on first use."""
        import torch

        if self._query_embeds is None:
            tokenizer = self.processor.tokenizer
            length = self.model.config.text_config.max_position_embeddings
            chunks = []
            with torch.inference_mode():
                for start in range(0, len(self.queries), self.text_batch_size):
                    tokens = tokenizer(
                        self.queries[start:start + self.text_batch_size], padding="max_length", max_length=length,
                        truncation=True, return_tensors="pt",
                    )
                    output = self.model.owlv2.get_text_features(
                        input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device),
                    )
                    chunks.append(output.pooler_output if hasattr(output, "pooler_output") else output)
            self._query_embeds = torch.cat(chunks)  # (Q, D)
        return self._query_embeds

    def _scale(self, height: int, width: int) -> tuple[float, float]:
        """Pixels per unit of the predicted (normalised) x and y."""
        if getattr(self.processor.image_processor, "do_pad", True):
            side = float(max(height, width))  # padded bottom/right to a square before the resize
            return side, side
        return float(width), float(height)

    def detect(self, image: np.ndarray) -> Detections:
        """The candidate boxes of one uint8 (H, W, 3) image."""
        import torch
        from torchvision.ops import batched_nms

        height, width = image.shape[:2]
        queries = self.query_embeds()
        image_processor = self.processor.image_processor
        inputs = image_processor(images=[image], return_tensors="pt", **on_device(image_processor, self.device))
        pixel_values = inputs["pixel_values"].to(self.device, dtype=self.model.dtype)
        with torch.inference_mode():
            feature_map, _ = self.model.image_embedder(pixel_values=pixel_values)  # (1, h, w, D)
            batch, rows, cols, dim = feature_map.shape
            features = feature_map.reshape(batch, rows * cols, dim)  # (1, P, D)
            logits, _ = self.model.class_predictor(features, queries[None].to(features.dtype), None)  # (1, P, Q)
            boxes = self.model.box_predictor(features, feature_map)  # (1, P, 4) cx, cy, w, h in [0, 1]
        best, labels = logits[0].float().max(dim=-1)  # (P,)
        scores = best.sigmoid()
        boxes = boxes[0].float()
        scale_x, scale_y = self._scale(height, width)
        centre_x, centre_y, box_w, box_h = boxes.unbind(-1)
        corners = torch.stack([
            ((centre_x - box_w / 2) * scale_x).clamp(0, width), ((centre_y - box_h / 2) * scale_y).clamp(0, height),
            ((centre_x + box_w / 2) * scale_x).clamp(0, width), ((centre_y + box_h / 2) * scale_y).clamp(0, height),
        ], dim=-1)  # (P, 4) x0, y0, x1, y1 in pixels
        keep = (scores >= self.min_score) & (corners[:, 2] - corners[:, 0] >= 1) & (corners[:, 3] - corners[:, 1] >= 1)
        corners, scores, labels = corners[keep], scores[keep], labels[keep]
        kept = batched_nms(corners, scores, labels, self.nms_iou)  # indices, best score first
        over_cap = max(0, len(kept) - self.max_detections)
        kept = kept[: self.max_detections].cpu()
        labels_out = labels.cpu()[kept].numpy().astype(np.int64)
        return Detections(
            boxes=corners.cpu()[kept].numpy().astype(np.float32), scores=scores.cpu()[kept].numpy().astype(np.float32),
            labels=labels_out, categories=[self.vocabulary[i] for i in labels_out], over_cap=over_cap,
        )


class BoxSegmenter:
    """A mask and SAM's predicted IoU per box (see the module docstring)."""

    def __init__(self, sam: Any, *, batch_size: int = 32, multimask_output: bool = False, dtype: str = "float32") -> None:
        """``sam``: a segment-anything ``Sam`` model, or a ``dam.sam.SamPrompter`` whose predictor this takes over
        (the image embedding it holds is this segmenter's from then on)."""
        from dam.sam import SamPrompter

        self.predictor = sam.predictor if isinstance(sam, SamPrompter) else SamPrompter(sam).predictor
        self.batch_size, self.multimask_output, self.dtype = batch_size, multimask_output, dtype

    @classmethod
    def from_config(cls, config: "SamConfig", device: str | None = None, dtype: str = "float32") -> "BoxSegmenter":
        from dam.sam import SamPrompter

        if not config.checkpoint:
            raise ConfigError("sam.checkpoint is required: an official SAM checkpoint file (e.g. sam_vit_h_4b8939.pth)")
        prompter = SamPrompter.from_checkpoint(config.checkpoint, config.model_type, device=str(resolve_device(device)))
        return cls(prompter, batch_size=config.batch_size, multimask_output=config.multimask_output, dtype=dtype)

    def segment(self, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Masks (N, H, W) bool and predicted IoUs (N,) float32 of the ``boxes`` (N, 4) [x0, y0, x1, y1] in ``image``."""
        import contextlib

        import torch

        height, width = image.shape[:2]
        if len(boxes) == 0:
            return np.zeros((0, height, width), bool), np.zeros(0, np.float32)
        predictor = self.predictor
        device = predictor.device
        half = self.dtype != "float32"
        autocast = torch.autocast(device.type, dtype=torch_dtype(self.dtype)) if half else contextlib.nullcontext()
        masks, ious = [], []
        with torch.inference_mode(), autocast:
            predictor.set_image(image, image_format="RGB")
            for start in range(0, len(boxes), self.batch_size):
                chunk = torch.as_tensor(boxes[start:start + self.batch_size], dtype=torch.float32, device=device)
                prompts = predictor.transform.apply_boxes_torch(chunk, (height, width))
                found, predicted, _ = predictor.predict_torch(
                    point_coords=None, point_labels=None, boxes=prompts, multimask_output=self.multimask_output,
                )  # (B, C, H, W) bool, (B, C)
                best = predicted.float().argmax(dim=1)  # C is 1 without multimask_output
                rows = torch.arange(len(best), device=best.device)
                masks.append(found[rows, best].cpu().numpy())
                ious.append(predicted.float()[rows, best].cpu().numpy())
        return np.concatenate(masks).astype(bool), np.concatenate(ious).astype(np.float32)
