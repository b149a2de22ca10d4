"""DescribeAnything: batching equals sequential greedy calls, video, streaming, bad inputs."""

import numpy as np
import pytest
import torch
from PIL import Image

from dam import DescribeAnything
from dam.errors import DamInputError
from tests.factories import box_mask, random_image, tiny_dam, tiny_tokenizer

GREEDY = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def describer():
    return DescribeAnything(tiny_dam(seed=3), tiny_tokenizer())


def regions_of_different_sizes():
    images = [random_image(64, 80, seed=10), random_image(120, 90, seed=11)]
    boxes = [(0, 0, 3, 3), (10, 10, 50, 40), (60, 5, 80, 60), (2, 30, 70, 64),
             (5, 5, 85, 115), (40, 60, 45, 66), (0, 50, 80, 64), (30, 0, 31, 120)]
    regions = []
    for index, box in enumerate(boxes):
        image = images[index % 2]
        regions.append((image, box_mask(image.shape[0], image.shape[1], *box)))
    return regions


def test_describe_batch_equals_sequential_greedy(describer):
    regions = regions_of_different_sizes()
    queries = [None] * 6 + ["describe the red object .", "the object in one sentence ."]
    items = [(image, mask, query) for (image, mask), query in zip(regions, queries)]
    sequential = [describer.describe(image, mask, query=query, **GREEDY) for image, mask, query in items]
    batched = describer.describe_batch(items, batch_size=8, **GREEDY)
    in_threes = describer.describe_batch(items, batch_size=3, **GREEDY)
    assert batched == sequential == in_threes
    assert len(set(sequential)) > 1, "regions should not all get the same text"
    assert all(text for text in sequential)


def test_video_path_uses_eight_frames(describer, monkeypatch):
    frames = [random_image(48, 64, seed=20 + t) for t in range(12)]
    masks = [box_mask(48, 64, 4 + 2 * t, 8, 20 + 2 * t, 30) if t % 3 else None for t in range(12)]
    seen = {}
    original = describer.model.generate

    def spy(**kwargs):
        seen["frames"] = kwargs["pixel_values"].shape[0]
        seen["slots"] = int((kwargs["input_ids"] == describer.model.config.image_token_id).sum())
        return original(**kwargs)

    monkeypatch.setattr(describer.model, "generate", spy)
    text = describer.describe_video(frames, masks, **GREEDY)
    assert isinstance(text, str) and text
    assert seen["frames"] == 8
    assert seen["slots"] == 8 * describer.model.config.num_image_tokens
    with pytest.raises(DamInputError, match="12"):
        describer.describe_video(frames, masks[:5], **GREEDY)


def test_stream_yields_the_same_text(describer):
    image, mask = regions_of_different_sizes()[1]
    pieces = list(describer.stream(image, mask, **GREEDY))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == describer.describe(image, mask, **GREEDY)


def test_accepts_rgba_grayscale_16bit_and_alpha_mask(describer, tmp_path):
    rgb = random_image(40, 50, seed=5)
    mask = box_mask(40, 50, 10, 10, 30, 30)
    rgba = Image.fromarray(np.dstack([rgb, mask.astype(np.uint8) * 255]), "RGBA")
    gray = Image.fromarray(rgb[..., 0], "L")
    deep = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
    assert deep.mode.startswith("I")
    assert describer.describe(rgba, mask, **GREEDY) == describer.describe(rgb, mask, **GREEDY)
    assert describer.describe(rgba, **GREEDY) == describer.describe(rgb, mask, **GREEDY)  # alpha = mask
    assert describer.describe(gray, mask, **GREEDY) == describer.describe(deep, mask, **GREEDY)
    path = tmp_path / "region.png"
    rgba.save(path)
    assert describer.describe(str(path), **GREEDY) == describer.describe(rgb, mask, **GREEDY)


def test_bad_inputs_raise_clear_errors(describer, tmp_path):
    image = random_image(40, 50, seed=6)
    with pytest.raises(DamInputError, match="no pixels"):
        describer.describe(image, np.zeros((40, 50), dtype=bool))
    with pytest.raises(DamInputError, match="40x50"):
        describer.describe(image, np.ones((30, 50), dtype=bool))
    with pytest.raises(DamInputError, match="missing.png"):
        describer.describe(tmp_path / "missing.png", np.ones((40, 50), dtype=bool))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    with pytest.raises(DamInputError, match="garbage.jpg"):
        describer.describe(str(garbage), np.ones((40, 50), dtype=bool))
    with pytest.raises(DamInputError, match="no region"):
        describer.describe(image)
    with pytest.raises(DamInputError, match="segment-anything"):
        describer.describe(image, box=[1, 1, 10, 10])
    with pytest.raises(DamInputError, match="one of mask, box or points"):
        describer.describe(image, np.ones((40, 50), dtype=bool), box=[1, 1, 10, 10])
    with pytest.raises(DamInputError, match="image slots|<image>"):
        describer.describe(image, np.ones((40, 50), dtype=bool), query="<image> <image> two slots")


def test_box_and_points_go_through_sam(describer):
    class FakeSam:
        def mask_from_box(self, image, box):
            x0, y0, x1, y1 = box
            return box_mask(image.shape[0], image.shape[1], x0, y0, x1, y1)

        def mask_from_points(self, image, points, labels=None):
            x, y = points[0]
            return box_mask(image.shape[0], image.shape[1], x - 3, y - 3, x + 3, y + 3)

    image = random_image(40, 50, seed=7)
    with_sam = DescribeAnything(describer.model, describer.tokenizer, sam=FakeSam())
    assert with_sam.describe(image, box=[5, 5, 25, 30], **GREEDY) == with_sam.describe(
        image, box_mask(40, 50, 5, 5, 25, 30), **GREEDY
    )
    assert with_sam.describe(image, points=[[20, 20]], **GREEDY) == with_sam.describe(
        image, box_mask(40, 50, 17, 17, 23, 23), **GREEDY
    )


def test_save_and_from_pretrained_round_trip(describer, tmp_path):
    image, mask = regions_of_different_sizes()[2]
    describer.save_pretrained(tmp_path / "dam")
    loaded = DescribeAnything.from_pretrained(tmp_path / "dam", dtype="float32")
    assert loaded.describe(image, mask, **GREEDY) == describer.describe(image, mask, **GREEDY)


def test_from_pretrained_without_a_model_explains(tmp_path, monkeypatch):
    import dam.describe

    monkeypatch.setattr(dam.describe, "BUILTIN_MODEL", tmp_path / "not-installed")
    with pytest.raises(DamInputError, match="needs a model"):
        DescribeAnything.from_pretrained()
    with pytest.raises(DamInputError, match="config.json"):
        DescribeAnything.from_pretrained(tmp_path)
    with pytest.raises(DamInputError, match="does not exist"):
        DescribeAnything.from_pretrained(tmp_path / "absent")
    with pytest.raises(DamInputError, match="dtype"):
        DescribeAnything.from_pretrained(tmp_path / "x", dtype="float13")


def test_bfloat16_model_runs(describer):
    image, mask = regions_of_different_sizes()[1]
    model = tiny_dam(seed=3).to(torch.bfloat16)
    text = DescribeAnything(model, tiny_tokenizer()).describe(image, mask, **GREEDY)
    assert isinstance(text, str)
