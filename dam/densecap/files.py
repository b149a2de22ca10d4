"""Where `dam densecap` reads and writes: the images of an input folder and the result paths.

Input: one image file, or every image under a folder, recursively, in sorted order; hidden
files and folders (name starting with ".") are skipped, and so are a run's own outputs (else a
rerun would caption the drawn pictures): an output folder below the input folder is not
entered, and when the output folder is the input folder itself (or holds it), the drawn
pictures (*.drawn.jpg, the only images a run writes) under it are skipped. Output mirrors the
input's relative path with a suffix appended, so "a.jpg" and "a.png" side by side do not
collide: OUTPUT/sub/a.jpg.json (the regions) and OUTPUT/sub/a.jpg.drawn.jpg (the picture).
Every file is written to a temporary name in its folder and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dam.errors import DamInputError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
RESULT_SUFFIX = ".json"
DRAWN_SUFFIX = ".drawn.jpg"


@dataclass(frozen=True)
class InputImage:
    """An image to process: its file and its path relative to the input (the name in results)."""

    path: Path
    name: str

    def result_path(self, output: Path) -> Path:
        return output / (self.name + RESULT_SUFFIX)

    def drawn_path(self, output: Path) -> Path:
        return output / (self.name + DRAWN_SUFFIX)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _inside(folder: Path, root: Path | None) -> bool:
    """Whether resolved `folder` is `root` or lies below it."""
    return root is not None and (folder == root or root in folder.parents)


def _is_input(path: Path, relative: Path, in_output: bool) -> bool:
    """Whether `path` is an image to caption: not hidden, and not a picture a run drew there."""
    if path.suffix.lower() not in IMAGE_SUFFIXES or _is_hidden(relative):
        return False
    return not (in_output and path.name.endswith(DRAWN_SUFFIX))


def find_images(source: str | os.PathLike, output: str | os.PathLike | None = None) -> list[InputImage]:
    """The images of `source` (a file or a folder, see the module docstring), sorted by name."""
    root = Path(source)
    if root.is_file():
        if root.suffix.lower() not in IMAGE_SUFFIXES:
            raise DamInputError(
                f"--input {str(source)!r} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                "pass an image or a folder of images"
            )
        return [InputImage(root, root.name)]
    if not root.is_dir():
        raise DamInputError(f"--input {str(source)!r} does not exist; pass an image file or a folder of images")
    skip = Path(output).resolve() if output is not None else None
    found = []
    for directory, folders, files in os.walk(root):
        here = Path(directory)
        # Prune hidden folders and the output folder in place so os.walk never enters them.
        folders[:] = sorted(
            f for f in folders if not f.startswith(".") and (skip is None or (here / f).resolve() != skip)
        )
        in_output = _inside(here.resolve(), skip)
        for name in sorted(files):
            path = here / name
            relative = path.relative_to(root)
            if _is_input(path, relative, in_output):
                found.append(InputImage(path, relative.as_posix()))
    return sorted(found, key=lambda image: image.name)


def _temporary_beside(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image_atomic(path: str | os.PathLike, image: Image.Image, quality: int = 90) -> None:
    """Save `image` to `path` (format from the suffix; JPEG at `quality`) atomically."""
    path = Path(path)
    fd, tmp = _temporary_beside(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
            image.save(handle, format=fmt, **({"quality": quality} if fmt == "JPEG" else {}))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
