"""dam.sam: boxes / points / scribbles -> masks with a tiny random segment-anything model."""

from __future__ import annotations

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
segment_anything = pytest.importorskip("segment_anything")
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer  # noqa: E402

from dam.errors import DamInputError  # noqa: E402
from dam.sam import SamPrompter  # noqa: E402

H, W = 40, 56  # not square, so SamPredictor's resize/pad and the (H, W) order are exercised


def tiny_sam(seed: int = 0, dim: int = 32) -> Sam:
    """A SAM with 64 px input, 16 px patches (4x4 embedding) and one layer everywhere."""
    torch.manual_seed(seed)
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=64, patch_size=16, embed_dim=dim, depth=1, num_heads=2, mlp_ratio=2.0, out_chans=dim
        ),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=8),
        mask_decoder=MaskDecoder(
            transformer_dim=dim,
            transformer=TwoWayTransformer(depth=1, embedding_dim=dim, num_heads=2, mlp_dim=64),
            num_multimask_outputs=3,
            iou_head_depth=1,
            iou_head_hidden_dim=16,
        ),
    ).eval()


@pytest.fixture(scope="module")
def model() -> Sam:
    return tiny_sam()


@pytest.fixture
def prompter(model) -> SamPrompter:
    return SamPrompter(model)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (H, W, 3), dtype=np.uint8)
    img[10:30, 15:40] = 250
    return img


@pytest.fixture
def calls(prompter, monkeypatch) -> dict[str, list]:
    """Record set_image calls and predict arguments/results of the prompter's SamPredictor."""
    rec: dict[str, list] = {"set_image": [], "predict": []}
    pred = prompter.predictor
    real_set, real_predict = pred.set_image, pred.predict

    def set_image(img, image_format="RGB"):
        rec["set_image"].append(img.shape)
        return real_set(img, image_format)

    def predict(**kwargs):
        out = real_predict(**kwargs)
        rec["predict"].append((kwargs, out))
        return out

    monkeypatch.setattr(pred, "set_image", set_image)
    monkeypatch.setattr(pred, "predict", predict)
    return rec


def check_mask(mask: np.ndarray) -> None:
    assert isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == (H, W)


def test_box(prompter, image, calls):
    mask = prompter.mask_from_box(image, [10, 5, 40, 30])
    check_mask(mask)
    kwargs, (masks, scores, _) = calls["predict"][-1]
    assert kwargs["multimask_output"] is False
    np.testing.assert_array_equal(kwargs["box"], [10, 5, 40, 30])
    assert np.array_equal(mask, masks[0])


def test_single_point_picks_best_of_three(prompter, image, calls):
    mask = prompter.mask_from_points(image, [[20, 15]])
    check_mask(mask)
    kwargs, (masks, scores, _) = calls["predict"][-1]
    assert kwargs["multimask_output"] is True and len(masks) == 3
    np.testing.assert_array_equal(kwargs["point_labels"], [1])
    assert np.array_equal(mask, masks[int(np.argmax(scores))])


def test_several_points_with_labels(prompter, image, calls):
    mask = prompter.mask_from_points(image, [[20, 15], [50, 35]], labels=[1, 0])
    check_mask(mask)
    kwargs, (masks, _, _) = calls["predict"][-1]
    assert kwargs["multimask_output"] is False
    np.testing.assert_array_equal(kwargs["point_coords"], [[20, 15], [50, 35]])
    np.testing.assert_array_equal(kwargs["point_labels"], [1, 0])
    assert np.array_equal(mask, masks[0])


def test_scribble_samples_points_on_the_stroke(prompter, image, calls):
    scribble = np.zeros((H, W), bool)
    scribble[20:22, 5:50] = True  # a thick horizontal stroke: 90 pixels
    mask = prompter.mask_from_scribble(image, scribble)
    check_mask(mask)
    first = calls["predict"][-1][0]["point_coords"]
    assert 2 <= len(first) <= 10
    assert all(scribble[int(y), int(x)] for x, y in first)
    assert first[:, 0].max() - first[:, 0].min() > 30  # spread along the stroke, not clustered
    prompter.mask_from_scribble(image, scribble)
    np.testing.assert_array_equal(calls["predict"][-1][0]["point_coords"], first)  # deterministic

    few = np.zeros((H, W), bool)
    few[3, 4] = few[30, 50] = True
    prompter.mask_from_scribble(image, few)
    np.testing.assert_array_equal(calls["predict"][-1][0]["point_coords"], [[4, 3], [50, 30]])
    with pytest.raises(DamInputError, match="empty"):
        prompter.mask_from_scribble(image, np.zeros((H, W), bool))


