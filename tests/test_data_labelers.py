"""Stage-1 labelers: cleaning, prompt variants, views, and the openai / transformers / dam labelers.

The openai labeler runs against tests/fake_labeler.py (a deterministic OpenAI-compatible server
on loopback that can fail, hang, refuse or answer empty on chosen requests); the local ones
against tiny random models saved to tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dam.configio import ConfigError
from dam.errors import DamInputError
from dam.focal import focal_crop_box
from data_pipeline.cleaning import CleaningConfig, clean_caption
from data_pipeline.labelers import LabelRequest, LabelResult, Labeler, build_labeler, labeler_config
from data_pipeline.prompts import PROMPT_VARIANTS, build_prompt, check_templates, object_phrase, variant_order
from data_pipeline.views import ViewConfig, describe_views, highlight, render_views, to_data_url
from tests.factories import box_mask, random_image
from tests.fake_labeler import FakeLabelerServer, fake_caption, request_parts

FAST = {"backoff_s": 0.01, "max_backoff_s": 0.05}


def region(index: int, category: str | None, *, size: tuple[int, int] = (48, 64)) -> LabelRequest:
    height, width = size
    image = random_image(height, width, seed=100 + index)
    mask = box_mask(height, width, 4 + index % 5, 6, 30 + index % 7, 40)
    return LabelRequest(f"r{index}", image, mask, category, seed=index)


def openai_labeler(server: FakeLabelerServer, **overrides):
    return build_labeler({"type": "openai", "base_url": server.base_url, **FAST, **overrides})


# ---- cleaning --------------------------------------------------------------------------------

CLEAN = [
    # (raw answer, category, expected caption)
    ("A brown dog with floppy ears sitting on the grass.", None, "A brown dog with floppy ears sitting on the grass."),
    ("  a brown   dog with\nfloppy ears sitting on grass  ", None, "A brown dog with floppy ears sitting on grass."),
    ('"A tall ceramic vase with blue floral patterns."', None, "A tall ceramic vase with blue floral patterns."),
    ("“A tall ceramic vase with blue floral patterns”.", None, "A tall ceramic vase with blue floral patterns."),
    ("'A tall ceramic vase with blue floral patterns.'", None, "A tall ceramic vase with blue floral patterns."),
    ("```\nA tall ceramic vase with blue floral patterns.\n```", None, "A tall ceramic vase with blue floral patterns."),
    ("**Description:** A tall ceramic vase with *blue* floral patterns.", None, "A tall ceramic vase with blue floral patterns."),
    ("### Appearance\nA tall ceramic vase with blue floral patterns.", None, "A tall ceramic vase with blue floral patterns."),
    ("A tall ceramic vase.\n- Color: white and blue\n- Material: glazed ceramic", None,
     "A tall ceramic vase. Color: white and blue. Material: glazed ceramic."),
    ("Sure! Here is a detailed description of the highlighted object: A tall ceramic vase with blue flowers.", None,
     "A tall ceramic vase with blue flowers."),
    ("Here is a brown dog with floppy ears lying on a red rug.", None, "Here is a brown dog with floppy ears lying on a red rug."),
    ("Here's a detailed description of the object. A tall ceramic vase with blue flowers.", None,
     "A tall ceramic vase with blue flowers."),
    ("Certainly. A tall ceramic vase with blue flowers painted on it.", None, "A tall ceramic vase with blue flowers painted on it."),
    ("<think>The user wants the vase.</think>A tall ceramic vase with blue flowers.", None, "A tall ceramic vase with blue flowers."),
    ("The highlighted region shows a brown dog with floppy ears sitting on the grass.", None,
     "A brown dog with floppy ears sitting on the grass."),
    ("The masked region is a red car with tinted windows and chrome wheels.", None, "A red car with tinted windows and chrome wheels."),
    ("The highlighted object appears to be a wooden chair with a woven seat.", None, "A wooden chair with a woven seat."),
    ("In the highlighted area, there is a small wooden chair with a woven seat.", None, "A small wooden chair with a woven seat."),
    ("Within the outlined region, a man in a blue jacket is riding a bicycle.", None, "A man in a blue jacket is riding a bicycle."),
    ("The image shows a close-up of a dog's head with pointed ears and dark eyes.", None,
     "A dog's head with pointed ears and dark eyes."),
    ("The first image shows a ceramic mug with a chipped rim and a faded logo.", None,
     "A ceramic mug with a chipped rim and a faded logo."),
    ("Based on the images, the object is a wooden spoon with a long thin handle.", None,
     "A wooden spoon with a long thin handle."),
    ("The highlighted dog has thick brown fur and a long curled tail.", "dog", "The dog has thick brown fur and a long curled tail."),
    ("The outlined teddy bear has a red bow and a stitched nose.", "teddy_bear", "The teddy bear has a red bow and a stitched nose."),
    ("The dog outlined in red is a golden retriever with a shiny coat.", "dog", "The dog is a golden retriever with a shiny coat."),
    ("The dog in the highlighted region is brown and has a long curled tail.", "dog", "The dog is brown and has a long curled tail."),
    ("A ceramic mug, highlighted in red, with a chipped rim and a faded logo.", None, "A ceramic mug with a chipped rim and a faded logo."),
    ("A wooden bench with iron armrests. The rest of the image is darkened. It sits beside a gravel path.", None,
     "A wooden bench with iron armrests. It sits beside a gravel path."),
    ("A wooden bench with iron armrests and green paint. The object is outlined in red.", None,
     "A wooden bench with iron armrests and green paint."),
    ("A wooden bench with iron armrests and green paint. I hope this helps! Let me know if you need more.", None,
     "A wooden bench with iron armrests and green paint."),
    ("The object is a ceramic mug with a chipped rim and a faded logo.", None, "A ceramic mug with a chipped rim and a faded logo."),
    ("The object in the image is a black leather handbag with a gold clasp.", None, "A black leather handbag with a gold clasp."),
    ("This is a close-up of a black leather handbag with a gold clasp.", None, "A black leather handbag with a gold clasp."),
    ("In this image, a black cat is sitting on a wooden fence.", None, "A black cat is sitting on a wooden fence."),
    ("The object is brown and round with a smooth glossy surface.", None, "The object is brown and round with a smooth glossy surface."),
    ("A man wearing a masked costume walks along the marked trail with his dog.", None,
     "A man wearing a masked costume walks along the marked trail with his dog."),
    ("A red car with tinted windows. A red car with tinted windows. It has chrome wheels.", None,
     "A red car with tinted windows. It has chrome wheels."),
    # descriptions that only look like self-references are kept
    ("A white plate with a red border and a gold rim around its edge.", None,
     "A white plate with a red border and a gold rim around its edge."),
    ("A man wearing a white mask. The mask has thin red stripes across the forehead.", "mask",
     "A man wearing a white mask. The mask has thin red stripes across the forehead."),
    ("A rusty sign whose letters are outlined in black paint.", None, "A rusty sign whose letters are outlined in black paint."),
    ("A woman with hair highlighted with blonde streaks, wearing a denim jacket.", None,
     "A woman with hair highlighted with blonde streaks, wearing a denim jacket."),
    ("The dog within the red outline is a beagle with a white-tipped tail.", "dog",
     "The dog is a beagle with a white-tipped tail."),
    ("'A brown leather boot with a thick rubber sole.", None, "A brown leather boot with a thick rubber sole."),
]

REJECTED = [
    # (raw answer, reason)
    (None, "empty"),
    ("", "empty"),
    ("   \n ", "empty"),
    ('""', "empty"),
    ("A red car.", "empty"),
    ("<think>I am thinking about it and never finish", "empty"),
    ("I'm sorry, but I cannot determine what the highlighted region contains.", "refusal"),
    ("I am sorry, I can't help with that.", "refusal"),
    ("Sorry, the image is too blurry to describe the object.", "refusal"),
    ("I cannot see any highlighted object in the images provided.", "refusal"),
    ("Unable to determine the object in the image because it is very small.", "refusal"),
    ("It is difficult to determine what the highlighted object is, as the region is dark.", "refusal"),
    ("There is no highlighted object in the image you provided.", "refusal"),
    ("The highlighted region is empty and shows nothing of interest at all.", "refusal"),
    ("Unfortunately, I am unable to describe the region in this picture.", "refusal"),
    ("As an AI, I do not have the ability to see images of this kind.", "refusal"),
    ("A brown dog. I'm sorry, I cannot say more about the highlighted region.", "refusal"),
    ("The highlighted region has a rough texture with green moss.", "self_reference"),
    ("A red outline surrounds a brown dog lying on the sofa.", "self_reference"),
    ("the cat sat on the mat " * 8, "repetition"),
]


@pytest.mark.parametrize("raw, category, expected", CLEAN)
def test_clean_caption_rewrites_to_a_clean_description(raw, category, expected):
    cleaned = clean_caption(raw, category=category)
    assert (cleaned.caption, cleaned.reason) == (expected, None)


@pytest.mark.parametrize("raw, reason", REJECTED)
def test_clean_caption_rejects_with_a_reason(raw, reason):
    cleaned = clean_caption(raw)
    assert (cleaned.caption, cleaned.reason) == (None, reason)


def test_clean_caption_options_and_truncation():
    text = "A wooden bench with iron armrests and green paint. It stands on a gravel path near a tall oak tre"
    assert clean_caption(text, truncated=True).caption == "A wooden bench with iron armrests and green paint."
    assert clean_caption(text).caption == text + "."
    strict = CleaningConfig(rewrite_self_reference=False)
    assert clean_caption("The highlighted region shows a brown dog on the grass.", strict).reason == "self_reference"
    assert clean_caption("A brown dog on the grass.", strict).caption == "A brown dog on the grass."
    assert clean_caption("A brown dog on grass.", CleaningConfig(min_words=6)).reason == "empty"
    assert clean_caption("A brown dog.", CleaningConfig(min_words=3)).caption == "A brown dog."
    with pytest.raises(DamInputError, match="min_words"):
        CleaningConfig(min_words=0)


def test_repetition_thresholds_are_configurable():
    loop = "A small cat sat on a red mat and " + "the cat sat on the mat and " * 5 + "it purred."  # 44 trigrams, 34% distinct
    assert clean_caption(loop).reason == "repetition"
    assert clean_caption(loop, CleaningConfig(repetition_min_trigrams=45)).caption is not None  # too short to be checked
    assert clean_caption(loop, CleaningConfig(repetition_max_unique=0.3)).caption is not None  # 34% distinct is enough
    assert clean_caption(loop, CleaningConfig(repetition_min_trigrams=44, repetition_max_unique=0.35)).reason == "repetition"
    with pytest.raises(DamInputError, match="repetition_min_trigrams"):
        CleaningConfig(repetition_min_trigrams=0)
    with pytest.raises(DamInputError, match="repetition_max_unique"):
        CleaningConfig(repetition_max_unique=1.5)
    section = {"type": "openai", "base_url": "http://localhost:8000/v1", "cleaning": {"repetition_max_unique": 0.3}}
    assert labeler_config(section).cleaning.repetition_max_unique == 0.3  # a YAML key of the labeler section


# ---- prompts ---------------------------------------------------------------------------------


def test_prompt_variant_depends_only_on_the_seed():
    assert variant_order(0, 5) == [4, 3, 2, 0, 1]  # pinned: the same on every platform and Python
    prompts = [build_prompt("dog", seed) for seed in range(60)]
    assert prompts == [build_prompt("dog", seed) for seed in range(60)]
    variants = {build_prompt(None, seed, views="") for seed in range(60)}
    assert len(variants) == len(PROMPT_VARIANTS)  # all phrasings are used
    assert build_prompt("dog", 7, attempt=1) != build_prompt("dog", 7, attempt=0)
    assert build_prompt("dog", 7, attempt=len(PROMPT_VARIANTS)) == build_prompt("dog", 7, attempt=0)


def test_prompt_names_the_category():
    assert object_phrase("teddy_bear") == "the highlighted teddy bear"
    assert object_phrase(None) == object_phrase("  ") == "the highlighted object"
    assert "the highlighted bow (weapon)" in build_prompt("bow_(weapon)", 3)
    views = describe_views(ViewConfig())
    prompt = build_prompt("cat", 3, views=views)
    assert prompt.startswith(views) and "cat" in prompt
    assert build_prompt("cat", 0, templates=["Describe {object} ({category})."]) == "Describe the highlighted cat (cat)."
    with pytest.raises(DamInputError, match="unknown field"):
        check_templates(["Describe {thing}."])


# ---- views -----------------------------------------------------------------------------------


def test_views_crop_is_the_focal_box_with_the_region_outlined():
    image = random_image(120, 160, seed=1)
    mask = box_mask(120, 160, 60, 40, 90, 70)
    views = render_views(image, mask)
    x0, y0, x1, y1 = focal_crop_box(mask)
    assert views.box == (x0, y0, x1, y1)
    assert views.crop.shape == (y1 - y0, x1 - x0, 3) and views.crop.dtype == np.uint8
    crop_mask = mask[y0:y1, x0:x1]
    # The outline lies outside the region: the region's own pixels keep their colours.
    np.testing.assert_array_equal(views.crop[crop_mask], image[y0:y1, x0:x1][crop_mask])
    changed = (views.crop != image[y0:y1, x0:x1]).any(axis=2)
    assert changed.any() and not (changed & crop_mask).any()
    assert (views.crop[changed] == [255, 0, 0]).all()  # outline only: the rest of the crop untouched
    # The full image: region intact, outside darkened, outline in red.
    assert views.full.shape == image.shape
    np.testing.assert_array_equal(views.full[mask], image[mask])
    assert views.full[0, 0].sum() < image[0, 0].sum() or image[0, 0].sum() == 0
    assert (views.full[mask.shape[0] // 2, 58] == [255, 0, 0]).all()


def test_views_styles_downscale_and_tiny_regions():
    image = random_image(600, 1200, seed=2)
    mask = np.zeros((600, 1200), dtype=bool)
    mask[300, 600] = True  # one pixel: must stay visible after a 4x downscale
    views = render_views(image, mask, ViewConfig(max_side=300, crop_style="dim", full_style="outline"))
    assert views.full.shape == (150, 300, 3)
    assert (views.full == [255, 0, 0]).all(axis=2).any()
    dimmed = highlight(image[:10, :10], np.eye(10, dtype=bool), "dim", dim=1.0)
    assert dimmed[0, 1].sum() == 0 and (dimmed[0, 0] == image[0, 0]).all()
    assert "darkened" in describe_views(ViewConfig(crop_style="dim")) and "green" in describe_views(ViewConfig(color=[0, 255, 0]))
    with pytest.raises(DamInputError, match="dim"):
        ViewConfig(dim=2.0)
    with pytest.raises(DamInputError, match="no pixels"):
        render_views(image, np.zeros((600, 1200), dtype=bool))


def test_data_urls_decode_to_the_view():
    view = random_image(30, 40, seed=3)
    decoded = {}
    for fmt in ("png", "jpeg"):
        url = to_data_url(view, fmt)
        assert url.startswith(f"data:image/{fmt};base64,")
        decoded[fmt] = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
        assert decoded[fmt].shape == view.shape
    np.testing.assert_array_equal(decoded["png"], view)  # lossless


# ---- openai labeler --------------------------------------------------------------------------


def test_openai_labeler_sends_two_images_and_the_category_and_is_deterministic():
    requests = [region(i, cat) for i, cat in enumerate(["dog", "teddy_bear", None, "cat", "dog"])]
    with FakeLabelerServer(categories=["dog", "cat", "teddy bear"]) as server:
        with openai_labeler(server, temperature=0.0, max_tokens=77) as labeler:
            assert isinstance(labeler, Labeler)
            first = labeler.label(requests)
            second = labeler.label(list(reversed(requests)))[::-1]
        bodies = list(server.bodies)
    assert first == second
    assert all(result.reason is None for result in first)
    by_seed = {body["seed"]: body for body in bodies}
    for request, result in zip(requests, first):
        body = by_seed[request.seed]
        text, urls = request_parts(body)
        assert len(urls) == 2 and all(url.startswith("data:image/jpeg;base64,") for url in urls)
        assert [part["type"] for part in body["messages"][0]["content"]] == ["image_url", "image_url", "text"]
        name = (request.category or "object").replace("_", " ")
        assert f"the highlighted {name}" in text
        assert text == build_prompt(request.category, request.seed, views=describe_views(ViewConfig()))
        assert body["temperature"] == 0.0 and body["max_tokens"] == 77 and body["model"] == "fake-vlm"
        expected = fake_caption(request.category.replace("_", " ") if request.category else None, urls)
        assert result == LabelResult(expected, None)
        crop = np.asarray(Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1]))))
        x0, y0, x1, y1 = focal_crop_box(request.mask)
        assert crop.shape == (y1 - y0, x1 - x0, 3)


def test_openai_labeler_retries_transient_500s_and_timeouts():
    requests = [region(i, "dog") for i in range(4)]
    with FakeLabelerServer(categories=["dog"], fail_first=3) as server:
        with openai_labeler(server, concurrency=1, max_attempts=4) as labeler:
            results = labeler.label(requests)
        assert server.calls == len(requests) + 3
    assert all(r.caption is not None for r in results)
    with FakeLabelerServer(categories=["dog"], hang_first=2) as server:
        with openai_labeler(server, concurrency=1, timeout_s=0.3, max_attempts=3) as labeler:
            start = time.monotonic()
            results = labeler.label(requests[:2])
            assert time.monotonic() - start < 5
        assert server.calls == 2 + 2
    assert all(r.caption is not None for r in results)


def test_openai_permanent_failures_become_results_and_the_rest_succeed():
    cats = ["dog", "broken", "slow", "huge", "shy", "mute", "cat"]
    requests = [region(i, cat) for i, cat in enumerate(cats)]
    with FakeLabelerServer(
        categories=cats, fail_categories=["broken"], hang_categories=["slow"], reject_categories=["huge"],
        refuse_categories=["shy"], empty_categories=["mute"],
    ) as server:
        # A timeout well above a loaded machine's answer time: only "slow" (which hangs) may time out.
        with openai_labeler(server, timeout_s=3.0, max_attempts=2, rejection_retries=1) as labeler:
            results = dict(zip(cats, labeler.label(requests)))
        calls = dict(server.calls_by_category)
    assert results["dog"].caption and results["cat"].caption
    # 5xx and timeouts may pass on a later run (transient); a 400 rejects this very request.
    assert results["broken"] == LabelResult(None, "error: HTTP 500: injected failure", transient=True)
    assert results["slow"] == LabelResult(None, "timeout", transient=True)
    assert results["huge"] == LabelResult(None, "error: HTTP 400: image too large")
    assert not any(results[name].transient for name in ("huge", "shy", "mute", "dog"))
    assert results["shy"] == LabelResult(None, "refusal")
    assert results["mute"] == LabelResult(None, "empty")
    # 5xx and timeouts: max_attempts tries; 400: not retried; rejections: asked 1 + rejection_retries times.
    assert calls["broken"] == 2 and calls["slow"] == 2 and calls["huge"] == 1
    assert calls["shy"] == 2 and calls["mute"] == 2 and calls["dog"] == 1


def test_openai_rejected_answer_is_asked_again_with_another_variant():
    with FakeLabelerServer(categories=["dog"], refuse_first=1) as server:
        with openai_labeler(server) as labeler:
            (result,) = labeler.label([region(5, "dog")])
        prompts = [request_parts(body)[0] for body in server.bodies]
    assert result.caption is not None and len(prompts) == 2 and prompts[0] != prompts[1]
    views = describe_views(ViewConfig())
    assert prompts == [build_prompt("dog", 5, attempt, views=views) for attempt in (0, 1)]


def test_openai_concurrency_bound_is_respected():
    requests = [region(i, "dog") for i in range(12)]
    with FakeLabelerServer(categories=["dog"], delay_s=0.1) as server:
        with openai_labeler(server, concurrency=3) as labeler:
            results = labeler.label(requests)
        assert server.max_in_flight == 3
    assert all(r.caption for r in results)


def test_openai_bad_requests_do_not_stop_the_others():
    good = region(0, "dog")
    empty = LabelRequest("empty", good.image, np.zeros(good.mask.shape, dtype=bool), "dog", 1)
    wrong = LabelRequest("wrong", good.image, np.ones((5, 5), dtype=bool), "dog", 2)
    with FakeLabelerServer(categories=["dog"]) as server:
        with openai_labeler(server) as labeler:
            results = labeler.label([empty, good, wrong])
            assert labeler.label([]) == []
        assert server.calls == 1
    assert results[0] == LabelResult(None, "error: empty mask")
    assert results[1].caption is not None
    assert results[2].reason.startswith("error: mask shape")


def test_unreachable_server_is_a_clear_error_at_build_time():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the block exits
    url = f"http://127.0.0.1:{port}/v1"
    start = time.monotonic()
    with pytest.raises(DamInputError, match="no labeler server answers") as error:
        build_labeler({"type": "openai", "base_url": url})
    assert url in str(error.value) and "vllm serve" in str(error.value) and "labeler.base_url" in str(error.value)
    assert time.monotonic() - start < 5


def test_model_is_resolved_against_the_served_list():
    with FakeLabelerServer(model="qwen-vl") as server:
        with openai_labeler(server) as labeler:
            assert labeler.model == "qwen-vl"
        with pytest.raises(DamInputError, match="does not serve model 'llava'.*qwen-vl"):
            openai_labeler(server, model="llava")
        with pytest.raises(DamInputError, match="must be the root"):
            build_labeler({"type": "openai", "base_url": server.base_url.removesuffix("/v1") + "/nope"})


def test_server_that_goes_away_mid_run_raises():
    server = FakeLabelerServer(categories=["dog"]).start()
    labeler = openai_labeler(server, max_attempts=2, probe_timeout_s=1.0)
    assert labeler.label([region(0, "dog")])[0].caption is not None
    server.stop()
    with pytest.raises(DamInputError, match="stopped answering"):
        labeler.label([region(i, "dog") for i in range(3)])
    labeler.close()


def test_label_works_inside_a_running_event_loop():
    with FakeLabelerServer(categories=["dog"]) as server:
        with openai_labeler(server) as labeler:

            async def main() -> list[LabelResult]:
                return labeler.label([region(0, "dog")])

            assert asyncio.run(main())[0].caption is not None


def test_labeler_config_errors_are_clear():
    with pytest.raises(ConfigError, match="labeler.type"):
        build_labeler({"base_url": "http://localhost:8000/v1"})
    with pytest.raises(ConfigError, match="one of openai, transformers, dam"):
        build_labeler({"type": "gpt"})
    with pytest.raises(ConfigError, match="did you mean 'labeler.base_url'"):
        labeler_config({"type": "openai", "base_ur": "http://x/v1"})
    with pytest.raises(ConfigError, match="http://"):
        labeler_config({"type": "openai", "base_url": "localhost:8000/v1"})
    with pytest.raises(ConfigError, match="labeler.views.crop_style"):
        labeler_config({"type": "openai", "base_url": "http://x/v1", "views": {"crop_style": "blur"}})
    with pytest.raises(ConfigError, match="unknown field"):
        labeler_config({"type": "openai", "base_url": "http://x/v1", "prompts": ["Describe {thing}."]})
    config = labeler_config({"type": "openai", "base_url": "http://x/v1", "cleaning": {"min_words": 3}})
    assert config.concurrency == 16 and config.cleaning.min_words == 3 and config.views.max_side == 1024
    assert labeler_config({"type": "dam", "path": "/x"}).batch_size == 32


# ---- transformers labeler (tiny random LLaVA) ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava_path(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from tests.factories import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {% if m['content'] is string %}{{ m['content'] }} {% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}"
        "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<s> assistant :{% endif %}"
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default", chat_template=template,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=37,
                                       num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llava")
    LlavaForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_transformers_labeler_batches_two_images_per_region(tiny_llava_path):
    labeler = build_labeler({
        "type": "transformers", "path": str(tiny_llava_path), "device": "cpu", "batch_size": 3,
        "max_new_tokens": 6, "rejection_retries": 0, "cleaning": {"min_words": 1},
    })
    seen = []
    generate = labeler.model.generate

    def spy(**kwargs):
        image_token = labeler.model.config.image_token_index
        seen.append((kwargs["pixel_values"].shape[0], (kwargs["input_ids"] == image_token).sum(dim=1).tolist()))
        return generate(**kwargs)

    labeler.model.generate = spy
    requests = [region(i, cat) for i, cat in enumerate(["dog", None, "cat", "dog", "cat"])]
    batched = labeler.label(requests)
    assert seen[0] == (6, [32, 32, 32]) and seen[1] == (4, [32, 32])  # 2 images x 16 tokens per region
    assert "the highlighted dog" in labeler.prompt_text(requests[0], 0)
    labeler.config.batch_size = 1
    single = labeler.label(requests)
    assert batched == single  # greedy: batching and left padding do not change a label
    assert len(batched) == 5 and all(isinstance(r, LabelResult) for r in batched)
    assert all((r.caption is None) != (r.reason is None) for r in batched)
    empty = LabelRequest("e", requests[0].image, np.zeros_like(requests[0].mask), "dog", 0)
    assert labeler.label([empty]) == [LabelResult(None, "error: empty mask")]


@pytest.fixture(scope="module")
def tiny_qwen2_vl_path(tmp_path_factory):
    """A tiny random Qwen2-VL (the family most often used as a labeler) with a word-level tokenizer."""
    from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                              Qwen2VLVideoProcessor)

    from dam.tokenization import build_word_level_tokenizer
    from tests.factories import WORDS

    specials = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = build_word_level_tokenizer(WORDS)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", *specials]})
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    patches = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=16 * 16, max_pixels=32 * 32, **patches),
        video_processor=Qwen2VLVideoProcessor(**patches), tokenizer=tokenizer, chat_template=template,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen2_vl")
    Qwen2VLForConditionalGeneration(config).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


def test_transformers_labeler_runs_qwen2_vl(tiny_qwen2_vl_path):
    labeler = build_labeler({
        "type": "transformers", "path": str(tiny_qwen2_vl_path), "device": "cpu", "batch_size": 2,
        "max_new_tokens": 5, "cleaning": {"min_words": 1}, "views": {"max_side": 64},
    })
    grids = []
    generate = labeler.model.generate

    def spy(**kwargs):
        grids.append(kwargs["image_grid_thw"].shape[0])
        return generate(**kwargs)

    labeler.model.generate = spy
    requests = [region(i, cat) for i, cat in enumerate(["dog", None, "cat"])]
    batched = labeler.label(requests)
    assert grids[:2] == [4, 2]  # two images per region
    labeler.config.batch_size = 1
    assert labeler.label(requests) == batched


def test_transformers_labeler_bad_path_is_clear(tmp_path):
    with pytest.raises(DamInputError, match="no config.json"):
        build_labeler({"type": "transformers", "path": str(tmp_path)})


# ---- dam labeler (tiny random DAM) -----------------------------------------------------------


def test_dam_labeler_labels_image_and_mask_directly(tmp_path):
    from dam import DescribeAnything
    from tests.factories import tiny_dam, tiny_tokenizer

    describer = DescribeAnything(tiny_dam(seed=3), tiny_tokenizer())
    describer.save_pretrained(tmp_path / "dam")
    requests = [region(i, cat) for i, cat in enumerate(["dog", None, "cat"])]
    labeler = build_labeler({
        "type": "dam", "path": str(tmp_path / "dam"), "device": "cpu", "max_new_tokens": 8,
        "query": "describe the {category} .", "cleaning": {"min_words": 1},
    })
    queries = []
    describe_batch = labeler.describer.describe_batch

    def spy(regions, **kwargs):
        queries.extend(query for _, _, query in regions)
        return describe_batch(regions, **kwargs)

    labeler.describer.describe_batch = spy
    results = labeler.label(requests)
    assert queries == ["describe the dog .", "describe the object .", "describe the cat ."]
    raw = describer.describe_batch(
        [(r.image, r.mask, q) for r, q in zip(requests, queries)], max_new_tokens=8, do_sample=False
    )
    expected = [clean_caption(text, CleaningConfig(min_words=1), category=r.category) for text, r in zip(raw, requests)]
    assert [(r.caption, r.reason) for r in results] == [(e.caption, e.reason) for e in expected]
    with pytest.raises(DamInputError, match="does not exist"):
        build_labeler({"type": "dam", "path": str(tmp_path / "absent")})
