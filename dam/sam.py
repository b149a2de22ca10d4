"""Points, boxes and scribbles -> masks with segment-anything (SAM), for DAM's region prompts.

DAM describes a region given as a mask; users often have a box, a few clicks or a scribble
instead. :class:`SamPrompter` turns those into a bool (H, W) mask with a segment-anything
``SamPredictor``, caching the image embedding so that several prompts on the same image run
the (expensive) image encoder once.

    prompter = SamPrompter.from_checkpoint("sam_vit_h_4b8939.pth", device="cuda")
    mask = prompter.mask_from_box(image, [x0, y0, x1, y1])

Needs ``pip install 'describe-anything-toolkit[sam]'``; checkpoints are the official SAM
releases (sam_vit_h_4b8939.pth, sam_vit_l_0b3195.pth, sam_vit_b_01ec64.pth).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dam.errors import DamInputError

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

logger = logging.getLogger(__name__)

_SAM_EXTRA = "pip install 'describe-anything-toolkit[sam]'"
_CHECKPOINT_HINT = (
    "download sam_vit_h_4b8939.pth from the segment-anything release page "
    "(https://github.com/facebookresearch/segment-anything#model-checkpoints; "
    "vit_l: sam_vit_l_0b3195.pth, vit_b: sam_vit_b_01ec64.pth) and pass its local path"
)


def _import_segment_anything() -> Any:
    try:
        import segment_anything
    except ImportError as exc:
        raise ImportError(f"SAM prompts need the segment-anything package: {_SAM_EXTRA}") from exc
    return segment_anything


def _image_key(image: np.ndarray) -> tuple[tuple[int, ...], bytes]:
    return image.shape, hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).digest()


class SamPrompter:
    """Turn boxes, points and scribbles on an image into bool (H, W) masks with SAM.

    The image embedding of the last image is cached (keyed by the image's bytes), so repeated
    prompts on the same image do not re-run the image encoder.
    """

    def __init__(self, model: Sam) -> None:
        """Wrap a built segment-anything ``Sam`` model (on any device) in a ``SamPredictor``."""
        sam = _import_segment_anything()
        self.predictor = sam.SamPredictor(model)
        self._key: tuple[tuple[int, ...], bytes] | None = None

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path, model_type: str = "vit_h", device: str = "cpu") -> SamPrompter:
        """Build SAM ``model_type`` (vit_h, vit_l, vit_b) from an official checkpoint file."""
        sam = _import_segment_anything()
        registry = sam.sam_model_registry
        valid = sorted(k for k in registry if k != "default")
        if model_type not in registry:
            raise DamInputError(f"unknown SAM model_type {model_type!r}; valid types are {valid}")
        path = Path(checkpoint)
        if not path.is_file():
            raise DamInputError(f"SAM checkpoint {str(checkpoint)!r} does not exist; {_CHECKPOINT_HINT}")
        try:
            model = registry[model_type](checkpoint=str(path))
        except RuntimeError as exc:
            raise DamInputError(
                f"SAM checkpoint {str(checkpoint)!r} does not fit model_type {model_type!r} ({str(exc)[:200]}...); "
                f"pass the model_type the checkpoint was released for ({valid})"
            ) from exc
        model.to(device).eval()
        logger.info("loaded SAM %s from %s on %s", model_type, path, device)
        return cls(model)

    def _set_image(self, img: np.ndarray) -> None:
        """Compute the embedding of uint8 (H, W, 3) ``img`` unless it is the cached one."""
        key = _image_key(img)
        if key != self._key:
            self.predictor.set_image(img, image_format="RGB")
            self._key = key

    def mask_from_box(self, image: Any, box: Any) -> np.ndarray:
        """Mask of the object in ``box`` = [x0, y0, x1, y1] (pixels, x1 > x0, y1 > y0, inside the image)."""
        arr = _as_float_array(box, "box")
        if arr.shape != (4,):
            raise DamInputError(f"box must be [x0, y0, x1, y1], got shape {arr.shape}")
        img = _load_image(image)
        h, w = img.shape[:2]
        x0, y0, x1, y1 = arr.tolist()
        if not (x1 > x0 and y1 > y0):
            raise DamInputError(f"box {arr.tolist()} is empty or flipped: need x1 > x0 and y1 > y0 ([x0, y0, x1, y1] format)")
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise DamInputError(f"box {arr.tolist()} is outside the image of size (W={w}, H={h}); coordinates are pixels")
        self._set_image(img)
        masks, scores, _ = self.predictor.predict(box=arr, multimask_output=False)
        return self._best(masks, scores, "box")

    def mask_from_points(self, image: Any, points: Any, labels: Any = None) -> np.ndarray:
        """Mask from clicks ``points`` = [[x, y], ...]; ``labels`` 1 = foreground (default), 0 = background."""
        pts = _as_float_array(points, "points")
        if pts.ndim == 1 and pts.shape == (2,):
            pts = pts[None]
        if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
            raise DamInputError(f"points must be [[x, y], ...] with shape (N, 2), got shape {pts.shape}")
        if labels is None:
            lab = np.ones(len(pts), dtype=np.int64)
        else:
            lab = np.asarray(labels)
            if lab.shape != (len(pts),):
                raise DamInputError(f"labels must have one entry per point ({len(pts)}), got shape {lab.shape}")
            if not np.isin(lab, (0, 1)).all():
                raise DamInputError(f"labels must be 1 (foreground) or 0 (background), got {lab.tolist()}")
            lab = lab.astype(np.int64)
        if not lab.any():
            raise DamInputError("at least one point must be a foreground point (label 1)")
        img = _load_image(image)
        h, w = img.shape[:2]
        outside = (pts[:, 0] < 0) | (pts[:, 0] >= w) | (pts[:, 1] < 0) | (pts[:, 1] >= h)
        if outside.any():
            raise DamInputError(f"points {pts[outside].tolist()} are outside the image of size (W={w}, H={h}); points are [x, y] pixels")
        self._set_image(img)
        single = len(pts) == 1
        masks, scores, _ = self.predictor.predict(point_coords=pts, point_labels=lab, multimask_output=single)
        return self._best(masks, scores, "points")

    def mask_from_scribble(self, image: Any, scribble_mask: Any, max_points: int = 10) -> np.ndarray:
        """Mask from a scribble (a mask of the stroke's pixels): up to ``max_points`` evenly spaced
        stroke pixels become foreground clicks for :meth:`mask_from_points` (deterministic)."""
        from dam.masks import load_mask

        if max_points < 1:
            raise DamInputError(f"max_points must be >= 1, got {max_points}")
        img = _load_image(image)
        h, w = img.shape[:2]
        scribble = load_mask(scribble_mask, (h, w), allow_empty=True)
        if scribble.shape != (h, w):
            raise DamInputError(f"scribble mask has size {scribble.shape} (H, W) but the image has size {(h, w)}")
        ys, xs = np.nonzero(scribble)
        if len(xs) == 0:
            raise DamInputError("the scribble mask is empty: draw at least one pixel on the object")
        pick = np.unique(np.rint(np.linspace(0, len(xs) - 1, min(max_points, len(xs)))).astype(int))
        points = np.stack([xs[pick], ys[pick]], axis=1).astype(np.float64)
        return self.mask_from_points(img, points)

    @staticmethod
    def _best(masks: np.ndarray, scores: np.ndarray, what: str) -> np.ndarray:
        mask = np.asarray(masks[int(np.argmax(scores))], dtype=bool)  # (H, W)
        if not mask.any():
            logger.warning("SAM returned an empty mask for the %s prompt", what)
        return mask


def _load_image(image: Any) -> np.ndarray:
    from dam.images import load_image

    return load_image(image)


def _as_float_array(value: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DamInputError(f"{name} must be numbers, got {value!r}") from None
    if not np.isfinite(arr).all():
        raise DamInputError(f"{name} must be finite numbers, got {arr.tolist()}")
    return arr
