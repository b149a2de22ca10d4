"""DAM model: identity at initialisation, gradients, save/load, from_parts, projector order."""

import os

import pytest
import torch
from transformers import LlamaForCausalLM, Qwen2ForCausalLM, SiglipVisionModel

from dam.modeling import DamConfig, DamForConditionalGeneration, TokenDownsample2x2
from dam.processing import DamProcessor
from tests.factories import (
    box_mask,
    random_image,
    tiny_dam,
    tiny_dam_config,
    tiny_llama_config,
    tiny_qwen2_config,
    tiny_tokenizer,
    tiny_siglip_config,
)


def focal_batch(model, num_regions=3):
    processor = DamProcessor(tiny_tokenizer(), model.config)
    image = random_image(48, 64, seed=1)
    masks = [box_mask(48, 64, 2 + 7 * i, 3 + 5 * i, 12 + 9 * i, 20 + 5 * i) for i in range(num_regions)]
    return processor([[(image, mask)] for mask in masks])


@pytest.mark.parametrize("gate_type", ["tanh", "scalar"])
def test_regional_features_equal_base_siglip_of_the_crop_at_init(gate_type):
    torch.manual_seed(0)
    model = DamForConditionalGeneration(tiny_dam_config(gate_type=gate_type)).eval()
    batch = focal_batch(model)
    pixels = batch["pixel_values"]
    features = model.vision(pixels)[:, 0]
    base = SiglipVisionModel(model.config.vision_config).eval()
    base.load_state_dict(model.vision.tower.state_dict())
    expected = base(pixels[:, 4:7], output_hidden_states=True).hidden_states[-2]
    assert torch.equal(features, expected)
    # and the mask really reaches the features once E_M is non-zero
    with torch.no_grad():
        model.vision.mask_patch_embedding.weight.normal_()
    assert not torch.equal(model.vision(pixels)[:, 0], expected)


