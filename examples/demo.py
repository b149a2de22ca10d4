"""`make demo`: caption every region of the shipped example with the built-in model.

Prints each caption next to the true one and writes an overlay PNG per region to out/demo/.
"""

import logging
import sys
from pathlib import Path

from dam import DescribeAnything, load_image, load_mask
from dam.overlay import draw_overlay

HERE = Path(__file__).resolve().parent


def main(out: Path = HERE.parent / "out" / "demo") -> int:
    logging.basicConfig(level=logging.WARNING)
    model = DescribeAnything.from_pretrained()  # the built-in ShapesDLC model, on the CPU
    image = load_image(HERE / "shapes.png")
    out.mkdir(parents=True, exist_ok=True)
    for mask_path in sorted(HERE.glob("shapes_mask_*.png")):
        mask = load_mask(mask_path)
        caption = model.describe(image, mask)
        truth = mask_path.with_suffix(".txt").read_text().strip()
        overlay = out / f"{mask_path.stem}_overlay.png"
        draw_overlay(image, mask, caption).save(overlay)
        sys.stdout.write(f"{mask_path.name}: {caption}\n    true: {truth}\n    overlay: {overlay}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
