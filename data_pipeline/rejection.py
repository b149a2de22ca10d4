"""Rejection models of the self-labeling stages: the partial-object check and the caption-crop check.

**Partial objects.** SAM prompted with a box (or an SA-V masklet) may segment a part of an
object: the head of a dog, a wheel of a car. Such masks make poor DLC data: their caption
describes the whole object while the mask shows a part. An instance-segmentation model
(:class:`InstanceSegmenter`: any transformers model whose image processor has
``post_process_instance_segmentation``, e.g. Mask2Former) gives the image's whole objects, and
:func:`judge_mask` compares a mask M with them. With I* the instance sharing the most pixels
with M (ties: the first), ``iou = |M & I*| / |M | I*|`` and ``inside = |M & I*| / |M|``:

- **whole**: ``iou >= match_iou``: M is that instance;
- **partial**: not whole and ``inside >= min_inside``: M lies (mostly) inside I* but covers only
  a fraction of it. When M sits inside I* its IoU is about ``|M| / |I*|``, the share of I* it
  covers, so a partial mask is one that I* covers at least ``min_inside`` of while it covers
  less than ``match_iou`` of I*: the instance covers it much more than it covers the instance;
- **unmatched**: neither (no instance, or M spans several objects or the background): the
  instance model has nothing to say, and ``unmatched: keep | drop`` decides.

The instances carry their class names (:class:`Instances`), so a whole mask can take the class
of the instance it is (the video stage names SA-V masklets, which come without classes, so).

Instances of classes in ``ignore_labels`` (a panoptic model's stuff: wall, sky, grass) are
left out, or every object in front of a wall would be "part of the wall".

**Caption-crop agreement.** :class:`SiglipScorer` scores a caption against the region's focal
crop (``dam.focal``, the crop DAM sees) with SigLIP: ``sigmoid(exp(t) * cos(image, text) + b)``,
the probability SigLIP was trained to output that the two match. SigLIP reads at most
``max_text_length`` tokens (64 for the released models): a detailed caption is judged by its
beginning, which is where a description names and places its object.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.focal import build_focal_prompt
from data_pipeline.detection import load_hf_model, on_device, torch_dtype
from data_pipeline.devices import resolve_device

if TYPE_CHECKING:
    import torch

    from data_pipeline.config import PartialConfig, SiglipConfig

logger = logging.getLogger(__name__)

__all__ = ["Verdict", "Judgement", "Instances", "judge_mask", "InstanceSegmenter", "SiglipScorer", "focal_crop"]

Verdict = Literal["whole", "partial", "unmatched"]


@dataclass(frozen=True)
class Instances:
    """An image's whole objects: ``masks`` (K, H, W) bool and each one's class name."""

    masks: np.ndarray
    labels: list[str]

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.masks):
            raise ValueError(f"{len(self.masks)} instance masks but {len(self.labels)} labels; give one label per mask")

    def __len__(self) -> int:
        return len(self.masks)


@dataclass(frozen=True)
class Judgement:
    """How a mask relates to its best instance (see the module docstring)."""

    verdict: Verdict
    iou: float
    inside: float
    instance: int | None  # index of the best instance, None when no instance touches the mask


def judge_mask(mask: np.ndarray, instances: np.ndarray, *, match_iou: float = 0.5, min_inside: float = 0.8) -> Judgement:
    """Whole, partial or unmatched: ``mask`` (H, W) bool against ``instances`` (K, H, W) bool."""
    area = int(np.count_nonzero(mask))
    if area == 0 or len(instances) == 0:
        return Judgement("unmatched", 0.0, 0.0, None)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))  # only pixels of M can be shared
    shared = (instances[(slice(None), *window)] & mask[window]).reshape(len(instances), -1).sum(axis=1)  # (K,)
    best = int(np.argmax(shared))
    if shared[best] == 0:
        return Judgement("unmatched", 0.0, 0.0, None)
    instance_area = int(np.count_nonzero(instances[best]))
    iou = float(shared[best]) / (area + instance_area - float(shared[best]))
    inside = float(shared[best]) / area
    verdict: Verdict = "whole" if iou >= match_iou else "partial" if inside >= min_inside else "unmatched"
    return Judgement(verdict, iou, inside, best)


class InstanceSegmenter:
    """Whole-object instance masks of an image from a transformers segmentation model."""

    def __init__(
        self, model: Any, image_processor: Any, *, threshold: float = 0.5, mask_threshold: float = 0.5,
        overlap_mask_area_threshold: float = 0.8, ignore_labels: list[str] | tuple[str, ...] = (),
    ) -> None:
        self.model = model.eval()
        self.image_processor = image_processor
        if not callable(getattr(image_processor, "post_process_instance_segmentation", None)):
            raise DamInputError(
                f"the instance model's image processor ({type(image_processor).__name__}) has no "
                f"post_process_instance_segmentation; use an instance or universal segmentation model (Mask2Former, MaskFormer)"
            )
        self.names = {int(index): str(name) for index, name in (getattr(model.config, "id2label", None) or {}).items()}
        labels = {name: index for index, name in self.names.items()}
        unknown = [name for name in ignore_labels if name not in labels]
        if unknown:
            raise ConfigError(
                f"partial.ignore_labels: {unknown} are not classes of the instance model (it has {len(labels)} classes, "
                f"e.g. {sorted(labels)[:5]})"
            )
        self.ignored = {labels[name] for name in ignore_labels}
        self.options: dict[str, Any] = {
            "threshold": threshold, "mask_threshold": mask_threshold, "overlap_mask_area_threshold": overlap_mask_area_threshold,
        }
        parameters = inspect.signature(image_processor.post_process_instance_segmentation).parameters
        # Binary maps keep overlapping instances (a person and the bag she holds); an id map cannot.
        self.binary_maps = "return_binary_maps" in parameters

    @classmethod
    def from_config(cls, config: "PartialConfig", device: str | None = None, dtype: str = "float32", key: str = "partial") -> "InstanceSegmenter":
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        def model(path: Any) -> Any:
            try:
                return AutoModelForUniversalSegmentation.from_pretrained(path, dtype=torch_dtype(dtype))
            except ValueError:  # an architecture outside the universal-segmentation mapping
                from transformers import AutoModelForInstanceSegmentation

                return AutoModelForInstanceSegmentation.from_pretrained(path, dtype=torch_dtype(dtype))

        what = "an instance-segmentation model with its image processor (e.g. Mask2Former COCO instance)"
        processor = load_hf_model(config.path, f"{key}.path", what, AutoImageProcessor.from_pretrained)
        network = load_hf_model(config.path, f"{key}.path", what, model)
        network.to(resolve_device(device))
        logger.info("partial filter: %s on %s", config.path, network.device)
        return cls(
            network, processor, threshold=config.threshold, mask_threshold=config.mask_threshold,
            overlap_mask_area_threshold=config.overlap_mask_area_threshold, ignore_labels=config.ignore_labels,
        )

    @property
    def device(self) -> "torch.device":
        return self.model.device

    def instances(self, image: np.ndarray) -> Instances:
        """The instances of a uint8 (H, W, 3) image: masks (K, H, W) bool and class names (K may be 0)."""
        import torch

        height, width = image.shape[:2]
        inputs = self.image_processor(images=[image], return_tensors="pt", **on_device(self.image_processor, self.device))
        inputs = {
            name: value.to(self.device, dtype=self.model.dtype if value.is_floating_point() else None)
            for name, value in inputs.items() if isinstance(value, torch.Tensor)
        }
        with torch.inference_mode():
            outputs = self.model(**inputs)
        options = dict(self.options, target_sizes=[(height, width)])
        if self.binary_maps:
            options["return_binary_maps"] = True
        result = self.image_processor.post_process_instance_segmentation(outputs, **options)[0]
        segmentation, segments = result["segmentation"], result.get("segments_info") or []
        if segmentation is None or not segments:
            return Instances(np.zeros((0, height, width), bool), [])
        segmentation = segmentation.cpu() if isinstance(segmentation, torch.Tensor) else torch.as_tensor(segmentation)
        masks, labels = [], []
        for position, segment in enumerate(segments):
            label_id = int(segment.get("label_id", -1))
            if label_id in self.ignored:
                continue
            if self.binary_maps and segmentation.ndim == 3:
                masks.append(segmentation[position].numpy() > 0)
            else:  # an id map: -1 (or 0) background, segment["id"] elsewhere
                masks.append((segmentation == segment["id"]).numpy())
            labels.append(self.names.get(label_id, str(label_id)))
        return Instances(np.stack(masks).astype(bool) if masks else np.zeros((0, height, width), bool), labels)


def focal_crop(image: np.ndarray, mask: np.ndarray, alpha: float = 3.0, min_size: int = 48) -> np.ndarray:
    """The focal crop (dam.focal) of region ``mask`` in ``image``, as DAM sees it."""
    return build_focal_prompt(image, mask, alpha=alpha, min_size=min_size).crop


class SiglipScorer:
    """SigLIP's match probability of (image, text) pairs (see the module docstring)."""

    def __init__(self, model: Any, processor: Any, *, batch_size: int = 32, max_text_length: int | None = None) -> None:
        self.model = model.eval()
        self.processor = processor
        self.batch_size = batch_size
        limit = getattr(model.config.text_config, "max_position_embeddings", None)
        self.max_text_length = min(max_text_length or limit or 64, limit or 64)

    @classmethod
    def from_config(cls, config: "SiglipConfig", device: str | None = None, dtype: str = "float32") -> "SiglipScorer":
        from transformers import AutoModel, AutoProcessor

        what = "a SigLIP checkpoint (SiglipModel + its processor)"
        processor = load_hf_model(config.path, "siglip.path", what, AutoProcessor.from_pretrained)
        model = load_hf_model(config.path, "siglip.path", what, lambda p: AutoModel.from_pretrained(p, dtype=torch_dtype(dtype)))
        if not all(hasattr(model, name) for name in ("logit_scale", "logit_bias")):
            raise DamInputError(f"siglip.path: {config.path!r} holds a {type(model).__name__}, not a SigLIP model (logit_scale and logit_bias)")
        model.to(resolve_device(device))
        logger.info("siglip: %s on %s", config.path, model.device)
        return cls(model, processor, batch_size=config.batch_size, max_text_length=config.max_text_length)

    def scores(self, images: list[np.ndarray], texts: list[str]) -> np.ndarray:
        """(N,) float32 probabilities that image i matches text i."""
        import torch

        if len(images) != len(texts):
            raise DamInputError(f"{len(images)} images but {len(texts)} texts; score them in pairs")
        device, dtype = self.model.device, self.model.dtype
        out = []
        for start in range(0, len(images), self.batch_size):
            inputs = self.processor(
                images=images[start:start + self.batch_size], text=texts[start:start + self.batch_size],
                padding="max_length", max_length=self.max_text_length, truncation=True, return_tensors="pt",
            )
            inputs = {
                name: value.to(device, dtype=dtype if value.is_floating_point() else None)
                for name, value in inputs.items() if isinstance(value, torch.Tensor)
            }
            with torch.inference_mode():
                logits = self.model(**inputs).logits_per_image  # (B, B): image i against text j
            out.append(torch.diagonal(logits).float().sigmoid().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)