@pytest.mark.parametrize("gate_type", ["tanh", "scalar"])
def test_gates_and_mask_embedding_learn_from_identity(gate_type):
    torch.manual_seed(0)
    model = DamForConditionalGeneration(tiny_dam_config(gate_type=gate_type)).train()
    tokenizer = tiny_tokenizer()
    processor = DamProcessor(tokenizer, model.config)
    image = random_image(48, 64, seed=2)
    regions = [[(image, box_mask(48, 64, 5, 5, 30, 40))], [(image, box_mask(48, 64, 40, 10, 60, 20))]]
    encoded = [processor.encode(None, 1, answer=text) for text in ("a red circle", "the blue square on a table")]
    input_ids, attention_mask = processor.pad([e.input_ids for e in encoded], side="right")
    labels, _ = processor.pad([e.labels for e in encoded], side="right", value=-100)
    pixel_values = processor.pixel_values([p for frames in regions for p in processor.focal_prompts(frames)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    adapter = model.vision.adapters[0]
    for step in range(2):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        for name, parameter in [
            ("attn_gate", adapter.attn_gate),
            ("mlp_gate", adapter.mlp_gate),
            ("mask_patch_embedding", model.vision.mask_patch_embedding.weight),
        ]:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (step, name)
        if step == 1:  # once the gates moved, the adapters' own weights learn too
            assert adapter.cross_attn.q_proj.weight.grad.abs().sum() > 0
        optimizer.step()
    assert adapter.attn_gate.item() != 0.0


def test_loss_only_on_answer_tokens():
    model = tiny_dam()
    processor = DamProcessor(tiny_tokenizer(), model.config)
    encoded = processor.encode(None, 1, answer="a red circle")
    answer_len = sum(label != -100 for label in encoded.labels)
    assert answer_len == 4  # three words + end of turn marker of the chat template's "</s>"
    assert encoded.input_ids[-answer_len:] == encoded.labels[-answer_len:]


def test_mismatched_image_tokens_raise():
    model = tiny_dam()
    batch = focal_batch(model, num_regions=2)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"][:1])


@pytest.mark.parametrize("projector_type", ["mlp2x_gelu", "mlp_downsample"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, projector_type):
    model = tiny_dam(projector_type=projector_type)
    batch = focal_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
    model.save_pretrained(tmp_path)
    loaded = DamForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.projector_type == projector_type
    with torch.no_grad():
        after = loaded(**batch).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not transformers' private 0600


@pytest.mark.parametrize("llm_kind", ["llama", "qwen2"])
def test_from_parts_with_saved_siglip_and_llm(tmp_path, llm_kind):
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": []})
    vision = SiglipVisionModel(tiny_siglip_config())
    if llm_kind == "llama":
        llm = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer) - 1))
    else:
        llm = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=len(tokenizer) - 1))
    vision.save_pretrained(tmp_path / "siglip")
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    model = DamForConditionalGeneration.from_parts(
        vision=tmp_path / "siglip", llm=tmp_path / "llm", projector_type="mlp_downsample", focal_min_size=8
    ).eval()
    assert model.config.text_config.model_type == llm_kind
    # pretrained weights survive composition, new modules start at identity
    torch.testing.assert_close(
        model.vision.tower.state_dict()["embeddings.patch_embedding.weight"]
        if "embeddings.patch_embedding.weight" in model.vision.tower.state_dict()
        else model.vision.tower.state_dict()["vision_model.embeddings.patch_embedding.weight"],
        vision.state_dict()[next(k for k in vision.state_dict() if k.endswith("embeddings.patch_embedding.weight"))],
    )
    assert all(a.attn_gate.item() == 0 and a.mlp_gate.item() == 0 for a in model.vision.adapters)
    assert model.vision.mask_patch_embedding.weight.abs().sum() == 0
    original_rows = llm.get_input_embeddings().weight.shape[0]
    torch.testing.assert_close(
        model.get_input_embeddings().weight[:original_rows], llm.get_input_embeddings().weight[:original_rows]
    )
    processor = DamProcessor(model.tokenizer, model.config)
    batch = processor([[(random_image(40, 40, 3), box_mask(40, 40, 5, 5, 20, 20))]])
    new_tokens = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert new_tokens.shape == (1, 5)
    model.save_pretrained(tmp_path / "dam")
    reloaded = DamForConditionalGeneration.from_pretrained(tmp_path / "dam").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_downsample_merges_2x2_blocks_in_documented_order():
    grid, channels = 5, 2
    # token (r, c) carries the values (r, c) in its two channels
    tokens = torch.tensor([[[r, c] for r in range(grid) for c in range(grid)]], dtype=torch.float32)
    tokens = tokens.view(1, grid * grid, channels)
    merged = TokenDownsample2x2()(tokens)
    assert merged.shape == (1, 9, 4 * channels)

    def expected(block_r, block_c):
        values = []
        for dr, dc in [(0, 0), (0, 1), (1, 0), (1, 1)]:
            r, c = 2 * block_r + dr, 2 * block_c + dc
            values += [r, c] if r < grid and c < grid else [0, 0]  # zero pad bottom/right
        return values

    for index in range(9):
        block_r, block_c = divmod(index, 3)
        assert merged[0, index].tolist() == expected(block_r, block_c)


def test_config_rejects_unknown_choices():
    with pytest.raises(ValueError, match="projector_type"):
        tiny_dam_config(projector_type="mlp3x")
    with pytest.raises(ValueError, match="gate_type"):
        tiny_dam_config(gate_type="sigmoid")
    with pytest.raises(ValueError, match="vision_feature_layer"):
        tiny_dam_config(vision_feature_layer=-9)


def test_config_round_trips_through_dict():
    config = tiny_dam_config(projector_type="mlp_downsample", gate_type="scalar")
    rebuilt = DamConfig(**config.to_dict())
    assert rebuilt.num_image_tokens == 4 and rebuilt.gate_type == "scalar"
    assert rebuilt.vision_config.hidden_size == 32 and rebuilt.text_config.model_type == "llama"


