"""Rank variables for a single process run without a launcher (torchrun, deepspeed, accelerate).

DeepSpeed initialises torch.distributed even on one device and reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a launcher sets them, a plain `python` call does not.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def set_single_process_env() -> None:
    """Fill in the rank variables of a one-process world unless a launcher already set them."""
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
