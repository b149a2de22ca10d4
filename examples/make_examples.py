"""Regenerate the shipped example: one ShapesDLC scene and a mask PNG per object.

    .venv/bin/python examples/make_examples.py

The scene comes from a seed no training set uses, so `make demo` shows the built-in model on
an image it has never seen.
"""

from pathlib import Path

from PIL import Image

from dam.shapes import scene

HERE = Path(__file__).resolve().parent
SEED, INDEX = 2026, 3


def main() -> None:
    rendered = scene(SEED, INDEX)
    Image.fromarray(rendered.image).save(HERE / "shapes.png")
    for number, (mask, obj) in enumerate(zip(rendered.masks, rendered.objects)):
        Image.fromarray(mask.astype("uint8") * 255).save(HERE / f"shapes_mask_{number}.png")
        (HERE / f"shapes_mask_{number}.txt").write_text(obj.caption + "\n")


if __name__ == "__main__":
    main()
