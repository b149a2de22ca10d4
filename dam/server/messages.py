"""OpenAI chat-completion request bodies -> DAM regions and generation settings.

The wire format is the standard one, so the official `openai` client (and curl) work as is:

    {"model": "dam", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
        {"type": "text", "text": "Describe the masked region in detail."}]}],
     "max_tokens": 128, "temperature": 0, "stream": true}

A request that leaves out max_tokens, temperature or top_p gets the model's own setting, from
its generation config (:func:`model_sampling`): greedy decoding for the toolkit's checkpoints,
temperature 0.2, top_p 0.5 and at most 512 tokens for a converted NVlabs DAM-3B.

**The mask rule.** The image parts of the last user message are read in order:

- an image whose alpha channel is not fully opaque is a frame *and* its mask (alpha >= 128 is
  the region; a cut-out PNG);
- any other image (no alpha, or alpha 255 everywhere) is a frame whose mask is the *next*
  image part (a grayscale / black-and-white PNG, white = region; any format
  :func:`dam.load_mask` reads from an image; a colour image there is refused, as it is
  more likely a frame sent without its mask than a mask).

So one image is either one RGBA cut-out, or two parts "image, mask"; a video is 8 frames, as
8 cut-outs or 8 interleaved "frame, mask" pairs. The text parts, joined, are the query
(default: the model's, "Describe the masked region in detail.").

Everything a client can get wrong raises :class:`RequestError`, which the app turns into a 400
with an OpenAI-style error body naming the parameter (``messages[0].content[1].image_url.url``).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from dam.describe import DEFAULT_MAX_NEW_TOKENS
from dam.errors import DamInputError
from dam.images import load_image_and_alpha
from dam.masks import load_mask

MAX_STOP_STRINGS = 16
_EXIF_ORIENTATION = 0x0112
MAX_TOKENS_LIMIT = 65536
_UNSUPPORTED = {
    "logprobs": "log-probabilities are not returned by this server; drop logprobs",
    "top_logprobs": "log-probabilities are not returned by this server; drop top_logprobs",
    "tools": "this server has no tool calling; drop tools",
    "functions": "this server has no function calling; drop functions",
}


class RequestError(Exception):
    """A request the client must fix: becomes HTTP 400 with an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Sampling:
    """Per-request generation settings; every row of a batched generate has its own."""

    max_tokens: int
    temperature: float = 0.0
    """0 decodes greedily; > 0 samples."""
    top_p: float = 1.0
    min_tokens: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def model_sampling(generation_config: Any) -> Sampling:
    """The settings of a request that gives none: the model's generation config (a
    transformers GenerationConfig, as `describe` and `dam describe` use it), greedy unless it
    samples; without max_new_tokens, describe's DEFAULT_MAX_NEW_TOKENS."""
    sample = bool(generation_config.do_sample)
    temperature, top_p = generation_config.temperature, generation_config.top_p
    return Sampling(
        max_tokens=generation_config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=(1.0 if temperature is None else float(temperature)) if sample else 0.0,  # None: transformers' 1.0
        top_p=1.0 if top_p is None else float(top_p),
    )


@dataclass
class ChatRequest:
    """A parsed request: frames as (uint8 (H, W, 3) image, bool (H, W) mask) pairs and settings."""

    frames: list[tuple[np.ndarray, np.ndarray]]
    query: str | None
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    query_param: str = "messages"


# ---- scalar fields ----------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be in [{low:g}, {high:g}], got {value!r}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _top_p(body: dict[str, Any], default: float) -> float:
    top_p = _number(body, "top_p", 0.0, 1.0, default)
    if top_p <= 0:
        raise RequestError(f"top_p must be in (0, 1], got {body['top_p']!r}", "top_p")
    return top_p


def _stop_strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise RequestError("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise RequestError(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    return tuple(stops)


def parse_sampling(body: dict[str, Any], defaults: Sampling) -> Sampling:
    """temperature, top_p, max_tokens (or max_completion_tokens), min_tokens, seed, stop, n;
    those of the first three a request leaves out (or sends as null) are `defaults`'."""
    n = _integer(body, "n", 1, 1 << 30)
    if n is not None and n != 1:
        raise RequestError(
            f"n={n} is not supported: this server returns one choice per request; send {n} requests "
            "(with different seeds and temperature > 0) instead",
            "n",
            "unsupported_parameter",
        )
    for name, why in _UNSUPPORTED.items():
        if body.get(name):
            raise RequestError(why, name, "unsupported_parameter")
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    max_tokens = defaults.max_tokens if max_tokens is None else max_tokens
    min_tokens = _integer(body, "min_tokens", 0, MAX_TOKENS_LIMIT) or 0
    if min_tokens > max_tokens:
        raise RequestError(f"min_tokens ({min_tokens}) is larger than max_tokens ({max_tokens})", "min_tokens")
    seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, defaults.temperature),
        top_p=_top_p(body, defaults.top_p),
        min_tokens=min_tokens,
        seed=seed,
        stop=_stop_strings(body.get("stop")),
    )


# ---- images -----------------------------------------------------------------------------


