"""Tiny training runs for CPU tests: the smoke assets of train.smoke plus a config's overrides."""

from __future__ import annotations

from pathlib import Path

from train.smoke import save_tiny_checkpoint, write_squares_dataset

__all__ = ["save_tiny_checkpoint", "write_squares_dataset", "tiny_train_overrides"]


def tiny_train_overrides(checkpoint: Path, data: Path, output: Path, **extra: object) -> list[str]:
    """Overrides turning configs/train/tiny_cpu.yaml into a run on the given checkpoint and data."""
    values = {
        "model.checkpoint": str(checkpoint),
        "data.datasets": f"[{{path: {data}}}]",
        "training.output_dir": str(output),
    }
    values.update({key: str(value) for key, value in extra.items()})
    return [f"{key}={value}" for key, value in values.items()]
