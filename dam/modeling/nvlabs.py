"""Import the released NVlabs DAM checkpoints (DAM-3B, DAM-3B-Video) into this toolkit.

    from dam.modeling.nvlabs import convert_nvlabs_checkpoint
    model, tokenizer = convert_nvlabs_checkpoint("path/to/DAM-3B", dst="dam-3b")
    # or from a shell:  dam convert --from-nvlabs path/to/DAM-3B --out dam-3b
    # or directly:      DescribeAnything.from_pretrained("path/to/DAM-3B")  (converts in memory)

The released layout is VILA's: a config.json with model_type "llava_llama" and the dicts
llm_cfg, vision_tower_cfg, mm_projector_cfg and context_provider_cfg, and one subfolder per part:

- ``llm/``: causal-LM weights (LlamaForCausalLM) and a SentencePiece ``tokenizer.model``;
- ``vision_tower/``: SiglipVisionModel weights (``vision_model.*``) whose embeddings also hold
  ``mask_patch_embedding`` (Conv2d 1 -> C, kernel = stride = patch size, with bias);
- ``mm_projector/``: mlp_downsample, ``layers.1`` LayerNorm(4C), ``layers.2`` Linear(4C, D),
  ``layers.4`` Linear(D, D) (index 0 is the parameter-free 2x2 merge, 3 the GELU);
- ``context_provider/``: cross_attn_end_to_all, per tower layer i
  ``context_provider_module.layers.{i}.{cross_attn.{q,k,v,out}_proj, layer_norm1, layer_norm2,
  mlp.fc1, mlp.fc2}`` and the scalar gates ``attn_factor``, ``mlp_factor`` (no tanh).

They map one to one onto DamForConditionalGeneration: the tower, E_M, the adapters (gate_type
"scalar") and the projector keep their weights, and the config records the released inference
behaviour (:func:`released_dam_config`): features from hidden state -2, the merge's column-major
block order, the vicuna_v1 prompt, PIL preprocessing, no adapters when the focal crop is the whole
image; its generation config samples with temperature 0.2, top_p 0.5, at most 512 new tokens
(what `describe`, `dam describe` and `dam serve` use where a call does not say). A layout that
differs in any way (another projector or context provider, extra or missing weights, other
preprocessing) is refused with a DamInputError naming the difference: the importer reproduces
the reference exactly or not at all.

The tokenizer. The reference loads ``llm/tokenizer.model`` with the slow SentencePiece Llama
tokenizer (use_fast=False, legacy=False). Transformers 5 no longer has slow Llama tokenizers and
its converter needs protobuf, so the importer builds the same tokenizer itself from the
SentencePiece model: a byte-fallback BPE over its pieces (merges ranked by piece id), "▁"
prepended and spaces replaced as SentencePiece's own normaliser does, BOS on encode. It is
checked against ``sentencepiece`` on the prompt texts and a few hard strings before use, and saved
as a plain tokenizer.json. ``<image>`` is added after the SentencePiece vocabulary as the
placeholder id; the LLM's embeddings are not resized (placeholders never reach them). Decoding
equals SentencePiece's except on runs of byte tokens that are not valid UTF-8: tokenizers'
ByteFallback writes one U+FFFD per byte of such a run, SentencePiece one per invalid sequence
and keeps the run's valid bytes (bytes E4 14 decode to two U+FFFD here, to U+FFFD U+0014
there). Ids are unaffected; only a caption in which the model emits broken UTF-8 can read
differently.

The default query (``variant``). Image checkpoints (DAM-3B) were prompted with "Describe the
masked region in detail."; joint image+video checkpoints (DAM-3B-Video) with the presets
``image_joint`` for one frame and ``video_joint`` for eight. The config does not say which kind a
checkpoint is (VILA configs carry num_video_frames even for image-only models), so the rule is
the checkpoint's name, as the reference demos choose: "joint" when the folder's name (for a
Hugging Face cache snapshot, the ``models--org--name`` folder above it) or the config's
``_name_or_path`` / ``resume_path`` contains "video", else "image". Pass ``variant="image"`` or
``"joint"`` (``dam convert --variant``) to override it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PretrainedConfig, PreTrainedTokenizerFast, SiglipVisionConfig

try:
    from transformers.initialization import no_init_weights

    _DTYPE_ARGUMENT = "dtype"
except ImportError:  # transformers 4.x, whose _from_config names the argument torch_dtype
    from transformers.modeling_utils import no_init_weights

    _DTYPE_ARGUMENT = "torch_dtype"

from dam.errors import DamInputError
from dam.modeling.configuration_dam import DamConfig
from dam.modeling.modeling_dam import DamForConditionalGeneration
from dam.prompts import DEFAULT_QUERY, IMAGE_PLACEHOLDER, QUERY_PRESETS, VICUNA_V1_SYSTEM

logger = logging.getLogger(__name__)

Variant = Literal["auto", "image", "joint"]
VARIANTS: tuple[str, ...] = ("auto", "image", "joint")

PARTS = ("llm", "vision_tower", "mm_projector", "context_provider")
"""The released layout's subfolders, each named after its config dict (``llm_cfg`` -> ``llm/``)."""