def test_embedding_is_cached(prompter, image, calls):
    prompter.mask_from_box(image, [10, 5, 40, 30])
    prompter.mask_from_points(image, [[20, 15]])
    prompter.mask_from_points(image.copy(), [[21, 16]])  # same bytes, another object
    assert len(calls["set_image"]) == 1
    other = image.copy()
    other[0, 0] ^= 1
    prompter.mask_from_points(other, [[20, 15]])
    assert len(calls["set_image"]) == 2
    prompter.mask_from_points(image, [[20, 15]])
    assert len(calls["set_image"]) == 3


def test_other_image_inputs(prompter, image, tmp_path):
    from PIL import Image

    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    m1 = prompter.mask_from_box(str(path), [10, 5, 40, 30])
    m2 = prompter.mask_from_box(Image.fromarray(image), [10, 5, 40, 30])
    m3 = prompter.mask_from_box(image, [10, 5, 40, 30])
    check_mask(m1)
    assert np.array_equal(m1, m3) and np.array_equal(m2, m3)


@pytest.mark.parametrize(
    "box, match",
    [
        ([40, 5, 10, 30], "x1 > x0"),
        ([10, 5, 10, 30], "x1 > x0"),
        ([10, 30, 40, 5], "y1 > y0"),
        ([-1, 5, 40, 30], "outside"),
        ([10, 5, 57, 30], "outside"),
        ([10, 5, 40, 41], "outside"),
        ([10, 5, 40], "shape"),
        ([[10, 5, 40, 30]], "shape"),
        ([10, 5, float("nan"), 30], "finite"),
    ],
)
def test_invalid_box(prompter, image, calls, box, match):
    with pytest.raises(DamInputError, match=match):
        prompter.mask_from_box(image, box)
    assert calls["set_image"] == []  # validated before the encoder runs


@pytest.mark.parametrize(
    "points, labels, match",
    [
        ([[56, 10]], None, "outside"),
        ([[10, -0.5]], None, "outside"),
        ([[10, 10], [10, 40]], None, "outside"),
        ([[1, 2, 3]], None, "shape"),
        ([], None, "shape"),
        ([[10, 10]], [1, 1], "one entry per point"),
        ([[10, 10]], [2], "foreground"),
        ([[10, 10]], [0], "foreground"),
        ("ab", None, "numbers"),
    ],
)
def test_invalid_points(prompter, image, calls, points, labels, match):
    with pytest.raises(DamInputError, match=match):
        prompter.mask_from_points(image, points, labels)
    assert calls["set_image"] == []


def test_scribble_size_mismatch(prompter, image):
    with pytest.raises(DamInputError):
        prompter.mask_from_scribble(image, np.ones((H + 1, W), bool))


def test_from_checkpoint_missing_file(tmp_path):
    path = tmp_path / "sam_missing.pth"
    with pytest.raises(DamInputError, match="sam_missing.pth") as err:
        SamPrompter.from_checkpoint(path)
    assert "sam_vit_h_4b8939.pth" in str(err.value)


def test_from_checkpoint_unknown_type(tmp_path):
    with pytest.raises(DamInputError, match="vit_b") as err:
        SamPrompter.from_checkpoint(tmp_path / "x.pth", model_type="vit_xl")
    assert "vit_xl" in str(err.value)


def tiny_builder(dim: int):
    def build(checkpoint=None):
        sam = tiny_sam(seed=123, dim=dim)
        if checkpoint is not None:
            sam.load_state_dict(torch.load(checkpoint, weights_only=True))
        return sam

    return build


def test_from_checkpoint_loads_weights(model, image, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny", tiny_builder(32))
    loaded = SamPrompter.from_checkpoint(ckpt, model_type="tiny")
    assert not loaded.predictor.model.training
    for (name, a), b in zip(model.state_dict().items(), loaded.predictor.model.state_dict().values()):
        assert torch.equal(a, b), name
    expected = SamPrompter(model).mask_from_points(image, [[20, 15]])
    assert np.array_equal(loaded.mask_from_points(image, [[20, 15]]), expected)


def test_from_checkpoint_wrong_model_type(model, tmp_path, monkeypatch):
    ckpt = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    monkeypatch.setitem(segment_anything.sam_model_registry, "tiny48", tiny_builder(48))
    with pytest.raises(DamInputError, match="does not fit model_type 'tiny48'"):
        SamPrompter.from_checkpoint(ckpt, model_type="tiny48")


def test_missing_segment_anything(model, monkeypatch):
    monkeypatch.setitem(sys.modules, "segment_anything", None)
    with pytest.raises(ImportError, match=r"describe-anything-toolkit\[sam\]"):
        SamPrompter(model)
    with pytest.raises(ImportError, match=r"describe-anything-toolkit\[sam\]"):
        SamPrompter.from_checkpoint("x.pth")
