"""Importing the released NVlabs DAM layout: a tiny checkpoint written with the real key names and
config dicts, converted, and checked against a from-scratch reference computation of the
released model written here from its description (issue 9), not with the toolkit's modules."""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import shutil
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import GenerationMixin, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from dam import DescribeAnything
from dam.cli import main
from dam.errors import DamInputError
from dam.modeling import DamForConditionalGeneration, convert_nvlabs_checkpoint, is_nvlabs_layout
from dam.modeling.nvlabs import detect_variant
from dam.modeling.sizes import dam_3b_config
from dam.processing import DamProcessor
from dam.prompts import DEFAULT_QUERY, QUERY_PRESETS, VICUNA_V1_SYSTEM
from tests.factories import box_mask, random_image

IMAGE_SIZE, PATCH, WIDTH, LAYERS, HEADS = 12, 4, 32, 3, 4  # a 3x3 patch grid: padded to 4x4, 4 tokens
GREEDY = dict(max_new_tokens=6, do_sample=False)

SIGLIP = dict(
    hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, num_channels=3,
)

# The released prompts as issue 9 spells them (the vicuna-v1 system text as the core issue does),
# written here rather than taken from dam.prompts, the code under test.
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_QUERY = "Describe the masked region in detail."
JOINT_IMAGE_QUERY = "Image: <image>\nGiven the image above, describe the object in the masked region."
JOINT_VIDEO_QUERY = (
    "Video: <image><image><image><image><image><image><image><image>\nGiven the video in the form of a "
    "sequence of frames above, describe the object in the masked region in the video in detail."
)

CORPUS = [
    SYSTEM, "USER: ASSISTANT:", IMAGE_QUERY, JOINT_IMAGE_QUERY, JOINT_VIDEO_QUERY,
    "A red circle on a wooden table, next to a small dog with brown fur and a long tail.",
    "The object is a shiny blue car parked in the street; its windows reflect the sky.",
]


# ---- writing a tiny checkpoint in the released layout -----------------------------------------