GENERATION_DEFAULTS: dict[str, Any] = {"do_sample": True, "temperature": 0.2, "top_p": 0.5, "max_new_tokens": 512}
"""The reference's generation settings (``get_description`` defaults)."""

_WEIGHT_FILES = (
    "model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin"
)
_SIGLIP_PREFIX = "vision_model."
_MASK_EMBEDDING = "embeddings.mask_patch_embedding."
_ADAPTER_PREFIX = "context_provider_module.layers."
_GATE_NAMES = {"attn_factor": "attn_gate", "mlp_factor": "mlp_gate"}
_PROJECTOR_INDICES = (1, 2, 4)
# ContextProviderConfig's defaults in the reference, used where its dict omits a field.
_CONTEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_LISTED = 6  # names shown per kind of problem in an error message


# ---- detection ----------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DamInputError(f"{path} could not be read as JSON ({error}); the checkpoint folder is damaged") from error


def is_nvlabs_layout(path: str | os.PathLike) -> bool:
    """True when `path` is a folder whose config.json looks like a released NVlabs/VILA checkpoint
    (model_type "llava_llama", or the llm_cfg / vision_tower_cfg dicts); never raises."""
    config_file = Path(path) / "config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict):
        return False
    return config.get("model_type") == "llava_llama" or "llm_cfg" in config or "vision_tower_cfg" in config


def detect_variant(path: str | os.PathLike, config: dict[str, Any] | None = None) -> Literal["image", "joint"]:
    """The kind of checkpoint by its name: "joint" (image+video prompts) if it says video, else "image".

    Names looked at: the folder's own name, the repository folder of a Hugging Face cache
    snapshot (``models--nvidia--DAM-3B-Video/snapshots/<hash>``), and the last component of
    the config's ``_name_or_path`` and ``resume_path``.
    """
    folder = Path(path).resolve()
    names = [folder.name]
    if folder.parent.name == "snapshots":
        names.append(folder.parent.parent.name)
    for key in ("_name_or_path", "resume_path"):
        value = (config or {}).get(key)
        if isinstance(value, str) and value.strip("/"):
            names.append(Path(value.rstrip("/")).name)
    return "joint" if any("video" in name.lower() for name in names) else "image"


# ---- weights on disk ----------------------------------------------------------------------


