"""Identities of models and settings, so that results made by different models never mix.

`dam densecap` resumes a folder and reuses stored regions only when the stored results were made
with the same settings (dam.densecap.runner); `dam-bench densecap-run` and `dam-train fcln`'s
test-split evaluation resume their prediction checkpoints likewise. A model's identity is a fingerprint of its
weights and, for transformers models, of its config: a path would change when a folder is
moved and would not tell two checkpoints saved over one another apart. The weights are sampled
(the first and last values of every tensor, with names and shapes), which any training step
or another checkpoint changes, so that a 3B-parameter model is fingerprinted in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

SAMPLED_VALUES = 8
"""Values taken from each end of every tensor of a model's state dict."""

_RUN_SPECIFIC_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version"})
"""Config entries that say where and with which library version a model was saved, not how it behaves."""


def as_json_value(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, other objects their str), so that
    settings compare equal to the settings stored in an earlier run's results."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


@torch.no_grad()
def weights_fingerprint(module: torch.nn.Module) -> str:
    """A short hash of `module`'s state dict: names, shapes, dtypes and sampled values."""
    hasher = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if flat.numel():
            sample = torch.cat((flat[:SAMPLED_VALUES], flat[-SAMPLED_VALUES:])).to("cpu", torch.float64)
            hasher.update(sample.numpy().tobytes())
    return hasher.hexdigest()[:16]


def _without_run_specific_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_run_specific_keys(v) for k, v in value.items() if k not in _RUN_SPECIFIC_CONFIG_KEYS}
    return value


def model_identity(module: torch.nn.Module) -> dict[str, Any]:
    """{"class", "weights", "config"}: what tells one model from another (module docstring);
    "config" is None for models without a transformers config (e.g. segment-anything's Sam)."""
    config = getattr(module, "config", None)
    config_digest = None
    if config is not None and hasattr(config, "to_dict"):
        settings = _without_run_specific_keys(config.to_dict())
        config_digest = _digest(json.dumps(settings, sort_keys=True, default=str).encode())
    return {"class": type(module).__name__, "weights": weights_fingerprint(module), "config": config_digest}