def _sentencepiece_model() -> bytes:
    """A small byte-fallback BPE SentencePiece model with Llama's special ids and normaliser."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        split_digits=True, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def _noisy(shape, scale=0.3, offset=0.0, generator=None):
    return (offset + scale * torch.randn(shape, generator=generator)).half()


def _save(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        keys = sorted(tensors)
        weight_map = {}
        for shard in range(shards):
            name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {key: tensors[key] for key in keys[shard::shards]}
            save_file(part, str(folder / name), metadata={"format": "pt"})
            weight_map.update({key: name for key in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_released_checkpoint(root: Path, seed: int = 0) -> Path:
    """A DAM-3B-shaped folder with tiny sizes, random float16 weights and the released names."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    root.mkdir(parents=True)
    sp_model = _sentencepiece_model()
    vocab_size = sentencepiece.SentencePieceProcessor(model_proto=sp_model).get_piece_size()

    llm_cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=WIDTH, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2, tie_word_embeddings=False,
    ).to_dict()
    llm_cfg.update(architectures=["LlamaForCausalLM"], _name_or_path=str(root / "llm"), model_max_length=4096)
    llm = LlamaForCausalLM(LlamaConfig(**llm_cfg))
    _save(root / "llm", {k: v.half() for k, v in llm.state_dict().items()}, llm_cfg, shards=2)
    (root / "llm" / "tokenizer.model").write_bytes(sp_model)
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (root / "llm" / "special_tokens_map.json").write_text(json.dumps(special))
    (root / "llm" / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 4096,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "use_default_system_prompt": False, "clean_up_tokenization_spaces": False,
        **{key: {"__type": "AddedToken", "content": value, "lstrip": False, "normalized": False,
                 "rstrip": False, "single_word": False} for key, value in special.items()},
    }))

    vision_cfg = SiglipVisionConfig(**SIGLIP).to_dict()
    vision_cfg.update(architectures=["SiglipVisionModel"], model_type="siglip_vision_model")
    tower = SiglipVisionModel(SiglipVisionConfig(**SIGLIP))
    tower_state = {
        (key if key.startswith("vision_model.") else f"vision_model.{key}"): value.half()
        for key, value in tower.state_dict().items()
    }
    tower_state["vision_model.embeddings.mask_patch_embedding.weight"] = _noisy((WIDTH, 1, PATCH, PATCH), 0.5, generator=generator)
    tower_state["vision_model.embeddings.mask_patch_embedding.bias"] = _noisy((WIDTH,), 0.5, generator=generator)
    _save(root / "vision_tower", tower_state, vision_cfg)
    (root / "vision_tower" / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor", "resample": 3, "rescale_factor": 1 / 255,
        "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    }))

    projector_cfg = {"architectures": ["MultimodalProjector"], "mm_projector_type": "mlp_downsample", "model_type": "v2l_projector"}
    _save(root / "mm_projector", {
        "layers.1.weight": _noisy((4 * WIDTH,), 0.3, 1.0, generator), "layers.1.bias": _noisy((4 * WIDTH,), 0.3, generator=generator),
        "layers.2.weight": _noisy((WIDTH, 4 * WIDTH), 0.2, generator=generator), "layers.2.bias": _noisy((WIDTH,), 0.2, generator=generator),
        "layers.4.weight": _noisy((WIDTH, WIDTH), 0.3, generator=generator), "layers.4.bias": _noisy((WIDTH,), 0.2, generator=generator),
    }, projector_cfg)

    context_cfg = {
        "architectures": ["ContextProvider"], "model_type": "context_provider",
        "context_provider_type": "cross_attn_end_to_all", "hidden_size": WIDTH, "intermediate_size": 37,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_channels": 3, "num_mask_channels": 0,
        "image_size": IMAGE_SIZE, "patch_size": PATCH, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
        "attention_dropout": 0.0, "zero_init_output": True, "residual_dropout": 0.0, "context_image_as_queries": False,
        "context_provider_layer_indices": None, "masked_cross_attn": False, "crop_position_single_embedding": False,
        "trainable_crop_position_embedding": True, "crop_embedding_mode": "add", "treat_image_as_cimage": False,
    }
    context = {}
    for layer in range(LAYERS):
        prefix = f"context_provider_module.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            context[f"{prefix}cross_attn.{proj}.weight"] = _noisy((WIDTH, WIDTH), 0.3, generator=generator)
            context[f"{prefix}cross_attn.{proj}.bias"] = _noisy((WIDTH,), 0.1, generator=generator)
        for norm in ("layer_norm1", "layer_norm2"):
            context[f"{prefix}{norm}.weight"] = _noisy((WIDTH,), 0.2, 1.0, generator)
            context[f"{prefix}{norm}.bias"] = _noisy((WIDTH,), 0.1, generator=generator)
        context[f"{prefix}mlp.fc1.weight"] = _noisy((37, WIDTH), 0.3, generator=generator)
        context[f"{prefix}mlp.fc1.bias"] = _noisy((37,), 0.1, generator=generator)
        context[f"{prefix}mlp.fc2.weight"] = _noisy((WIDTH, 37), 0.3, generator=generator)
        context[f"{prefix}mlp.fc2.bias"] = _noisy((WIDTH,), 0.1, generator=generator)
        context[f"{prefix}attn_factor"] = torch.tensor([0.8 - 0.3 * layer]).half()
        context[f"{prefix}mlp_factor"] = torch.tensor([-0.6 + 0.25 * layer]).half()
    _save(root / "context_provider", context, context_cfg)

    top = {
        "_name_or_path": "runs/dam_tiny", "architectures": ["LlavaLlamaModel"], "model_type": "llava_llama",
        "llm_cfg": llm_cfg, "vision_tower_cfg": vision_cfg, "mm_projector_cfg": projector_cfg,
        "context_provider_cfg": context_cfg, "mask_encoder_cfg": None, "hidden_size": WIDTH, "mm_hidden_size": WIDTH,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "resize",
        "num_video_frames": 8, "fps": 0.0, "model_dtype": "torch.float16", "resume_path": None,
        "vision_resolution": -1, "interpolate_mode": "linear", "s2": False, "tune_language_model": True,
        "tune_vision_tower": True, "tune_mm_projector": True, "tune_context_provider": True,
    }
    (root / "config.json").write_text(json.dumps(top, indent=2))
    return root


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    return write_released_checkpoint(tmp_path_factory.mktemp("nvlabs") / "DAM-tiny")


@pytest.fixture(scope="module")
def converted(released):
    model, tokenizer = convert_nvlabs_checkpoint(released, dtype=torch.float32)
    return model, tokenizer


# ---- the reference, from the description ------------------------------------------------------


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({key: value.float() for key, value in load_file(str(file)).items()})
    return tensors


def released_merge(tokens: torch.Tensor) -> torch.Tensor:
    """mlp_downsample's parameter-free merge as the released code computes it: (G*G, C) tokens,
    row-major as SigLIP flattens its patch grid, reshaped to (G, G, C); a zero row at the bottom
    and a zero column at the right when G is odd; pairs of neighbouring columns viewed as 2C;
    the two grid axes swapped; pairs of neighbouring rows viewed as 4C, so each 2x2 block holds
    (r0,c0), (r0,c1), (r1,c0), (r1,c1); the (column pair, row pair) grid flattened."""
    length, channels = tokens.shape
    side = math.isqrt(length)
    grid = F.pad(tokens.reshape(side, side, channels), (0, 0, 0, side % 2, 0, side % 2))
    rows, half = grid.shape[0], grid.shape[0] // 2
    column_pairs = grid.reshape(rows, half, 2 * channels)  # (row, column pair, 2C)
    blocks = column_pairs.permute(1, 0, 2).reshape(half, half, 4 * channels)  # (column pair, row pair, 4C)
    return blocks.reshape(half * half, 4 * channels)


def row_major_merge(tokens: torch.Tensor) -> torch.Tensor:
    """The same blocks listed row pair by row pair: the wrong order, which the tests must catch."""
    merged = released_merge(tokens)
    half = math.isqrt(merged.shape[0])
    return merged.reshape(half, half, -1).transpose(0, 1).reshape(merged.shape)


def _focal_box(mask: np.ndarray, alpha: float = 3.0, floor: int = 48) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    xc, yc = xs.min() + w / 2, ys.min() + h / 2
    w, h = max(w, floor), max(h, floor)
    x0, y0 = int(xc - w / 2), int(yc - h / 2)
    img_h, img_w = mask.shape
    grow = (alpha - 1) / 2
    return (max(int(np.floor(x0 - grow * w)), 0), max(int(np.floor(y0 - grow * h)), 0),
            min(int(np.ceil(x0 + (grow + 1) * w)), img_w), min(int(np.ceil(y0 + (grow + 1) * h)), img_h))


def _siglip_pixels(pixels: np.ndarray) -> torch.Tensor:
    """The SigLIP image processor: PIL bicubic to the square input, (x / 255 - 0.5) / 0.5."""
    resized = np.asarray(Image.fromarray(pixels).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))
    scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy((scaled - np.float32(0.5)) / np.float32(0.5)).permute(2, 0, 1)