@pytest.mark.parametrize("mode", ["full_only", "crop_only", "full_and_crop"])
def test_ablation_modes_encode_only_their_views_without_cross_attention(mode):
    model = tiny_dam(seed=3, vision_mode=mode)  # non-zero gates: adapters would change the features
    batch = focal_batch(model)
    pixels = batch["pixel_values"]
    with torch.no_grad():
        model.vision.mask_patch_embedding.weight.zero_()
        model.vision.mask_patch_embedding.bias.zero_()
        features = model.vision(pixels)
    base = SiglipVisionModel(model.config.vision_config).eval()
    base.load_state_dict(model.vision.tower.state_dict())
    full = base(pixels[:, 0:3], output_hidden_states=True).hidden_states[-2]
    crop = base(pixels[:, 4:7], output_hidden_states=True).hidden_states[-2]
    expected = {"full_only": [full], "crop_only": [crop], "full_and_crop": [full, crop]}[mode]
    assert features.shape[1] == len(expected) == model.config.num_views
    for view, reference in enumerate(expected):
        torch.testing.assert_close(features[:, view], reference)
    frozen = set(model.freeze_unused_parameters())
    assert all(name in frozen for name, _ in model.vision.adapters.named_parameters(prefix="vision.adapters"))


def test_full_and_crop_feeds_both_token_sets_to_the_llm():
    model = tiny_dam(seed=4, vision_mode="full_and_crop")
    single = tiny_dam_config().num_image_tokens
    assert model.config.num_image_tokens == 2 * single
    batch = focal_batch(model, num_regions=2)
    assert int((batch["input_ids"] == model.config.image_token_id).sum()) == 2 * 2 * single
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (2, 3)


def test_gate_init_opens_the_gates_of_a_model_trained_from_scratch():
    model = DamForConditionalGeneration(tiny_dam_config(gate_init=0.5))
    gates = [g for adapter in model.vision.adapters for g in (adapter.attn_gate, adapter.mlp_gate)]
    assert all(float(g) == 0.5 for g in gates)
    assert all(float(g) == 0.0 for a in DamForConditionalGeneration(tiny_dam_config()).vision.adapters for g in (a.attn_gate, a.mlp_gate))


def test_mask_embedding_init_random_makes_the_mask_visible_from_the_start():
    model = DamForConditionalGeneration(tiny_dam_config(mask_embedding_init="random"))
    assert float(model.vision.mask_patch_embedding.weight.norm()) > 1.0
    assert float(DamForConditionalGeneration(tiny_dam_config()).vision.mask_patch_embedding.weight.norm()) == 0.0


@pytest.mark.parametrize("column_major", [False, True])
def test_downsample_merges_blocks_in_the_configured_order(column_major):
    grid = 3  # padded to 4x4: blocks (0,0), (0,1), (1,0), (1,1)
    tokens = torch.tensor([[[float(r), float(c)] for r in range(grid) for c in range(grid)]])  # (1, 9, 2): (row, col)
    merged = TokenDownsample2x2(column_major=column_major)(tokens)  # (1, 4, 8)
    top_left_of_each_block = merged[0, :, :2].tolist()
    expected = [[0, 0], [2, 0], [0, 2], [2, 2]] if column_major else [[0, 0], [0, 2], [2, 0], [2, 2]]
    assert top_left_of_each_block == expected
    # within a block: (r0,c0), (r0,c1), (r1,c0), (r1,c1); the padded row/column is zero
    assert merged[0, 0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1]
    assert merged[0, 3].tolist() == [2, 2, 0, 0, 0, 0, 0, 0]


def test_context_layer_norm_normalises_what_the_cross_attention_reads():
    model = tiny_dam(context_layer_norm=True)
    assert all(a.context_norm is not None for a in model.vision.adapters)
    assert all(a.context_norm is None for a in tiny_dam().vision.adapters)  # the paper's (and NVlabs') layout
    adapter = model.vision.adapters[0]
    hidden, context = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    # shifting and scaling every context token alike leaves a normalised context unchanged
    torch.testing.assert_close(adapter(hidden, context), adapter(hidden, 3.0 * context + 5.0), rtol=1e-4, atol=1e-4)