def decode_data_url(url: Any, param: str, max_pixels: int) -> Image.Image:
    """A `data:image/...;base64,...` URL -> a decoded PIL image (EXIF orientation applied)."""
    if not isinstance(url, str):
        raise RequestError(f"{param} must be a string (a data URL), got {type(url).__name__}", param)
    if not url.startswith("data:"):
        raise RequestError(
            f"{param} is not a data URL ({url[:40]!r}...): this server fetches nothing; send the image inline as "
            "data:image/png;base64,<base64 of the PNG>",
            param,
            "unsupported_url",
        )
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise RequestError(f"{param} must be a base64 data URL: data:image/png;base64,<data>", param, "invalid_image_url")
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(
            f"{param} holds invalid base64 ({error}); encode the file bytes with standard base64", param, "invalid_base64"
        ) from None
    try:
        image = Image.open(io.BytesIO(raw))
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(
            f"{param} is not a readable image ({type(error).__name__}); send a PNG or JPEG", param, "invalid_image"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(
            f"{param} is {width}x{height} = {width * height} pixels, more than this server's limit of {max_pixels} "
            "(--max-image-pixels); downscale the image and its mask",
            param,
            "image_too_large",
        )
    try:
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return image
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise RequestError(f"{param} could not be decoded ({error}); send a complete PNG or JPEG", param, "invalid_image") from None


def _carries_mask(alpha: np.ndarray | None) -> bool:
    return alpha is not None and int(alpha.min()) < 255


def _frame_mask(source: Any, size: tuple[int, int], frame: int, param: str) -> np.ndarray:
    """A frame's mask from an alpha array or a mask image, checked against the frame's size."""
    try:
        mask = load_mask(source, allow_empty=True)
    except DamInputError as error:
        raise RequestError(f"{param} (mask of frame {frame}): {error}", param, "invalid_mask") from None
    if mask.shape != size:
        raise RequestError(
            f"{param}: the mask of frame {frame} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image is "
            f"{size[1]}x{size[0]}; send a mask of the image's size",
            param,
            "mask_size_mismatch",
        )
    if not mask.any():
        raise RequestError(
            f"{param}: the mask of frame {frame} is empty (no pixel is foreground); mark the region with alpha >= 128 "
            "in a cut-out, or white (>= 128) in a mask image",
            param,
            "empty_mask",
        )
    return mask


def frames_from_images(
    images: list[tuple[Image.Image, str]], allowed_frames: tuple[int, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pair decoded image parts into (image, mask) frames by the mask rule (module docstring)."""
    frames: list[tuple[np.ndarray, np.ndarray]] = []
    index = 0
    while index < len(images):
        image, param = images[index]
        try:
            pixels, alpha = load_image_and_alpha(image)
        except DamInputError as error:
            raise RequestError(f"{param}: {error}", param, "invalid_image") from None
        size = pixels.shape[:2]
        if _carries_mask(alpha):
            frames.append((pixels, _frame_mask(alpha, size, len(frames), param)))
            index += 1
            continue
        if index + 1 >= len(images):
            raise RequestError(
                f"{param} (frame {len(frames)}) has no mask: send it as an RGBA PNG whose alpha channel is the mask "
                "(transparent outside the region), or follow it with a mask image part (white = region)",
                param,
                "no_mask",
            )
        mask_image, mask_param = images[index + 1]
        if mask_image.mode in ("RGB", "RGBA"):  # as an array, so that a colour photo is refused as a mask
            mask_image = np.asarray(mask_image)
        frames.append((pixels, _frame_mask(mask_image, size, len(frames), mask_param)))
        index += 2
    if len(frames) not in allowed_frames:
        counts = " or ".join(str(count) for count in allowed_frames)
        raise RequestError(
            f"the message holds {len(frames)} frames (from {len(images)} image parts); this model takes {counts}: "
            "one image, or a video of that many frames, each a cut-out or an image followed by its mask",
            "messages",
            "unsupported_frame_count",
        )
    return frames


# ---- the body ---------------------------------------------------------------------------


def _last_user_message(messages: Any) -> tuple[int, Any]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects", "messages", "invalid_body")
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(f"messages[{index}] must be an object with role and content", f"messages[{index}]", "invalid_body")
        if message["role"] == "user":
            return index, message.get("content")
    raise RequestError("messages has no user message; put the image(s) and the query in a user message", "messages", "invalid_body")


def parse_chat_request(
    body: Any, *, max_pixels: int, allowed_frames: tuple[int, ...], defaults: Sampling
) -> ChatRequest:
    """Validate a chat-completions body and decode its images; raises RequestError. `defaults`
    (the model's, :func:`model_sampling`) fill the generation settings the body leaves out."""
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}", None, "invalid_body")
    sampling = parse_sampling(body, defaults)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object such as {\"include_usage\": true}", "stream_options")
    index, content = _last_user_message(body.get("messages"))
    where = f"messages[{index}].content"
    if isinstance(content, str) or not isinstance(content, list):
        raise RequestError(
            f"{where} must be a list of parts holding the image(s) (type image_url with a data URL) and the query "
            "(type text)",
            where,
            "no_image",
        )
    texts: list[str] = []
    images: list[tuple[Image.Image, str]] = []
    for number, part in enumerate(content):
        param = f"{where}[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{param}.text must be a string", f"{param}.text")
            texts.append(text)
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            images.append((decode_data_url(url, f"{param}.image_url.url", max_pixels), f"{param}.image_url.url"))
        else:
            raise RequestError(f"{param} must be a part of type 'text' or 'image_url', got {kind!r}", param, "invalid_body")
    if not images:
        raise RequestError(f"{where} has no image part; add an image_url part with a data URL", where, "no_image")
    query = "\n".join(text.strip() for text in texts if text.strip()) or None
    return ChatRequest(
        frames=frames_from_images(images, allowed_frames),
        query=query,
        sampling=sampling,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        query_param=where,
    )
