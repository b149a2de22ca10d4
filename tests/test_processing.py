"""DamProcessor: focal tensors, prompt templates, chunked tokenisation, padding, labels."""

import numpy as np
import pytest
import torch
from PIL import Image

from dam.errors import DamInputError
from dam.processing import IGNORE_INDEX, DamProcessor
from dam.prompts import QUERY_PRESETS, render_conversation, with_image_slots
from tests.factories import box_mask, random_image, tiny_dam_config, tiny_tokenizer


@pytest.fixture
def processor():
    return DamProcessor(tiny_tokenizer(), tiny_dam_config(prompt_template="vicuna_v1"))


def test_vicuna_v1_prompt_text_is_exact():
    rendered = render_conversation("vicuna_v1", tiny_tokenizer(), "<image>\nDescribe the masked region in detail.")
    assert rendered.prompt == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nDescribe the "
        "masked region in detail. ASSISTANT:"
    )


def test_image_slots_are_added_or_checked():
    assert with_image_slots("Describe it.", 2) == "<image><image>\nDescribe it."
    assert QUERY_PRESETS["video_joint"].count("<image>") == 8
    assert with_image_slots(QUERY_PRESETS["video_joint"], 8) == QUERY_PRESETS["video_joint"]
    with pytest.raises(DamInputError, match="8 frames"):
        with_image_slots(QUERY_PRESETS["image"], 8)


def test_chunked_tokenisation_puts_bos_once_and_expands_slots(processor):
    ids = processor.encode(None, num_frames=3).input_ids
    bos = processor.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    placeholder = processor.image_token_id
    positions = [i for i, token in enumerate(ids) if token == placeholder]
    assert len(positions) == 3 * processor.num_image_tokens
    assert positions == list(range(positions[0], positions[0] + len(positions)))  # slots are adjacent


def test_training_labels_cover_answer_and_eos_only(processor):
    encoded = processor.encode("Describe it.", 1, answer="a red circle")
    answer = [label for label in encoded.labels if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(answer[:-1]) == "a red circle"
    assert answer[-1] == processor.tokenizer.eos_token_id
    prompt_len = len(processor.encode("Describe it.", 1).input_ids)
    assert encoded.input_ids[:prompt_len] == processor.encode("Describe it.", 1).input_ids
    assert encoded.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len


def test_padding_left_and_right(processor):
    ids, mask = processor.pad([[5, 6, 7], [8]], side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = processor.pad([[5, 6, 7], [8]], side="right")
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(DamInputError, match="padding side"):
        processor.pad([[1]], side="middle")


def test_pixel_values_layout_range_and_resize(processor):
    image = random_image(60, 90, seed=4)
    masks = [box_mask(60, 90, 0, 0, 90, 60), box_mask(60, 90, 40, 20, 50, 28)]
    prompts = processor.focal_prompts([(image, m) for m in masks])
    pixels = processor.pixel_values(prompts)
    size = processor.image_size
    assert pixels.shape == (2, 8, size, size) and pixels.dtype == torch.float32
    assert pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels[0, 3], torch.ones(size, size))  # whole-image mask -> +1
    assert torch.equal(pixels[0, 0:3], pixels[1, 0:3])  # same full image, resized once
    assert set(pixels[1, 3].unique().tolist()) <= {-1.0} | set(pixels[1, 3].unique().tolist())
    # the crop view is the focal crop resized bicubically: compare with PIL within 2 grey levels
    x0, y0, x1, y1 = prompts[1].box
    reference = np.asarray(Image.fromarray(image[y0:y1, x0:x1]).resize((size, size), Image.BICUBIC), dtype=np.float32)
    ours = (pixels[1, 4:7].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(ours - reference).max() <= 2.0 + 1e-4


def test_call_builds_a_consistent_batch(processor):
    image = random_image(50, 50, seed=8)
    frames = [(image, box_mask(50, 50, 5, 5, 25, 25))]
    batch = processor([frames, frames * 2], ["first", "second one"])
    assert batch["pixel_values"].shape[0] == 3
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * processor.num_image_tokens
    assert batch["attention_mask"][:, -1].tolist() == [1, 1]  # left padding for generation
    assert batch["crop_is_full_image"].tolist() == [False, False, False]
    with pytest.raises(DamInputError, match="queries"):
        processor([frames], ["a", "b"])


def test_pil_backend_equals_the_siglip_processors_pil_resize():
    processor = DamProcessor(tiny_tokenizer(), tiny_dam_config(prompt_template="vicuna_v1", resize_backend="pil"))
    size = processor.image_size
    image = random_image(37, 53, seed=6)  # odd sizes, upsampled: where torch's float bicubic differs most
    ys, xs = np.mgrid[:37, :53]
    mask = ((xs - 30) / 9.0) ** 2 + ((ys - 15) / 6.0) ** 2 <= 1
    prompt = processor.focal_prompts([(image, mask)])[0]
    pixels = processor.pixel_values([prompt])

    def siglip(array):  # PIL bicubic of the 8-bit RGB image, then (x / 255 - 0.5) / 0.5
        resized = np.asarray(Image.fromarray(array).convert("RGB").resize((size, size), Image.BICUBIC))
        scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        return torch.from_numpy((scaled - np.float32(0.5)) / np.float32(0.5)).permute(2, 0, 1)

    x0, y0, x1, y1 = prompt.box
    assert torch.equal(pixels[0, 0:3], siglip(image))
    assert torch.equal(pixels[0, 3:4], siglip(mask.astype(np.uint8) * 255)[:1])  # the mask as RGB, first channel
    assert torch.equal(pixels[0, 4:7], siglip(np.ascontiguousarray(image[y0:y1, x0:x1])))
    assert torch.equal(pixels[0, 7:8], siglip(np.ascontiguousarray(mask[y0:y1, x0:x1]).astype(np.uint8) * 255)[:1])
    levels = torch.arange(256, dtype=torch.float32)
    reference = ((levels.double() * (1 / 255)).float() - 0.5) / 0.5
    assert torch.equal(levels / 127.5 - 1.0, reference)  # both scalings agree on every 8-bit level


def test_default_video_query_is_used_for_several_frames():
    config = tiny_dam_config(
        prompt_template="vicuna_v1", default_query=QUERY_PRESETS["image_joint"], default_video_query=QUERY_PRESETS["video_joint"]
    )
    processor = DamProcessor(tiny_tokenizer(), config)
    slots = processor.num_image_tokens
    one, eight, three = (processor.encode(None, frames).input_ids for frames in (1, 8, 3))
    assert one.count(processor.image_token_id) == slots and eight.count(processor.image_token_id) == 8 * slots
    assert three.count(processor.image_token_id) == 3 * slots  # the run of slots follows the frame count
    assert processor.tokenizer.decode([t for t in eight if t != processor.image_token_id]).endswith(
        "in the masked region in the video in detail . assistant :"
    )
