"""The `dam` command (in-process through `main`) and the overlay it draws."""

import json

import numpy as np
import pytest
from PIL import Image, ImageFont

from dam import DescribeAnything
from dam.cli import build_parser, main
from dam.focal import focal_crop_box
from dam.masks import mask_to_rle
from dam.overlay import OUTLINE_WIDTH, draw_overlay
from tests.factories import box_mask, random_image, tiny_dam, tiny_tokenizer

H, W = 48, 64
BOX = (10, 8, 40, 30)  # x0, y0, x1, y1 of the mask
RED = (255, 64, 64)
GREEDY = dict(max_new_tokens=8, do_sample=False)
FAST = ["--device", "cpu", "--max-new-tokens", "8"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = root / "model"
    DescribeAnything(tiny_dam(seed=3), tiny_tokenizer()).save_pretrained(model_dir)
    image = random_image(H, W, seed=5)
    mask = box_mask(H, W, *BOX)
    Image.fromarray(image).save(root / "image.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(root / "mask.png")
    other = box_mask(H, W, 30, 20, 60, 44)
    (root / "rle.json").write_text(json.dumps(mask_to_rle(other)))
    return {
        "root": root, "model": str(model_dir), "image": str(root / "image.png"),
        "mask": str(root / "mask.png"), "rle": str(root / "rle.json"),
        "image_array": image, "mask_array": mask, "other_mask": other,
    }


@pytest.fixture(scope="module")
def reference(files):
    return DescribeAnything.from_pretrained(files["model"])


def run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def describe_argv(files, *extra):
    return ["describe", "--model", files["model"], "--image", files["image"], *FAST, *extra]


def test_plain_caption_equals_python_api(files, reference, capsys):
    code, out, err = run(capsys, describe_argv(files, "--mask", files["mask"]))
    assert code == 0, err
    expected = reference.describe(files["image"], files["mask"], **GREEDY)
    assert expected
    assert out == expected + "\n"


def test_prompt_is_passed_as_query(files, reference, capsys):
    query = "describe the red object ."
    code, out, err = run(capsys, describe_argv(files, "--mask", files["mask"], "--prompt", query))
    assert code == 0, err
    assert out.strip() == reference.describe(files["image"], files["mask"], query=query, **GREEDY)


def test_json_output(files, reference, capsys):
    code, out, err = run(capsys, describe_argv(files, "--mask", files["mask"], "--json"))
    assert code == 0, err
    record = json.loads(out)
    assert record["caption"] == reference.describe(files["image"], files["mask"], **GREEDY)
    assert record["image"] == files["image"]
    assert record["model"] == files["model"]
    x0, y0, x1, y1 = BOX
    assert record["mask_area"] == (x1 - x0) * (y1 - y0)
    config = reference.model.config
    assert record["box"] == list(focal_crop_box(files["mask_array"], config.focal_alpha, config.focal_min_size))
    assert "overlay" not in record


def test_rle_json_mask(files, reference, capsys):
    code, out, err = run(capsys, describe_argv(files, "--mask", files["rle"], "--json"))
    assert code == 0, err
    record = json.loads(out)
    assert record["mask_area"] == int(files["other_mask"].sum())
    assert record["caption"] == reference.describe(files["image"], files["other_mask"], **GREEDY)


def test_coco_annotation_and_polygon_masks(files, capsys, tmp_path):
    x0, y0, x1, y1 = BOX
    polygon = [[x0, y0, x1, y0, x1, y1, x0, y1]]
    (tmp_path / "ann.json").write_text(json.dumps({"segmentation": polygon, "category_id": 1}))
    (tmp_path / "poly.json").write_text(json.dumps(polygon))
    areas = []
    for name in ("ann.json", "poly.json"):
        code, out, err = run(capsys, describe_argv(files, "--mask", str(tmp_path / name), "--json"))
        assert code == 0, err
        areas.append(json.loads(out)["mask_area"])
    assert areas[0] == areas[1] > 0


def test_out_writes_overlay(files, capsys, tmp_path):
    out_path = tmp_path / "overlay.png"
    code, out, err = run(capsys, describe_argv(files, "--mask", files["mask"], "--out", str(out_path), "--json"))
    assert code == 0, err
    assert json.loads(out)["overlay"] == str(out_path)
    with Image.open(out_path) as written:
        assert written.format == "PNG"
        overlay = np.array(written.convert("RGB"))
    assert overlay.shape[1] == W
    assert overlay.shape[0] > H  # the caption band
    is_red = (overlay[:H] == RED).all(axis=2)
    assert is_red.sum() > 50
    assert not is_red[~files["mask_array"]].any()
    band = overlay[H:]
    assert (band < 64).all(axis=2).any(), "caption text should be drawn in black"


def test_box_without_sam_checkpoint(files, capsys):
    code, out, err = run(capsys, describe_argv(files, "--box", "10", "8", "40", "30"))
    assert code == 2
    assert out == ""
    assert err.startswith("dam: error: ")
    assert "segment-anything" in err and "--sam-checkpoint" in err
    assert "Traceback" not in err


def test_missing_sam_checkpoint_file(files, capsys, tmp_path):
    pytest.importorskip("segment_anything")
    missing = str(tmp_path / "sam_vit_b.pth")
    code, _, err = run(capsys, describe_argv(files, "--points", "20,15", "--sam-checkpoint", missing,
                                             "--sam-model-type", "vit_b"))
    assert code == 2
    assert err.startswith("dam: error: ") and missing in err  # checked before the model loads


def test_missing_image_file(files, capsys, tmp_path):
    missing = str(tmp_path / "nope.png")
    code, out, err = run(capsys, ["describe", "--model", files["model"], "--image", missing, "--mask", files["mask"]])
    assert code == 2
    assert out == ""
    assert err.startswith("dam: error: ") and missing in err
    assert "Traceback" not in err


def test_user_errors_exit_2(files, capsys, tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    small = tmp_path / "small.png"
    Image.fromarray(np.full((10, 10), 255, np.uint8)).save(small)
    cases = {
        "bad.json": describe_argv(files, "--mask", str(bad_json)),
        "10x10": describe_argv(files, "--mask", str(small)),
        "no region": describe_argv(files),
        "--point-labels needs --points": describe_argv(files, "--mask", files["mask"], "--point-labels", "1"),
    }
    for expected, argv in cases.items():
        code, out, err = run(capsys, argv)
        assert code == 2, (expected, err)
        assert out == ""
        assert err.startswith("dam: error: ") and expected in err, err


def test_bad_options_exit_2_from_argparse(files, capsys):
    for argv in (
        ["describe", "--image", files["image"], "--video", "x.mp4"],
        describe_argv(files, "--points", "12"),
        describe_argv(files, "--mask", files["mask"], "--temperature", "-1"),
        [],
    ):
        code, out, _ = run(capsys, argv)
        assert code == 2 and out == ""


def test_parser_has_describe_and_help_exits_0(capsys):
    parser = build_parser()
    args = parser.parse_args(["describe", "--image", "a.png", "--points", "1,2", "3.5,4"])
    assert args.points == [(1.0, 2.0), (3.5, 4.0)]
    assert args.temperature is None and args.top_p is None and args.model is None
    code, out, _ = run(capsys, ["describe", "--help"])
    assert code == 0 and "--sam-checkpoint" in out


def test_sampling_options_reach_generate(files, reference, capsys, monkeypatch):
    seen = []
    original = DescribeAnything.describe

    def spy(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DescribeAnything, "describe", spy)
    code, _, err = run(capsys, describe_argv(files, "--mask", files["mask"], "--temperature", "0.7", "--top-p", "0.9"))
    assert code == 0, err
    code, _, err = run(capsys, describe_argv(files, "--mask", files["mask"]))
    assert code == 0, err
    assert seen[0]["do_sample"] is True and seen[0]["temperature"] == 0.7 and seen[0]["top_p"] == 0.9
    assert not {"do_sample", "temperature", "top_p"} & set(seen[1])  # the model's generation config decides
    assert seen[0]["max_new_tokens"] == seen[1]["max_new_tokens"] == 8


# --- video -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_files(files):
    av = pytest.importorskip("av")
    root = files["root"]
    path = root / "clip.mp4"
    frames = [random_image(H, W, seed=40 + t) for t in range(10)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    masks = [None if t == 0 else box_mask(H, W, 4 + 3 * t, 6, 24 + 3 * t, 30) for t in range(10)]
    rles = [None if m is None else mask_to_rle(m) for m in masks]
    (root / "masklet.json").write_text(json.dumps(rles))
    folder = root / "masklet_pngs"
    folder.mkdir()
    for t, m in enumerate(masks):
        pixels = np.zeros((H, W), np.uint8) if m is None else m.astype(np.uint8) * 255
        # unpadded numbers (frame_5 before frame_10) need natural sorting, not sorting by string
        Image.fromarray(pixels).save(folder / f"frame_{5 * t}.png")
    return {"video": str(path), "json": str(root / "masklet.json"), "folder": str(folder), "masks": masks}


def video_argv(files, video_files, mask, *extra):
    return ["describe", "--model", files["model"], "--video", video_files["video"], "--mask", mask, *FAST, *extra]


def test_video_caption(files, video_files, reference, capsys):
    code, out, err = run(capsys, video_argv(files, video_files, video_files["json"]))
    assert code == 0, err
    expected = reference.describe_video(video_files["video"], video_files["masks"], **GREEDY)
    assert expected
    assert out == expected + "\n"


def test_video_mask_folder_and_json(files, video_files, reference, capsys):
    code, out, err = run(capsys, video_argv(files, video_files, video_files["folder"], "--json"))
    assert code == 0, err
    record = json.loads(out)
    assert record["caption"] == reference.describe_video(video_files["video"], video_files["masks"], **GREEDY)
    assert record["video"] == video_files["video"] and "image" not in record
    frames = reference.model.config.num_video_frames
    assert len(record["mask_area"]) == len(record["box"]) == frames
    assert all(area == 20 * 24 for area in record["mask_area"])
    config = reference.model.config
    # frame 0 is absent, so the first sampled frame is frame 1
    assert record["box"][0] == list(focal_crop_box(video_files["masks"][1], config.focal_alpha, config.focal_min_size))


def test_video_user_errors(files, video_files, capsys):
    for argv, expected in (
        (video_argv(files, video_files, video_files["json"], "--out", "o.png"), "overlays are for images"),
        (video_argv(files, video_files, files["mask"]), ".json"),
        (["describe", "--model", files["model"], "--video", video_files["video"], "--box", "1", "2", "3", "4"], "--mask"),
    ):
        code, out, err = run(capsys, argv)
        assert code == 2 and out == ""
        assert err.startswith("dam: error: ") and expected in err, err


# --- overlay ---------------------------------------------------------------------------------


def test_draw_overlay_outline_tint_and_caption_band():
    image = np.full((H, W, 3), 100, np.uint8)
    mask = box_mask(H, W, *BOX)
    # an L-shape: its inner corner checks the outline follows the mask, not its bounding box
    mask[8:18, 25:40] = False
    caption = "a small red square on a wooden table with a striped cat sitting on the left"
    overlay = np.array(draw_overlay(image, mask, caption, color=RED))

    assert overlay.shape[1] == W and overlay.shape[0] > H
    top = overlay[:H]
    is_outline = (top == RED).all(axis=2)
    # expected outline: mask pixels within OUTLINE_WIDTH (chessboard distance) of a background pixel
    ys, xs = np.nonzero(mask)
    by, bx = np.nonzero(~mask)
    expected = np.zeros_like(mask)
    for y, x in zip(ys, xs):
        near = (np.abs(by - y) <= OUTLINE_WIDTH) & (np.abs(bx - x) <= OUTLINE_WIDTH)
        on_edge = min(y, x, H - 1 - y, W - 1 - x) < OUTLINE_WIDTH
        expected[y, x] = near.any() or on_edge
    np.testing.assert_array_equal(is_outline, expected)

    interior = mask & ~expected
    assert interior.any()
    tint = np.rint(0.65 * 100 + 0.35 * np.array(RED)).astype(np.uint8)
    assert (top[interior] == tint).all()
    assert (top[~mask] == 100).all()

    band = overlay[H:]
    assert (band[0] == 255).all(), "the band starts white"
    dark_rows = np.flatnonzero((band < 128).all(axis=2).any(axis=1))
    assert dark_rows.size
    font = ImageFont.load_default()
    if font.getlength(caption) > W:  # the caption had to wrap: text on more than one line
        line_height = font.getbbox("Ag|")[3]
        assert dark_rows[-1] - dark_rows[0] > line_height


def test_draw_overlay_wraps_to_image_width_and_checks_mask_size():
    image = np.full((40, 30, 3), 200, np.uint8)
    mask = box_mask(40, 30, 0, 0, 30, 40)  # the whole image: outline along the border
    short = np.array(draw_overlay(image, mask, "cat"))
    long = np.array(draw_overlay(image, mask, "supercalifragilistic " * 4))
    assert short.shape[1] == long.shape[1] == 30
    assert long.shape[0] > short.shape[0] > 40
    assert ((short[:40] == RED).all(axis=2) == ~box_mask(40, 30, 2, 2, 28, 38)).all()
    with pytest.raises(ValueError, match="mask"):
        draw_overlay(image, np.ones((10, 10), bool), "x")


def test_describe_defaults_to_the_builtin_model(capsys):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "examples"
    code, out, err = run(capsys, ["describe", "--image", str(examples / "shapes.png"), "--mask", str(examples / "shapes_mask_1.png")])
    assert code == 0, err
    from dam.shapes import parse_caption

    said, truth = parse_caption(out), parse_caption((examples / "shapes_mask_1.txt").read_text())
    assert None not in said.values(), out
    assert {k: said[k] for k in ("size", "color", "pattern", "shape")} == {
        k: truth[k] for k in ("size", "color", "pattern", "shape")
    }
