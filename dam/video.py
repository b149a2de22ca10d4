"""Video frames and masklets: read frames with decord (PyAV fallback) and sample masklet frames.

A DAM describes an object through a video from ``num_frames`` (8) frames, each with its own
focal prompt. This module turns a video (an mp4 path or a list of frames) and a masklet (one
mask per video frame, in any format :func:`dam.masks.load_mask` accepts) into exactly those
frame/mask pairs, decoding only the frames it needs.

Frames are chosen evenly among the frames where the object is visible (non-empty mask), so an
object that enters late or leaves early is still seen in every sampled frame.

SA-V annotations store one masklet entry every 4th video frame (annotated frame ``t`` is video
frame ``4 t``); :func:`sav_masklet_to_frame_masks` maps them back to video frame indices.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dam.errors import DamInputError

logger = logging.getLogger(__name__)

_VIDEO_EXTRA = "pip install 'describe-anything-toolkit[video]'"
_warned_no_decord = False


def _check_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DamInputError(f"video file {str(path)!r} does not exist (or is not a file); pass the path of an mp4 or other video file")
    return p


def _import_decord() -> Any | None:
    try:
        import decord
    except ImportError:
        return None
    return decord


def _import_av() -> Any | None:
    try:
        import av
    except ImportError:
        return None
    return av


def _check_indices(indices: Sequence[int], num_frames: int, path: Path) -> list[int]:
    out = []
    for i in indices:
        try:
            idx = operator.index(i)
        except TypeError:
            raise DamInputError(f"frame index {i!r} for video {str(path)!r} is not an integer") from None
        if not 0 <= idx < num_frames:
            raise DamInputError(
                f"frame index {idx} is out of range for video {str(path)!r} with {num_frames} frames "
                f"(valid indices are 0..{num_frames - 1})"
            )
        out.append(idx)
    return out


class _VideoFile:
    """An opened video file: frame count, frame size and frames by index.

    decord is used when importable and able to open the file; otherwise PyAV decodes the
    stream sequentially (stopping after the last needed frame).
    """

    def __init__(self, path: str | Path) -> None:
        global _warned_no_decord
        self.path = _check_path(path)
        self._vr = None
        self._size: tuple[int, int] | None = None
        decord = _import_decord()
        if decord is not None:
            try:
                self._vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0))
                self._num_frames = len(self._vr)
                return
            except Exception as exc:  # decord raises its own DECORDError / RuntimeError types
                logger.warning("decord could not open %s (%s); falling back to PyAV", self.path, exc)
        elif not _warned_no_decord:
            logger.warning("decord is not installed; reading videos with PyAV (slower random access)")
            _warned_no_decord = True
        self._open_av()

    def _open_av(self) -> None:
        av = _import_av()
        if av is None:
            if _import_decord() is None:
                raise ImportError(f"reading videos needs decord or PyAV: {_VIDEO_EXTRA}")
            raise DamInputError(f"video {str(self.path)!r} could not be read by decord and PyAV is not installed ({_VIDEO_EXTRA})")
        try:
            with av.open(str(self.path)) as container:
                if not container.streams.video:
                    raise DamInputError(f"file {str(self.path)!r} has no video stream")
                stream = container.streams.video[0]
                self._size = (int(stream.codec_context.height), int(stream.codec_context.width))
                n = int(stream.frames or 0)
                if n <= 0:  # container does not store the count: count decoded frames
                    n = sum(1 for _ in container.decode(stream))
        except DamInputError:
            raise
        except Exception as exc:
            raise DamInputError(f"video {str(self.path)!r} could not be read ({exc}); is it a valid video file?") from exc
        if n <= 0:
            raise DamInputError(f"video {str(self.path)!r} has no decodable frames")
        self._num_frames = n

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the frames."""
        if self._size is None:
            self._size = tuple(self.read([0])[0].shape[:2])  # type: ignore[assignment]
        return self._size  # type: ignore[return-value]

    def read(self, indices: Sequence[int] | None = None) -> list[np.ndarray]:
        idx = list(range(self.num_frames)) if indices is None else _check_indices(indices, self.num_frames, self.path)
        if not idx:
            return []
        if self._vr is not None:
            batch = self._vr.get_batch(idx)
            arr = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # (T, H, W, 3)
            return [np.ascontiguousarray(f, dtype=np.uint8) for f in arr]
        return self._read_av(idx)

    def _read_av(self, idx: list[int]) -> list[np.ndarray]:
        av = _import_av()
        wanted = set(idx)
        last = max(wanted)
        found: dict[int, np.ndarray] = {}
        decoded = 0
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"
                for i, frame in enumerate(container.decode(stream)):
                    decoded = i + 1
                    if i in wanted:
                        found[i] = frame.to_ndarray(format="rgb24")
                    if i >= last:
                        break
        except Exception as exc:
            raise DamInputError(f"video {str(self.path)!r} could not be decoded ({exc})") from exc
        missing = sorted(wanted - found.keys())
        if missing:
            raise DamInputError(
                f"frame index {missing[0]} is out of range for video {str(self.path)!r}: only "
                f"{decoded} frames could be decoded (metadata says {self.num_frames} frames)"
            )
        return [found[i] for i in idx]