class _TensorFiles:
    """Lazy access to the weights of one part folder: safetensors (one file or sharded) or .bin."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._where: dict[str, Path] = {}
        self._loaded_bins: dict[Path, dict[str, torch.Tensor]] = {}
        present = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
        if not present:
            raise DamInputError(
                f"{folder} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}"
            )
        name = present[0]
        if name.endswith(".index.json"):
            weight_map = _read_json(folder / name).get("weight_map", {})
            missing_shards = sorted({shard for shard in weight_map.values() if not (folder / shard).is_file()})
            if missing_shards:
                raise DamInputError(f"{folder}/{name} lists shards that are not there: {', '.join(missing_shards)}")
            self._where = {key: folder / shard for key, shard in weight_map.items()}
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(folder / name), "pt") as handle:
                self._where = {key: folder / name for key in handle.keys()}
        else:
            for key in self._bin(folder / name):
                self._where[key] = folder / name

    def _bin(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._loaded_bins:
            try:
                self._loaded_bins[path] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # pickle and zip errors of a damaged file
                raise DamInputError(f"{path} could not be read as PyTorch weights ({error})") from error
        return self._loaded_bins[path]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape_of(self, key: str) -> tuple[int, ...]:
        path = self._where[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return tuple(handle.get_slice(key).get_shape())
        return tuple(self._bin(path)[key].shape)

    def dtype_of(self, key: str) -> torch.dtype:
        path = self._where[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                name = handle.get_slice(key).get_dtype()
            return _SAFETENSORS_DTYPES.get(name, torch.int64)
        return self._bin(path)[key].dtype

    def get(self, key: str) -> torch.Tensor:
        path = self._where[key]
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return handle.get_tensor(key)
        return self._bin(path)[key]


# ---- the layout ---------------------------------------------------------------------------


@dataclass
class _Layout:
    root: Path
    config: dict[str, Any]
    llm_config: dict[str, Any]
    vision_config: dict[str, Any]
    projector_config: dict[str, Any]
    context_config: dict[str, Any]
    weights: dict[str, _TensorFiles] = field(default_factory=dict)


def _part_config(root: Path, config: dict[str, Any], part: str) -> dict[str, Any]:
    """The part's own config.json (what the reference's from_pretrained reads), else its dict."""
    own = root / part / "config.json"
    values = dict(config.get(f"{part}_cfg") or {})
    if own.is_file():
        loaded = _read_json(own)
        if isinstance(loaded, dict):
            values.update(loaded)
    return values


def _read_layout(src: str | os.PathLike) -> _Layout:
    root = Path(src)
    if not root.is_dir():
        raise DamInputError(f"{src} is not a folder: pass the folder of a released DAM checkpoint (e.g. DAM-3B)")
    if not (root / "config.json").is_file():
        raise DamInputError(f"{src} has no config.json: it is not a released DAM checkpoint folder")
    config = _read_json(root / "config.json")
    if not isinstance(config, dict):
        raise DamInputError(f"{root}/config.json does not hold a JSON object")
    problems: list[str] = []
    if config.get("model_type") != "llava_llama":
        problems.append(f"config.json model_type is {config.get('model_type')!r}, expected 'llava_llama'")
    for part in PARTS:
        key = f"{part}_cfg"
        if not isinstance(config.get(key), dict):
            problems.append(f"config.json {key} is not a dict" if key in config else f"config.json has no {key} dict")
        if not (root / part).is_dir():
            problems.append(f"subfolder {part}/ is missing")
    if config.get("mask_encoder_cfg"):
        problems.append("config.json has a mask_encoder_cfg (a separate mask encoder is not the released DAM)")
    if problems:
        raise DamInputError(f"{src} is not a released DAM checkpoint this importer knows: " + "; ".join(problems))
    layout = _Layout(
        root=root,
        config=config,
        llm_config=_part_config(root, config, "llm"),
        vision_config=_part_config(root, config, "vision_tower"),
        projector_config=_part_config(root, config, "mm_projector"),
        context_config=_part_config(root, config, "context_provider"),
    )
    _check_configs(layout)
    layout.weights = {part: _TensorFiles(root / part) for part in PARTS}
    return layout


def _check_configs(layout: _Layout) -> None:
    """Refuse configurations whose computation this toolkit does not reproduce exactly."""
    problems: list[str] = []
    config, vision, context = layout.config, layout.vision_config, layout.context_config
    if vision.get("model_type") != "siglip_vision_model":
        raise DamInputError(
            f"{layout.root}: the vision tower is {vision.get('model_type')!r}, expected 'siglip_vision_model'"
        )
    tower = SiglipVisionConfig(**{k: v for k, v in vision.items() if k != "model_type"})
    projector_type = layout.projector_config.get("mm_projector_type")
    if projector_type != "mlp_downsample":
        problems.append(f"mm_projector_type is {projector_type!r}, expected 'mlp_downsample'")
    context_type = context.get("context_provider_type")
    if context_type != "cross_attn_end_to_all":
        problems.append(f"context_provider_type is {context_type!r}, expected 'cross_attn_end_to_all'")
    for flag in ("context_image_as_queries", "masked_cross_attn"):
        if context.get(flag):
            problems.append(f"context_provider_cfg.{flag} is set (not the released DAM)")
    if context.get("context_provider_layer_indices") is not None:
        problems.append("context_provider_cfg.context_provider_layer_indices is set (adapters on some layers only)")
    for name, default in _CONTEXT_DEFAULTS.items():
        value, tower_value = context.get(name, default), getattr(tower, name)
        if value != tower_value:
            problems.append(f"context_provider {name}={value!r} differs from the vision tower's {tower_value!r}")
    select_feature = config.get("mm_vision_select_feature", "cls_patch")
    if select_feature != "cls_patch":
        problems.append(f"mm_vision_select_feature is {select_feature!r}, expected 'cls_patch' (all SigLIP tokens)")
    aspect = config.get("image_aspect_ratio", "resize")
    if aspect != "resize":
        problems.append(f"image_aspect_ratio is {aspect!r}, expected 'resize'")
    layers = tower.num_hidden_layers
    select_layer = config.get("mm_vision_select_layer", -2)
    if not isinstance(select_layer, int) or not -layers <= select_layer < 0:
        problems.append(f"mm_vision_select_layer={select_layer!r} is not a negative layer index of the tower")
    problems += _preprocessor_problems(layout.root / "vision_tower" / "preprocessor_config.json", tower.image_size)
    if problems:
        raise DamInputError(f"{layout.root} cannot be converted exactly: " + "; ".join(problems))


def _preprocessor_problems(path: Path, image_size: int) -> list[str]:
    """The SigLIP image processor must be what the "pil" resize backend reproduces."""
    if not path.is_file():
        logger.info("%s is missing; assuming the SigLIP defaults (bicubic, mean = std = 0.5)", path)
        return []
    processor = _read_json(path)
    problems = []
    size = processor.get("size") or {}
    if isinstance(size, dict) and {size.get("height"), size.get("width")} != {image_size}:
        problems.append(f"preprocessor size {size} differs from the tower's image_size {image_size}")
    expected = {
        "resample": 3, "do_resize": True, "do_rescale": True, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    }
    for key, value in expected.items():
        if key in processor and processor[key] != value:
            problems.append(f"preprocessor {key}={processor[key]!r}, expected {value!r}")
    if abs(float(processor.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        problems.append(f"preprocessor rescale_factor={processor['rescale_factor']!r}, expected 1/255")
    return problems


# ---- tokenizer ----------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


_CHECK_TEXTS = (
    VICUNA_V1_SYSTEM + " USER: ",
    " ASSISTANT:",
    "\n" + DEFAULT_QUERY + " ASSISTANT:",
    *(text for preset in QUERY_PRESETS.values() for text in preset.split(IMAGE_PLACEHOLDER)),
    " leading space, two  spaces, a tab\tand\nnewlines\n\n",
    "Zürich 2024: 3.14 ½ ﬁne Ａ 東京 🙂",
    "",
)


def build_sentencepiece_tokenizer(llm_dir: str | os.PathLike) -> PreTrainedTokenizerFast:
    """The released checkpoint's slow SentencePiece tokenizer, rebuilt as a fast tokenizer.

    Gives SentencePiece's ids (checked on the prompts and a few hard strings) without protobuf
    or transformers' slow classes; `<image>` is added after the SentencePiece vocabulary.
    `decode` differs from SentencePiece's only on byte-token runs that are not valid UTF-8
    (module docstring).
    """
    import sentencepiece

    llm_dir = Path(llm_dir)
    model_file = llm_dir / "tokenizer.model"
    if not model_file.is_file():
        raise DamInputError(f"{llm_dir} has no tokenizer.model (the SentencePiece model of the released LLM)")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    settings: dict[str, Any] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (llm_dir / name).is_file():
            settings.update(_read_json(llm_dir / name))
    vocab = {processor.id_to_piece(index): index for index in range(processor.get_piece_size())}
    ranked = []
    for piece, index in vocab.items():
        if processor.is_control(index) or processor.is_unknown(index) or processor.is_byte(index):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((index, vocab[left], vocab[right], left, right))
    ranked.sort()
    unk = _token_text(settings.get("unk_token")) or processor.id_to_piece(processor.unk_id())
    bos = _token_text(settings.get("bos_token")) or "<s>"
    eos = _token_text(settings.get("eos_token")) or "</s>"
    pad = _token_text(settings.get("pad_token")) or unk
    merges = [(left, right) for *_, left, right in ranked]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # SentencePiece's normaliser: a dummy-prefix "▁", every space as "▁" (Llama keeps runs of spaces).
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    template = "$A"
    specials = []
    if settings.get("add_bos_token", True):
        template = f"{bos} {template}"
        specials.append((bos, vocab[bos]))
    if settings.get("add_eos_token", False):
        template = f"{template} {eos}"
        specials.append((eos, vocab[eos]))
    backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token=eos, unk_token=unk, pad_token=pad
    )
    if isinstance(settings.get("model_max_length"), int):
        tokenizer.model_max_length = settings["model_max_length"]
    for text in _CHECK_TEXTS:
        ours = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ours != processor.encode(text):
            raise DamInputError(
                f"{model_file} is not a byte-fallback BPE SentencePiece model this importer reproduces "
                f"exactly ({text!r} gives {ours} here, {processor.encode(text)} with sentencepiece)"
            )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    return tokenizer


# ---- the model ----------------------------------------------------------------------------


def _stored_dtype(layout: _Layout) -> torch.dtype:
    weights = layout.weights["llm"]
    for key in weights.keys():
        dtype = weights.dtype_of(key)
        if dtype.is_floating_point:
            return dtype
    return torch.float32


def released_dam_config(
    vision_config: PretrainedConfig | dict[str, Any],
    text_config: PretrainedConfig | dict[str, Any],
    image_token_id: int,
    variant: Literal["image", "joint"] = "image",
    vision_feature_layer: int = -2,
    num_video_frames: int = 8,
    skip_adapters_when_crop_is_full: bool = True,
    **overrides: Any,
) -> DamConfig:
    """The DamConfig of a released DAM with these dimensions: what the converter builds, and
    what `dam.modeling.sizes.dam_3b_config` builds with DAM-3B's shapes for the benchmarks.

    Only the dimensions and the settings a released config.json records are arguments; every
    other field is the released inference behaviour (module docstring), defined here once.
    `overrides` replace DamConfig fields (for experiments on the architecture).
    """
    joint = variant == "joint"
    values: dict[str, Any] = dict(
        vision_config=vision_config,
        text_config=text_config,
        projector_type="mlp_downsample",
        gate_type="scalar",
        vision_feature_layer=vision_feature_layer,
        num_video_frames=num_video_frames,
        image_token_id=image_token_id,
        prompt_template="vicuna_v1",
        focal_alpha=3.0,
        focal_min_size=48,
        skip_adapters_when_crop_is_full=skip_adapters_when_crop_is_full,
        default_query=QUERY_PRESETS["image_joint"] if joint else DEFAULT_QUERY,
        default_video_query=QUERY_PRESETS["video_joint"] if joint else None,
        resize_backend="pil",
        downsample_order="column_major",
        attn_implementation="sdpa",
    )
    values.update(overrides)
    return DamConfig(**values)


def _dam_config(layout: _Layout, image_token_id: int, variant: Literal["image", "joint"]) -> DamConfig:
    return released_dam_config(
        dict(layout.vision_config),
        dict(layout.llm_config),
        image_token_id,
        variant,
        vision_feature_layer=layout.config.get("mm_vision_select_layer", -2),
        num_video_frames=int(layout.config.get("num_video_frames") or 8),
        skip_adapters_when_crop_is_full=not layout.context_config.get("treat_image_as_cimage", False),
    )


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key


@dataclass
class _Mapping:
    """Which file tensor fills which model tensor, and what is wrong."""

    sources: dict[str, tuple[str, str]] = field(default_factory=dict)  # model key -> (part, file key)
    unexpected: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fill: dict[str, float] = field(default_factory=dict)  # model key -> constant (no effect / no gate)


def _map_weights(model: DamForConditionalGeneration, layout: _Layout) -> _Mapping:
    mapping = _Mapping()
    config = model.config
    targets = set(model.state_dict())

    # vision_tower/: SigLIP keys (with or without the "vision_model." prefix) and E_M.
    tower_keys = {_strip(key, _SIGLIP_PREFIX): f"vision.tower.{key}" for key in model.vision.tower.state_dict()}
    for file_key in layout.weights["vision_tower"].keys():
        bare = _strip(file_key, _SIGLIP_PREFIX)
        mask_target = f"vision.mask_patch_embedding.{bare[len(_MASK_EMBEDDING):]}"
        if bare.startswith(_MASK_EMBEDDING) and mask_target in targets:
            mapping.sources[mask_target] = ("vision_tower", file_key)
        elif bare in tower_keys:
            mapping.sources[tower_keys[bare]] = ("vision_tower", file_key)
        else:
            mapping.unexpected.append(f"vision_tower/{file_key}")

    # context_provider/: one adapter per tower layer.
    for file_key in layout.weights["context_provider"].keys():
        rest = _strip(file_key, _ADAPTER_PREFIX)
        index, _, name = rest.partition(".")
        target = f"vision.adapters.{index}.{_GATE_NAMES.get(name, name)}"
        if file_key.startswith(_ADAPTER_PREFIX) and index.isdigit() and target in targets:
            mapping.sources[target] = ("context_provider", file_key)
        else:
            mapping.unexpected.append(f"context_provider/{file_key}")

    # mm_projector/: layers.{1,2,4} of the Sequential.
    for file_key in layout.weights["mm_projector"].keys():
        index, _, name = _strip(file_key, "layers.").partition(".")
        target = f"projector.{index}.{name}"
        known = index.isdigit() and int(index) in _PROJECTOR_INDICES and target in targets
        if file_key.startswith("layers.") and known:
            mapping.sources[target] = ("mm_projector", file_key)
        else:
            mapping.unexpected.append(f"mm_projector/{file_key}")

    # llm/: the causal LM's own keys (rotary caches of old checkpoints are recomputed).
    for file_key in layout.weights["llm"].keys():
        target = f"language_model.{file_key}"
        if target in targets:
            mapping.sources[target] = ("llm", file_key)
        elif not file_key.endswith("rotary_emb.inv_freq"):
            mapping.unexpected.append(f"llm/{file_key}")

    zero_init_output = layout.context_config.get("zero_init_output", True)
    tied = bool(getattr(config.text_config, "tie_word_embeddings", False))
    names = {id(module): name for name, module in model.named_modules()}
    unused = tuple(f"{names[id(module)]}." for module in model.vision.unused_modules())
    for key in sorted(targets - set(mapping.sources)):
        gate = key.rsplit(".", 1)[-1] in _GATE_NAMES.values()
        if gate and not zero_init_output:
            mapping.fill[key] = 1.0  # the reference's plain residual without factors
        elif key.startswith(unused):
            mapping.fill[key] = 0.0  # never run: the features come from an earlier layer
        elif tied and key == "language_model.lm_head.weight":
            continue
        else:
            mapping.missing.append(_source_name(key))
    return mapping


def _source_name(model_key: str) -> str:
    """Where the released layout keeps the weight the model calls `model_key`."""
    if model_key.startswith("vision.adapters."):
        index, _, name = model_key[len("vision.adapters."):].partition(".")
        reverse = {ours: theirs for theirs, ours in _GATE_NAMES.items()}
        return f"context_provider/{_ADAPTER_PREFIX}{index}.{reverse.get(name, name)}"
    if model_key.startswith("vision.mask_patch_embedding."):
        return f"vision_tower/{_SIGLIP_PREFIX}{_MASK_EMBEDDING}{model_key.rsplit('.', 1)[-1]}"
    if model_key.startswith("vision.tower."):
        return f"vision_tower/{_SIGLIP_PREFIX}{_strip(model_key[len('vision.tower.'):], _SIGLIP_PREFIX)}"
    if model_key.startswith("projector."):
        return f"mm_projector/layers.{model_key[len('projector.'):]}"
    return f"llm/{model_key[len('language_model.'):]}"


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")


def _load_weights(model: DamForConditionalGeneration, layout: _Layout) -> None:
    mapping = _map_weights(model, layout)
    problems = []
    if mapping.missing:
        problems.append(f"{len(mapping.missing)} weights are missing ({_listing(mapping.missing)})")
    if mapping.unexpected:
        unexpected = mapping.unexpected
        problems.append(f"{len(unexpected)} weights are not part of the released DAM ({_listing(unexpected)})")
    state = model.state_dict()
    mismatched = []
    for key, (part, file_key) in mapping.sources.items():
        shape, target = layout.weights[part].shape_of(file_key), tuple(state[key].shape)
        gate = key.rsplit(".", 1)[-1] in _GATE_NAMES.values()
        if shape != target and not (gate and math.prod(shape) == math.prod(target)):
            mismatched.append(f"{part}/{file_key} {shape} vs {target}")
    if mismatched:
        problems.append(f"{len(mismatched)} weights have other shapes than the config implies ({_listing(mismatched)})")
    if problems:
        raise DamInputError(f"{layout.root} cannot be converted exactly: " + "; ".join(problems))
    with torch.no_grad():  # one tensor in memory at a time besides the model
        for key, (part, file_key) in mapping.sources.items():
            state[key].copy_(layout.weights[part].get(file_key).reshape(state[key].shape))
        for key, value in mapping.fill.items():
            state[key].fill_(value)


def convert_nvlabs_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike | None = None,
    dtype: torch.dtype | str | None = None,
    variant: Variant = "auto",
    overwrite: bool = False,
) -> tuple[DamForConditionalGeneration, PreTrainedTokenizerFast]:
    """Convert a released NVlabs DAM folder into this toolkit's model and tokenizer.

    `dtype` (None: as stored, float16 for the released weights) is the model's dtype. `variant`
    picks the default queries ("auto": by name, see the module docstring). With `dst`, the result
    is also written there as a normal checkpoint (config.json, safetensors, tokenizer), atomically;
    an existing non-empty `dst` is refused unless `overwrite`.
    """
    if variant not in VARIANTS:
        raise DamInputError(f"variant={variant!r} is not one of {', '.join(VARIANTS)}")
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise DamInputError(f"unknown dtype {dtype!r}: use float16, bfloat16 or float32")
        dtype = resolved
    destination = Path(dst) if dst is not None else None
    if destination is not None and destination.exists() and any(destination.iterdir()) and not overwrite:
        raise DamInputError(f"{destination} exists and is not empty: choose a new output folder or allow overwriting")
    layout = _read_layout(src)
    chosen = detect_variant(layout.root, layout.config) if variant == "auto" else variant
    logger.info("converting %s: %s checkpoint (variant=%s)", layout.root, chosen, variant)
    tokenizer = build_sentencepiece_tokenizer(layout.root / "llm")
    config = _dam_config(layout, tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), chosen)
    dtype = dtype or _stored_dtype(layout)
    # Built directly in `dtype` through transformers' own dtype argument (which sets torch's
    # default dtype only while it builds, as from_pretrained does) and without random
    # initialisation: every weight is loaded below.
    with no_init_weights():
        model = DamForConditionalGeneration._from_config(config, **{_DTYPE_ARGUMENT: dtype})
    _load_weights(model, layout)
    model.eval()
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    for name, value in GENERATION_DEFAULTS.items():
        setattr(generation, name, value)
    model.tokenizer = tokenizer
    if destination is not None:
        _save_atomically(model, destination)
    return model, tokenizer


def _save_atomically(model: DamForConditionalGeneration, destination: Path) -> None:
    """save_pretrained into a sibling temporary folder, then move it into place."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        model.save_pretrained(staging)
        if destination.exists():
            shutil.rmtree(destination)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("wrote %s", destination)
