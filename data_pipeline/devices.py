"""The torch device of every model the pipeline loads (detector, SAM, instance model, SigLIP, labelers).

``device: null`` in a config means "the GPU this process should use": under torchrun or
accelerate each process of a node is told its node-local index in ``LOCAL_RANK``, under SLURM
(``srun`` with several tasks per node) in ``SLURM_LOCALID``, and process i takes GPU
``i % device_count`` (so more workers than GPUs share them evenly). Without either variable,
the current CUDA device; without CUDA, the CPU. An explicit ``cuda:N`` is used as given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from dam.errors import DamInputError

if TYPE_CHECKING:
    import torch

__all__ = ["LOCAL_INDEX_VARIABLES", "resolve_device"]

LOCAL_INDEX_VARIABLES = ("LOCAL_RANK", "SLURM_LOCALID")
"""Where launchers put a process's index on its node, first found wins (torchrun/accelerate, then SLURM)."""


def resolve_device(device: str | None, key: str = "device", environ: Mapping[str, str] | None = None) -> "torch.device":
    """Config value ``device`` (at config key ``key``) as a torch.device; None: see the module docstring."""
    import torch

    environ = os.environ if environ is None else environ
    if device is None:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        for name in LOCAL_INDEX_VARIABLES:
            if name in environ:
                try:
                    index = int(environ[name])
                except ValueError:
                    raise DamInputError(
                        f"environment variable {name}={environ[name]!r} is not an integer; fix it or set {key} (e.g. cuda:0)"
                    ) from None
                return torch.device("cuda", index % torch.cuda.device_count())
        return torch.device("cuda")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise DamInputError(f"{key} {device!r} is not a torch device; use cpu, cuda or cuda:N (or null)") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DamInputError(f"{key} {device!r} was asked for but torch sees no CUDA GPU; set {key}: cpu (or null)")
    return resolved