def read_video_frames(path: str | Path, indices: Sequence[int] | None = None) -> list[np.ndarray]:
    """Read frames ``indices`` (all frames when None) of a video as uint8 (H, W, 3) RGB arrays.

    Frames come back in the order of ``indices`` (repeats allowed). Uses decord, or PyAV when
    decord is missing or cannot open the file.
    """
    return _VideoFile(path).read(indices)


def video_num_frames(path: str | Path) -> int:
    """Number of frames in a video file."""
    return _VideoFile(path).num_frames


def _is_empty(mask: Any) -> bool:
    return mask is None or not np.any(np.asarray(mask))


def sample_masklet_frames(masks: Sequence[np.ndarray | None], num_frames: int = 8) -> list[int]:
    """Indices of ``num_frames`` frames spread evenly over the frames where the mask is non-empty.

    ``np.linspace`` over the non-empty frames, rounded; with fewer non-empty frames than
    ``num_frames`` some indices repeat (still evenly spread). ``None`` counts as empty.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise DamInputError(f"num_frames must be a positive integer, got {num_frames!r}")
    visible = [i for i, m in enumerate(masks) if not _is_empty(m)]
    if not visible:
        raise DamInputError(
            f"the masklet is empty in every frame ({len(masks)} frames): the object must be visible "
            "(non-empty mask) in at least one frame"
        )
    positions = np.rint(np.linspace(0, len(visible) - 1, int(num_frames))).astype(int)
    return [visible[p] for p in positions]


def load_masklet(
    masks: Any,
    num_video_frames: int | None = None,
    frame_size: tuple[int, int] | None = None,
) -> list[np.ndarray | None]:
    """Normalise a masklet to one bool (H, W) mask, or None ("object absent"), per video frame.

    Accepts a list with one entry per frame (any format :func:`dam.masks.load_mask` accepts,
    including SA-V / COCO RLE dicts, or None), a dict ``{frame_index: mask}`` (frames not in
    it are None; needs ``num_video_frames``), or an array of shape (T, H, W). ``frame_size`` is
    the frames' (H, W), needed for formats that do not carry their size (polygons).
    """
    from dam.masks import load_mask

    if hasattr(masks, "detach") and hasattr(masks, "cpu"):  # torch tensor
        masks = masks.detach().cpu().numpy()
    entries: list[Any]
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise DamInputError(f"a masklet array must have shape (T, H, W), got shape {masks.shape}")
        entries = list(masks)
    elif isinstance(masks, Mapping):
        if num_video_frames is None:
            raise DamInputError("a masklet given as {frame_index: mask} needs the number of video frames (num_video_frames)")
        entries = [None] * num_video_frames
        for key, m in masks.items():
            try:
                t = int(key)
            except (TypeError, ValueError):
                raise DamInputError(f"masklet dict key {key!r} is not a frame index") from None
            if not 0 <= t < num_video_frames:
                raise DamInputError(
                    f"masklet has a mask for frame {t}, but the video has {num_video_frames} frames (valid: 0..{num_video_frames - 1})"
                )
            entries[t] = m
    elif isinstance(masks, Sequence) and not isinstance(masks, (str, bytes)):
        entries = list(masks)
    else:
        raise DamInputError(
            f"unsupported masklet type {type(masks).__name__}: pass a list with one mask (or None) per frame, "
            "a {frame_index: mask} dict, or a (T, H, W) array"
        )
    if not entries:
        raise DamInputError("the masklet has no frames")
    if num_video_frames is not None and len(entries) != num_video_frames:
        raise DamInputError(
            f"the masklet has {len(entries)} frames but the video has {num_video_frames} frames; "
            "give one mask (or None) per video frame, or a {frame_index: mask} dict"
        )
    out: list[np.ndarray | None] = []
    shape: tuple[int, ...] | None = None
    for t, m in enumerate(entries):
        if m is None:
            out.append(None)
            continue
        try:
            mask = load_mask(m, frame_size, allow_empty=True)
        except DamInputError as exc:
            raise DamInputError(f"masklet frame {t}: {exc}") from exc
        if shape is None:
            shape = mask.shape
        elif mask.shape != shape:
            raise DamInputError(f"masklet frame {t} has size {mask.shape} but earlier frames have size {shape}; all masks must have the video's frame size")
        out.append(mask)
    return out


def sav_masklet_to_frame_masks(
    masklet: list[list[dict]],
    object_index: int,
    num_video_frames: int,
    stride: int = 4,
) -> dict[int, dict]:
    """Map one object's SA-V masklet to ``{video_frame_index: RLE}``.

    SA-V's ``masklet`` is a list over annotated frames of a list over objects of COCO RLE
    dicts; annotations were made every ``stride`` (4) video frames, so annotated frame ``t``
    is video frame ``stride * t``. Entries that are None are left out. The result feeds
    :func:`load_masklet` / :func:`prepare_video_inputs` as a dict masklet.
    """
    if stride < 1:
        raise DamInputError(f"stride must be >= 1, got {stride}")
    out: dict[int, dict] = {}
    for t, objects in enumerate(masklet):
        if not 0 <= object_index < len(objects):
            raise DamInputError(
                f"object_index {object_index} is out of range: annotated frame {t} of the SA-V masklet has {len(objects)} objects"
            )
        frame = t * stride
        if frame >= num_video_frames:
            raise DamInputError(
                f"the SA-V masklet has {len(masklet)} annotated frames (stride {stride}), which needs at least "
                f"{(len(masklet) - 1) * stride + 1} video frames, but the video has {num_video_frames} frames"
            )
        rle = objects[object_index]
        if rle is not None:
            out[frame] = rle
    return out


def prepare_video_inputs(video: Any, masks: Any, num_frames: int = 8) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Pick ``num_frames`` (frame, mask) pairs for describing a masklet.

    ``video`` is a video file path or a sequence of frames (anything :func:`dam.images.load_image`
    accepts); ``masks`` is a masklet in any form :func:`load_masklet` accepts. Frames are sampled
    with :func:`sample_masklet_frames` and only those are decoded / loaded.
    """
    from dam.images import load_image

    if isinstance(video, (str, Path)):
        vf = _VideoFile(video)
        n = vf.num_frames
        size_of_frames = lambda: vf.frame_size  # noqa: E731
        read = vf.read
        name = f"video {str(video)!r}"
    elif (isinstance(video, np.ndarray) and video.ndim == 4) or isinstance(video, Sequence):
        frames_in = list(video)
        n = len(frames_in)
        if n == 0:
            raise DamInputError("the video has no frames")
        cache: dict[int, np.ndarray] = {}

        def get(i: int) -> np.ndarray:
            if i not in cache:
                cache[i] = load_image(frames_in[i])
            return cache[i]

        size_of_frames = lambda: tuple(get(0).shape[:2])  # noqa: E731
        read = lambda idx: [get(i) for i in idx]  # noqa: E731
        name = "the video"
    else:
        raise DamInputError(f"unsupported video type {type(video).__name__}: pass a video file path or a list of frames")

    masklet = load_masklet(masks, n, _frame_size_if_needed(masks, size_of_frames))
    indices = sample_masklet_frames(masklet, num_frames)
    frames = read(indices)
    out_masks: list[np.ndarray] = []
    for i, frame in zip(indices, frames):
        mask = masklet[i]
        assert mask is not None  # sample_masklet_frames only picks non-empty frames
        if mask.shape != frame.shape[:2]:
            raise DamInputError(
                f"masklet frame {i} has size {mask.shape} (H, W) but frame {i} of {name} has size {frame.shape[:2]}"
            )
        out_masks.append(mask)
    return list(frames), out_masks


def _frame_size_if_needed(masks: Any, size_of_frames: Any) -> tuple[int, int] | None:
    """The frame size when some masklet entry might need it (avoids decoding a frame otherwise)."""
    if isinstance(masks, Mapping):
        values = list(masks.values())
    elif isinstance(masks, Sequence) and not isinstance(masks, (str, bytes)):
        values = list(masks)
    else:  # arrays carry their size; anything else is rejected by load_masklet
        return None
    for m in values:
        if m is None or isinstance(m, np.ndarray):
            continue
        if isinstance(m, Mapping) and "size" in m and "counts" in m:
            continue
        return size_of_frames()
    return None