def _four_channels(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    # The mask goes through the processor as an RGB image of 0 / 255; its first channel is kept.
    return torch.cat([_siglip_pixels(image), _siglip_pixels(mask.astype(np.uint8) * 255)[:1]])  # (4, S, S)


class ReleasedReference:
    """The released DAM's forward pass in plain torch, from the issue's description."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "llm" / "tokenizer.model"))
        vision = _weights(root / "vision_tower")
        self.patch_w = vision["vision_model.embeddings.patch_embedding.weight"]
        self.patch_b = vision["vision_model.embeddings.patch_embedding.bias"]
        self.mask_w = vision["vision_model.embeddings.mask_patch_embedding.weight"]
        self.mask_b = vision["vision_model.embeddings.mask_patch_embedding.bias"]
        self.positions = vision["vision_model.embeddings.position_embedding.weight"]
        self.tower = SiglipVisionModel(SiglipVisionConfig(**SIGLIP, attn_implementation="eager")).eval()
        own_keys = self.tower.state_dict().keys()
        self.tower.load_state_dict({
            key: vision[key if key.startswith("vision_model.") else f"vision_model.{key}"] for key in own_keys
        })
        self.context = _weights(root / "context_provider")
        self.projector = _weights(root / "mm_projector")
        self.llm = LlamaForCausalLM.from_pretrained(root / "llm", dtype=torch.float32).eval()

    def prompt_ids(self, user_turn: str, image_id: int, tokens_per_image: int) -> list[int]:
        prompt = f"{SYSTEM} USER: {user_turn} ASSISTANT:"
        ids = [self.sp.bos_id()]
        for index, chunk in enumerate(prompt.split("<image>")):
            if index:
                ids += [image_id] * tokens_per_image
            ids += self.sp.encode(chunk)
        return ids

    def _embed(self, pixels: torch.Tensor) -> torch.Tensor:  # (4, S, S) -> (T, C)
        patches = F.conv2d(pixels[None, :3], self.patch_w, self.patch_b, stride=PATCH)
        patches = patches + F.conv2d(pixels[None, 3:], self.mask_w, self.mask_b, stride=PATCH)
        return patches.flatten(2)[0].T + self.positions

    def _cross_attention(self, layer: int, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = lambda name: self.context[f"context_provider_module.layers.{layer}.{name}"]  # noqa: E731
        head = WIDTH // HEADS

        def split(x):  # (T, C) -> (H, T, C/H)
            return x.view(x.shape[0], HEADS, head).transpose(0, 1)

        q = split(F.linear(h, w("cross_attn.q_proj.weight"), w("cross_attn.q_proj.bias")))
        k = split(F.linear(z, w("cross_attn.k_proj.weight"), w("cross_attn.k_proj.bias")))
        v = split(F.linear(z, w("cross_attn.v_proj.weight"), w("cross_attn.v_proj.bias")))
        attention = torch.softmax(q @ k.transpose(1, 2) * head**-0.5, dim=-1) @ v  # (H, T, C/H)
        return F.linear(attention.transpose(0, 1).reshape(h.shape[0], WIDTH), w("cross_attn.out_proj.weight"), w("cross_attn.out_proj.bias"))

    def _adapter(self, layer: int, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = lambda name: self.context[f"context_provider_module.layers.{layer}.{name}"]  # noqa: E731
        normed = F.layer_norm(h, (WIDTH,), w("layer_norm1.weight"), w("layer_norm1.bias"), eps=1e-6)
        h = h + w("attn_factor") * self._cross_attention(layer, normed, z)
        normed = F.layer_norm(h, (WIDTH,), w("layer_norm2.weight"), w("layer_norm2.bias"), eps=1e-6)
        mlp = F.linear(F.gelu(F.linear(normed, w("mlp.fc1.weight"), w("mlp.fc1.bias")), approximate="tanh"), w("mlp.fc2.weight"), w("mlp.fc2.bias"))
        return h + w("mlp_factor") * mlp

    def _encode(self, pixels: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """hidden_states[-2]: the input of the last layer (each earlier layer + its adapter)."""
        siglip = getattr(self.tower, "vision_model", self.tower)
        h = self._embed(pixels)[None]
        for layer in range(LAYERS - 1):
            out = siglip.encoder.layers[layer](h, None)
            h = out[0] if isinstance(out, tuple) else out
            if context is not None:
                h = self._adapter(layer, h[0], context)[None]
        return h[0]

    def image_features(self, image: np.ndarray, mask: np.ndarray, merge) -> torch.Tensor:
        x0, y0, x1, y1 = _focal_box(mask)
        full = _four_channels(image, mask)
        crop = _four_channels(np.ascontiguousarray(image[y0:y1, x0:x1]), np.ascontiguousarray(mask[y0:y1, x0:x1]))
        context = self._encode(full, None)
        features = context if torch.equal(full, crop) else self._encode(crop, context)
        merged = merge(features)
        p = self.projector
        x = F.layer_norm(merged, (4 * WIDTH,), p["layers.1.weight"], p["layers.1.bias"], eps=1e-5)
        x = F.gelu(F.linear(x, p["layers.2.weight"], p["layers.2.bias"]))
        return F.linear(x, p["layers.4.weight"], p["layers.4.bias"])

    @torch.no_grad()
    def logits(self, frames: list[tuple[np.ndarray, np.ndarray]], user_turn: str, merge=released_merge) -> torch.Tensor:
        features = torch.cat([self.image_features(image, mask, merge) for image, mask in frames])
        image_id = self.sp.get_piece_size()
        ids = torch.tensor(self.prompt_ids(user_turn, image_id, features.shape[0] // len(frames)))
        positions = ids == image_id
        embeds = self.llm.get_input_embeddings()(ids.masked_fill(positions, 0))
        embeds[positions] = features
        return self.llm(inputs_embeds=embeds[None]).logits[0]


@pytest.fixture(scope="module")
def reference(released):
    return ReleasedReference(released)


def regions():
    """A small region (crop inside the image), a large one (crop = whole image) and an ellipse."""
    image = random_image(160, 200, seed=21)
    small = box_mask(160, 200, 20, 30, 40, 50)
    large = box_mask(160, 200, 10, 10, 190, 150)
    ys, xs = np.mgrid[:160, :200]
    ellipse = ((xs - 140) / 25.0) ** 2 + ((ys - 100) / 15.0) ** 2 <= 1
    return [(image, small), (image, large), (image, ellipse)]


def toolkit_logits(model, tokenizer, frames, query=None):
    batch = DamProcessor(tokenizer, model.config)([frames], [query])
    with torch.no_grad():
        return model(**batch).logits[0], batch


# ---- tests ------------------------------------------------------------------------------------


def test_released_merge_pads_and_orders_blocks_as_constructed():
    # token (r, c) of a 3x3 grid holds (r + 1, c + 1), so the zero padding is visible
    tokens = torch.tensor([[r + 1.0, c + 1.0] for r in range(3) for c in range(3)])
    top_left = [1, 1, 1, 2, 2, 1, 2, 2]  # (r0,c0), (r0,c1), (r1,c0), (r1,c1)
    below = [3, 1, 3, 2, 0, 0, 0, 0]  # rows 2 (and the zero row 3), columns 0-1
    right = [1, 3, 0, 0, 2, 3, 0, 0]  # rows 0-1, column 2 (and the zero column 3)
    corner = [3, 3, 0, 0, 0, 0, 0, 0]
    assert released_merge(tokens).tolist() == [top_left, below, right, corner]  # blocks column by column
    assert row_major_merge(tokens).tolist() == [top_left, right, below, corner]


def test_prompt_texts_are_the_released_ones():
    assert VICUNA_V1_SYSTEM == SYSTEM
    assert DEFAULT_QUERY == IMAGE_QUERY
    assert QUERY_PRESETS["image_joint"] == JOINT_IMAGE_QUERY
    assert QUERY_PRESETS["video_joint"] == JOINT_VIDEO_QUERY


def test_layout_detection_and_variant_rule(released, tmp_path):
    assert is_nvlabs_layout(released)
    assert not is_nvlabs_layout(tmp_path)
    assert detect_variant(released, json.loads((released / "config.json").read_text())) == "image"
    assert detect_variant(tmp_path / "DAM-3B-Video") == "joint"
    assert detect_variant(tmp_path / "models--nvidia--DAM-3B-Video" / "snapshots" / "0123abc") == "joint"
    assert detect_variant(tmp_path / "DAM-3B") == "image"
    assert detect_variant(tmp_path / "x", {"_name_or_path": "/runs/dam_3b_video_v1/"}) == "joint"


def test_converted_config_records_the_released_behaviour(converted):
    model, tokenizer = converted
    config = model.config
    assert (config.gate_type, config.projector_type, config.vision_feature_layer) == ("scalar", "mlp_downsample", -2)
    assert (config.prompt_template, config.resize_backend, config.downsample_order) == ("vicuna_v1", "pil", "column_major")
    assert config.skip_adapters_when_crop_is_full and (config.focal_alpha, config.focal_min_size) == (3.0, 48)
    assert config.default_query == IMAGE_QUERY and config.default_video_query is None
    generation = model.generation_config
    assert (generation.do_sample, generation.temperature, generation.top_p, generation.max_new_tokens) == (True, 0.2, 0.5, 512)
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == 400
    assert model.get_input_embeddings().num_embeddings == 400  # the LLM is not resized
    assert model.vision.adapters[1].attn_gate.item() == pytest.approx(0.5, abs=1e-3)


def test_tokenizer_gives_sentencepiece_ids(released, converted):
    _, tokenizer = converted
    sp = sentencepiece.SentencePieceProcessor(model_file=str(released / "llm" / "tokenizer.model"))
    rng = np.random.default_rng(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABC.,:;!?\n\t0123456789éß中🙂")
    chunks = [chunk for text in CORPUS for chunk in text.split("<image>")]  # the processor splits on slots
    texts = ["".join(rng.choice(alphabet, size=rng.integers(0, 30))) for _ in range(300)] + chunks
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text
    assert tokenizer("a dog")["input_ids"] == [sp.bos_id()] + sp.encode("a dog")
    assert tokenizer.decode(tokenizer("a red  dog\nsat")["input_ids"], skip_special_tokens=True) == "a red  dog\nsat"


def test_prompt_ids_are_the_chunked_sentencepiece_ids(released, converted, reference):
    model, tokenizer = converted
    processor = DamProcessor(tokenizer, model.config)
    expected = reference.prompt_ids("<image>\n" + IMAGE_QUERY, model.config.image_token_id, 4)
    assert processor.encode(None, 1).input_ids == expected


def test_logits_equal_the_from_scratch_reference(converted, reference):
    model, tokenizer = converted
    full = [DamProcessor(tokenizer, model.config).focal_prompts([r])[0].crop_is_full_image for r in regions()]
    assert full == [False, True, False]  # both encoder paths are exercised
    for frames in [[region] for region in regions()]:
        ours, _ = toolkit_logits(model, tokenizer, frames)
        theirs = reference.logits(frames, "<image>\n" + IMAGE_QUERY)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # The check would catch a wrong block order: row-major blocks give other logits.
    row_major = reference.logits(frames, "<image>\n" + IMAGE_QUERY, merge=row_major_merge)
    assert (ours - row_major).abs().max() > 1e-2


def test_joint_variant_video_logits_and_default_queries(released, reference):
    model, tokenizer = convert_nvlabs_checkpoint(released, dtype=torch.float32, variant="joint")
    config = model.config
    assert config.default_query == JOINT_IMAGE_QUERY
    assert config.default_video_query == JOINT_VIDEO_QUERY
    image, _ = regions()[0]
    frames = [(image, box_mask(160, 200, 20 + 15 * i, 30 + 5 * i, 50 + 15 * i, 60 + 5 * i)) for i in range(8)]
    ours, batch = toolkit_logits(model, tokenizer, frames)
    assert int((batch["input_ids"] == config.image_token_id).sum()) == 8 * config.num_image_tokens
    theirs = reference.logits(frames, JOINT_VIDEO_QUERY)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    one = DamProcessor(tokenizer, config).encode(None, 1).input_ids
    assert one == reference.prompt_ids(JOINT_IMAGE_QUERY, config.image_token_id, config.num_image_tokens)


def test_describe_batch_equals_one_by_one_on_both_generation_paths(converted):
    model, tokenizer = converted
    describer = DescribeAnything(model, tokenizer, generation="plain")
    fast = DescribeAnything(model, tokenizer, generation="fast")  # the continuous-batching engine, on CPU too
    image = random_image(90, 120, seed=3)
    items = [*regions(), (image, box_mask(90, 120, 5, 5, 20, 20)), (image, box_mask(90, 120, 60, 40, 118, 88), "Describe it.")]
    one_by_one = [describer.describe(item[0], item[1], query=item[2] if len(item) == 3 else None, **GREEDY) for item in items]
    assert describer.describe_batch(items, batch_size=5, **GREEDY) == one_by_one
    assert describer.describe_batch(items, batch_size=2, **GREEDY) == one_by_one
    assert fast.describe_batch(items, batch_size=5, **GREEDY) == one_by_one
    assert fast.describe_batch(items, batch_size=2, **GREEDY) == one_by_one


def test_dam_3b_config_is_the_converted_architecture(converted):
    """bench/speed_describe.py --shape dam-3b must measure what the converter builds."""
    model, tokenizer = converted
    not_architecture = {"vision_config", "text_config", "image_token_id", "dtype"}  # dimensions, weights' dtype
    ours = {k: v for k, v in model.config.to_dict().items() if k not in not_architecture}
    bench = {k: v for k, v in dam_3b_config(image_token_id=32000).to_dict().items() if k not in not_architecture}
    assert ours == bench
    assert (bench["downsample_order"], bench["resize_backend"], bench["skip_adapters_when_crop_is_full"]) == (
        "column_major", "pil", True
    )


def test_weights_in_pytorch_bin_files_convert_the_same(released, converted, tmp_path):
    copy = shutil.copytree(released, tmp_path / "DAM-bin")
    projector = load_file(str(copy / "mm_projector" / "model.safetensors"))
    (copy / "mm_projector" / "model.safetensors").unlink()
    torch.save(projector, copy / "mm_projector" / "pytorch_model.bin")
    model, _ = convert_nvlabs_checkpoint(copy, dtype=torch.float32)
    for (name, ours), theirs in zip(model.state_dict().items(), converted[0].state_dict().values()):
        assert torch.equal(ours, theirs), name


def _broken_copy(released: Path, tmp_path: Path, edit) -> Path:
    copy = shutil.copytree(released, tmp_path / "DAM-broken")
    edit(copy)
    return copy


def _edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_weights(path: Path, add=None, drop=()):
    tensors = load_file(str(path))
    for key in drop:
        del tensors[key]
    tensors.update(add or {})
    save_file(tensors, str(path), metadata={"format": "pt"})


def _set_projector_type(copy: Path) -> None:
    _edit_json(copy / "mm_projector" / "config.json", mm_projector_type="mlp2x_gelu")


def _set_context_type(copy: Path) -> None:
    cfg = json.loads((copy / "config.json").read_text())
    cfg["context_provider_cfg"]["context_provider_type"] = "concat"
    (copy / "config.json").write_text(json.dumps(cfg))
    _edit_json(copy / "context_provider" / "config.json", context_provider_type="concat")


BROKEN = {
    "missing subfolder": (lambda c: shutil.rmtree(c / "context_provider"), r"subfolder context_provider/ is missing"),
    "not llava_llama": (lambda c: _edit_json(c / "config.json", model_type="llava_qwen"), r"model_type is 'llava_qwen'"),
    "projector type": (_set_projector_type, r"mm_projector_type is 'mlp2x_gelu', expected 'mlp_downsample'"),
    "context type": (_set_context_type, r"context_provider_type is 'concat'"),
    "masked cross-attention": (
        lambda c: _edit_json(c / "context_provider" / "config.json", masked_cross_attn=True), r"masked_cross_attn is set"
    ),
    "patch features": (
        lambda c: _edit_json(c / "config.json", mm_vision_select_feature="patch"), r"mm_vision_select_feature is 'patch'"
    ),
    "other preprocessing": (
        lambda c: _edit_json(c / "vision_tower" / "preprocessor_config.json", resample=2), r"preprocessor resample=2"
    ),
    "unexpected weight": (
        lambda c: _edit_weights(c / "context_provider" / "model.safetensors", add={"context_provider_module.gate": torch.zeros(1)}),
        r"not part of the released DAM \(context_provider/context_provider_module.gate\)",
    ),
    "missing weight": (
        lambda c: _edit_weights(
            c / "vision_tower" / "model.safetensors", drop=["vision_model.embeddings.mask_patch_embedding.weight"]
        ),
        r"missing \(vision_tower/vision_model.embeddings.mask_patch_embedding.weight\)",
    ),
    "missing adapter weight": (
        lambda c: _edit_weights(
            c / "context_provider" / "model.safetensors", drop=["context_provider_module.layers.0.attn_factor"]
        ),
        r"missing \(context_provider/context_provider_module.layers.0.attn_factor\)",
    ),
    "wrong shape": (
        lambda c: _edit_weights(c / "mm_projector" / "model.safetensors", add={"layers.4.bias": torch.zeros(7)}),
        r"other shapes .*mm_projector/layers.4.bias \(7,\) vs \(32,\)",
    ),
    "no tokenizer": (lambda c: (c / "llm" / "tokenizer.model").unlink(), r"has no tokenizer.model"),
    "no weights": (lambda c: (c / "mm_projector" / "model.safetensors").unlink(), r"mm_projector holds no weights"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_unknown_layouts_are_refused_with_the_reason(released, tmp_path, case):
    edit, message = BROKEN[case]
    with pytest.raises(DamInputError, match=message):
        convert_nvlabs_checkpoint(_broken_copy(released, tmp_path, edit))


def test_not_a_folder_is_refused(tmp_path):
    with pytest.raises(DamInputError, match="is not a folder"):
        convert_nvlabs_checkpoint(tmp_path / "nothing-here")


def test_from_pretrained_converts_a_released_folder_in_memory(released, converted, caplog):
    with caplog.at_level(logging.INFO, logger="dam"):
        describer = DescribeAnything.from_pretrained(released, dtype="float32")
    assert "NVlabs" in caplog.text and "converted" in caplog.text
    for ours, theirs in zip(describer.model.state_dict().values(), converted[0].state_dict().values()):
        assert torch.equal(ours, theirs)
    assert describer.model.config.resize_backend == "pil"


def test_cli_convert_round_trip(released, converted, tmp_path, capsys):
    out = tmp_path / "dam-tiny"
    assert main(["convert", "--from-nvlabs", str(released), "--out", str(out), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)  # (DeepSpeed may print a line on import)
    loaded = DescribeAnything.from_pretrained(out)
    model, tokenizer = converted
    assert loaded.model.config.downsample_order == "column_major" and loaded.model.config.gate_type == "scalar"
    frames = [regions()[0]]
    ours, _ = toolkit_logits(loaded.model, loaded.tokenizer, frames)
    theirs, _ = toolkit_logits(model, tokenizer, frames)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert loaded.model.generation_config.temperature == 0.2
    assert isinstance(loaded.model, DamForConditionalGeneration)

    assert main(["convert", "--from-nvlabs", str(released), "--out", str(out)]) == 2  # not overwritten silently
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "--from-nvlabs", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dam: error:") and "is not a folder" in err


def test_cli_describe_samples_with_the_checkpoints_defaults(released, tmp_path, capsys, monkeypatch):
    out = tmp_path / "dam-tiny"
    convert_nvlabs_checkpoint(released, out, dtype=torch.float32)
    image, mask = regions()[0]
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "mask.png")
    seen = []
    original = GenerationMixin.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["generation_config"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", spy)
    files = ["--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png")]
    argv = ["describe", "--model", str(out), *files, "--device", "cpu"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    assert main([*argv, "--max-new-tokens", "3", "--temperature", "0.7"]) == 0
    assert main([*argv, "--temperature", "0", "--top-p", "0.9"]) == 0
    capsys.readouterr()
    settings = [(g.do_sample, g.temperature, g.top_p, g.max_new_tokens) for g in seen]
    assert settings[0] == (True, 0.2, 0.5, 3)  # the checkpoint's generation_config.json
    assert settings[1] == (True, 0.7, 0.5, 3)  # what is given wins, the rest stays the checkpoint's
    assert settings[2][0] is False and settings[2][2:] == (0.9, 512)


def _cut_out_url(image: np.ndarray, mask: np.ndarray) -> str:
    cut_out = io.BytesIO()
    Image.fromarray(np.dstack([image, mask.astype(np.uint8) * 255])).save(cut_out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(cut_out.getvalue()).decode()


def test_the_server_answers_concurrent_requests_with_a_released_checkpoint(released):
    openai = pytest.importorskip("openai")
    from dam.server import BackgroundServer, ServerSettings, create_app

    describer = DescribeAnything.from_pretrained(released)  # converted in memory
    image = random_image(90, 120, seed=3)
    items = [*regions(), (image, box_mask(90, 120, 60, 40, 118, 88))]
    queries = [IMAGE_QUERY, IMAGE_QUERY, "Describe it.", IMAGE_QUERY]
    expected = [
        describer.describe(image, mask, query=query, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        for (image, mask), query in zip(items, queries)
    ]
    assert all(expected)
    # A long wait lets the four requests join one batch.
    settings = ServerSettings(model_name="dam-released", max_wait_ms=500)
    with BackgroundServer(create_app(describer, settings)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(index: int) -> str:
            image, mask = items[index]
            content = [
                {"type": "image_url", "image_url": {"url": _cut_out_url(image, mask)}},
                {"type": "text", "text": queries[index]},
            ]
            reply = client.chat.completions.create(
                model="dam-released", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0,
                extra_body={"min_tokens": 6},
            )
            return reply.choices[0].message.content

        with ThreadPoolExecutor(len(items)) as pool:
            answers = list(pool.map(ask, range(len(items))))
        health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())
    assert answers == expected
    assert health["mean_batch_size"] > 1  # they were generated together


def test_the_server_samples_with_the_checkpoints_defaults(released, monkeypatch):
    openai = pytest.importorskip("openai")
    import dam.server.app
    from dam.server import BackgroundServer, ServerSettings, create_app
    from dam.server.messages import RequestError

    describer = DescribeAnything.from_pretrained(released)
    image, mask = regions()[0]
    content = [{"type": "image_url", "image_url": {"url": _cut_out_url(image, mask)}}]
    messages = [{"role": "user", "content": content}]
    seen = []
    original = dam.server.app.prepare_request

    def spy(describer, parsed, lock):
        seen.append(parsed.sampling)
        if parsed.sampling.max_tokens > 6:  # recorded; not worth 512 tokens on a CPU
            raise RequestError("recorded", None, "recorded")
        return original(describer, parsed, lock)

    monkeypatch.setattr(dam.server.app, "prepare_request", spy)
    with BackgroundServer(create_app(describer, ServerSettings(model_name="dam-released"))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="recorded"):
            client.chat.completions.create(model="dam-released", messages=messages)
        texts = [
            client.chat.completions.create(model="dam-released", messages=messages, max_tokens=6, seed=seed, **given)
            .choices[0].message.content
            for seed in (1, 2) for given in ({}, {"temperature": 0.2, "top_p": 0.5})
        ]
        client.chat.completions.create(model="dam-released", messages=messages, max_tokens=6, temperature=0)
    assert (seen[0].temperature, seen[0].top_p, seen[0].max_tokens) == (0.2, 0.5, 512)
    assert [(s.temperature, s.top_p) for s in seen[1:5]] == [(0.2, 0.5)] * 4
    assert (seen[5].temperature, seen[5].top_p) == (0.0, 0.5)  # greedy when asked for
    assert texts[0] == texts[1] and texts[2] == texts[3]  # a seeded default request samples as 0.2 / 0.5 does
