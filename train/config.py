"""The training config: one dataclass tree that is the YAML schema, the CLI and the Python API.

    dam-train --config configs/train/dam_3b_image.yaml training.learning_rate=5e-5

Every YAML under configs/train/ is loaded against these classes by a test. Relative paths in a
config are relative to the directory the command runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from train.augment import PromptAugmentation
from dam.configio import ConfigError, apply_overrides, from_dict, read_yaml

Trainable = Literal["full", "frozen"]


@dataclass
class ModelConfig:
    """Where the model comes from: a DAM checkpoint, or a SigLIP tower + an LLM to join."""

    checkpoint: str | None = None
    """A DAM checkpoint folder (this toolkit's format) to fine-tune further."""
    vision: str | None = None
    """A SigLIP vision model folder (used with `llm` to build a new DAM)."""
    llm: str | None = None
    """A causal LM folder (Llama, Qwen2, ...); its tokenizer is used unless `tokenizer` is set."""
    tokenizer: str | None = None
    """A tokenizer folder overriding the LLM's (or the checkpoint's)."""
    random_init: bool = False
    """Build `vision` and `llm` from their config.json with random weights (training from scratch)."""
    vision_position_init: Literal["random", "sincos"] = "random"
    """With `random_init`: start the tower's (learned) position embeddings at random values, or at a
    fixed 2D sine-cosine code of the patch grid, the structure a pretrained SigLIP's have. DAM's
    regional tokens learn where the region is only through the global tokens' position content."""
    vision_position_scale: float = 1.0
    """Amplitude of the sine-cosine code (`vision_position_init: sincos`). From scratch the tower's
    residual stream grows to several times the code's size by its last layer; a larger code keeps
    the position readable in the global tokens the cross-attention reads."""
    dam: dict[str, Any] = field(default_factory=dict)
    """DamConfig fields of a new DAM: projector_type, gate_type, prompt_template, focal_alpha, ..."""


@dataclass
class DatasetConfig:
    """One training dataset in the schema of `dam.schema` (parquet shards)."""

    path: str
    """A parquet file or a folder of parquet shards (written by `dam-data`)."""
    weight: float = 1.0
    """Share of each epoch: rows repeat `weight` times (fractions take a seeded random subset)."""
    root: str | None = None
    """Folder that relative image/video paths are resolved against (default: the `image_root` in the
    dataset folder's manifest.json when `dam-data merge` wrote one, else the dataset's folder)."""


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    """The datasets to mix."""
    augmentation: PromptAugmentation = field(default_factory=PromptAugmentation)
    """How the query is phrased for each training row."""
    max_length: int = 2048
    """Longer sequences lose the end of their caption (the prompt is never cut)."""
    padding_side: Literal["right", "left"] = "right"
    """Padding of the collated batch; position ids follow the real tokens either way."""
    group_by_length: bool = True
    """Batch rows of similar length together (less padding), in a seeded order."""
    num_workers: int = 4
    """DataLoader worker processes decoding images."""


@dataclass
class FreezeConfig:
    """Which parts train ("full") and which stay fixed ("frozen"); the LLM may also take LoRA."""

    vision_tower: Trainable = "full"
    mask_embedding: Trainable = "full"
    vision_position_embedding: Trainable | None = None
    """The tower's position embeddings alone (frozen keeps a sine-cosine start as it is); unset,
    they follow `vision_tower`."""
    adapters: Trainable = "full"
    projector: Trainable = "full"
    llm: Literal["full", "frozen", "lora"] = "full"

    def setting(self, component: str) -> str:
        """The setting of one component (a field name)."""
        value = getattr(self, component)
        return self.vision_tower if value is None else value


@dataclass
class LoraConfig:
    """peft LoRA on the LLM (used when freeze.llm is "lora"); merged into the weights on save."""

    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class TrainingConfig:
    output_dir: str = "runs/dam"
    """Checkpoints go to output_dir/checkpoint-N, the final model to output_dir/final."""
    num_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps to run (overrides num_epochs when > 0)."""
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: Literal["cosine", "linear", "constant_with_warmup"] = "cosine"
    max_grad_norm: float = 1.0
    bf16: bool = True
    gradient_checkpointing: bool = False
    deepspeed: str | None = None
    """A DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json, zero3_offload.json); none: DDP."""
    save_steps: int = 500
    save_total_limit: int | None = None
    logging_steps: int = 10
    seed: int = 42
    use_cpu: bool = False
    """Train on CPU (tests, smoke runs); several CPU processes talk over gloo."""
    report_to: list[str] = field(default_factory=list)
    """Trackers for transformers' Trainer: tensorboard, wandb, ... (none by default)."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)

    def validate(self) -> "TrainConfig":
        """Checks across keys that types alone cannot express; returns self."""
        model = self.model
        if model.checkpoint and (model.vision or model.llm):
            raise ConfigError("set model.checkpoint or model.vision + model.llm, not both")
        if not model.checkpoint and not (model.vision and model.llm):
            raise ConfigError(
                "no model given: set model.checkpoint (a DAM folder) or model.vision and model.llm "
                "(a SigLIP folder and a causal LM folder)"
            )
        if model.vision_position_scale <= 0:
            raise ConfigError(f"model.vision_position_scale must be > 0, got {model.vision_position_scale}")
        if model.vision_position_scale != 1.0 and model.vision_position_init != "sincos":
            raise ConfigError("model.vision_position_scale scales the sine-cosine code: set model.vision_position_init: sincos")
        if model.checkpoint and model.dam:
            raise ConfigError("model.dam configures a new DAM; a checkpoint brings its own config (remove model.dam)")
        if not self.data.datasets:
            raise ConfigError("data.datasets is empty: list at least one dataset (path: a folder of parquet shards)")
        for index, dataset in enumerate(self.data.datasets):
            if dataset.weight <= 0:
                raise ConfigError(f"data.datasets.{index}.weight must be > 0, got {dataset.weight}")
        deepspeed = self.training.deepspeed
        if deepspeed and not Path(deepspeed).is_file():
            raise ConfigError(f"training.deepspeed: {deepspeed!r} does not exist (see configs/deepspeed/)")
        for name in ("per_device_batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps", "max_length"):
            section = self.data if name == "max_length" else self.training
            if getattr(section, name) < 1:
                raise ConfigError(f"{'data' if section is self.data else 'training'}.{name} must be >= 1")
        return self


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    """The TrainConfig of a YAML file (None: defaults) with `key.sub=value` overrides applied."""
    data = read_yaml(path, "configs/train/") if path is not None else {}
    return from_dict(TrainConfig, apply_overrides(data, list(overrides or []))).validate()
