"""JSON files the toolkit reads from users and writes for long jobs, in one place.

Reads turn a missing or malformed file into a DamInputError naming it; writes go to a
temporary file beside the target and are renamed over it, so an interrupted job never
leaves a half-written file for the next run to trip on.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dam.errors import DamInputError


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of the JSON file at `path`; `what` names it in errors ("mask", ...)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise DamInputError(f"{what} file {os.fspath(path)!r} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamInputError(f"{what} file {os.fspath(path)!r} could not be read as JSON ({error})") from None


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(obj, handle, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
