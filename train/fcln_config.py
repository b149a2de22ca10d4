"""The FCLN training config: one dataclass tree that is the YAML schema, the CLI and the Python API.

    dam-train fcln --config configs/train/fcln/vgg16_vg.yaml training.output_dir=runs/densecap

Sections: `data` (Visual Genome files and the paper's preprocessing), `model` (FclnConfig fields
and optional ImageNet weights), `optim` (Adam for the heads, SGD with momentum for the CNN after
it has been frozen for an epoch), `training` (iterations, checkpoints, validation) and
`evaluation` (the predictions file for `dam-bench densecap`). Defaults follow the DenseCap paper
(Johnson et al., CVPR 2016, section 4) and, where the paper is silent, its released Torch code
(jcjohnson/densecap train_opts.lua); each field says which. Relative paths are relative to the
directory the command runs in. tests/test_train_fcln.py loads every YAML under
configs/train/fcln/ against these classes.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dam.configio import ConfigError, apply_overrides, from_dict, read_yaml
from dam.errors import DamInputError
from dam.fcln import FclnConfig
from dam.fcln.evaluation import PAPER_MAX_WORDS

logger = logging.getLogger(__name__)

# Fields of FclnConfig that the data decides: the vocabulary is built from the training split.
_DATA_DERIVED = ("vocabulary", "vocab_size")


@dataclass
class FclnDataConfig:
    """Visual Genome region descriptions, where the images are, and the paper's preprocessing."""

    region_descriptions: str = ""
    """VG's region_descriptions.json (a list of {"id", "regions": [{"phrase", "x", "y", "width", "height"}]})."""
    image_dirs: list[str] = field(default_factory=list)
    """Folders searched for each image, in order. Empty: the folders images/, VG_100K/ and VG_100K_2/
    beside region_descriptions that exist (VG ships its images split over the last two)."""
    image_patterns: list[str] = field(default_factory=lambda: ["{image_id}.jpg", "{image_id}.png"])
    """File names tried for each image in each folder; "{image_id}" is replaced by the image's id."""
    image_data: str | None = None
    """VG's image_data.json ([{"image_id", "width", "height"}]): the frame the boxes are given in.
    None: image_data.json beside region_descriptions when it exists, else each file's own size."""
    split_file: str | None = None
    """A JSON {"train": [ids], "val": [ids], "test": [ids]} (DenseCap's densecap_splits.json has this
    form). None: a seeded shuffle of the kept images into num_test / num_val / num_train."""
    num_train: int | None = None
    """Training images when splitting by shuffle (None: all images not in val or test; the paper: 77,398)."""
    num_val: int = 5000
    """Validation images when splitting by shuffle (the paper: 5,000)."""
    num_test: int = 5000
    """Test images when splitting by shuffle (the paper: 5,000)."""
    split_seed: int = 0
    """Seed of that shuffle; the same seed and images give the same split on every machine."""
    max_words: int = PAPER_MAX_WORDS
    """Regions whose phrase has more words are dropped (the paper: 10)."""
    min_word_count: int = 15
    """Words seen fewer times in the training split become <unk> (the paper: 15)."""
    min_regions_per_image: int | None = 20
    """Images with fewer kept regions are dropped (the paper: 20; None: no minimum)."""
    max_regions_per_image: int | None = 50
    """Images with more kept regions are dropped (the paper: 50; None: no maximum)."""
    max_images: int | None = None
    """Read only the first N images of region_descriptions (for quick trials)."""
    num_workers: int = 2
    """DataLoader processes decoding and resizing images ahead of the training step."""


@dataclass
class FclnModelConfig:
    """The network: FclnConfig fields plus where ImageNet weights come from."""

    fcln: dict[str, Any] = field(default_factory=dict)
    """FclnConfig fields (backbone, anchors, rpn_batch_size, recognition_hidden_size, image_longer_side,
    max_caption_length, loss weights, ...; see dam/fcln/configuration_fcln.py). Not `vocabulary`:
    it is built from the training split and saved into the model's config."""
    backbone_weights: str | None = None
    """A local torchvision ImageNet state dict for the backbone (vgg16-397923af.pth, resnet50-0676ba61.pth);
    with VGG-16 its fc6/fc7 also start the recognition network. None: random weights."""


@dataclass
class FclnOptimConfig:
    """Two optimizers as in the paper: Adam for everything but the CNN, SGD with momentum for the CNN."""

    learning_rate: float = 1e-5
    """Adam's learning rate for the localization layer, recognition network and LSTM (the released
    code: 1e-5; the paper's text says 1e-6)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam's (beta1, beta2) (the released code: 0.9, 0.999; the paper's text: 0.9, 0.99)."""
    eps: float = 1e-8
    """Adam's epsilon (the released code)."""
    weight_decay: float = 1e-6
    """L2 penalty added to the gradients of the Adam parameters (the released code: 1e-6)."""
    cnn_optimizer: Literal["sgd", "adam"] = "sgd"
    """"sgd": SGD with momentum, as the paper; "adam": Adam with the settings above and cnn_learning_rate,
    as the released code did."""
    cnn_learning_rate: float = 1e-5
    """Learning rate of the CNN's trainable convolutions once fine-tuning starts (the paper names one
    learning rate for the whole model)."""
    cnn_momentum: float = 0.9
    """SGD momentum of the CNN (the paper: 0.9)."""
    cnn_weight_decay: float = 1e-6
    """L2 penalty on the CNN's trainable weights."""
    finetune_cnn: bool = True
    """Train the CNN at all (its first model.fcln.frozen_backbone_convs convs never train: the paper
    keeps conv1_1..conv2_2 of VGG-16 fixed)."""
    cnn_frozen_epochs: float = 1.0
    """Epochs before the CNN starts training (the paper: 1); the heads train alone until then."""
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this (None: no clipping, as the paper)."""


@dataclass
class FclnTrainingConfig:
    """Iterations, checkpoints and validation; one image per iteration, as in the paper."""

    output_dir: str = "runs/fcln"
    """Holds preprocessed/ (the cached split), checkpoint-N/, final/ and eval/."""
    num_epochs: float = 10.0
    """Passes over the training split (the paper trained about three days, roughly ten epochs)."""
    max_iterations: int = -1
    """Iterations (images) to train when > 0; overrides num_epochs."""
    seed: int = 123
    """Seed of the weights, the data order and the box sampling (the released code: 123)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """"auto": the first CUDA GPU when there is one, else the CPU."""
    cpu_threads: int | None = None
    """torch's intra-op CPU threads (None: torch's default, one per core). Small models train faster on
    one thread: more only add synchronisation, and on a busy machine they wait on each other."""
    save_every: int = 1000
    """Write checkpoint-N every this many iterations (and at the last one)."""
    keep_checkpoints: int | None = 3
    """Keep only the newest N checkpoints (None: all)."""
    val_every: int = 1000
    """Mean loss over the first val_images validation images every this many iterations (0: never)."""
    val_images: int = 100
    """Validation images per validation pass (the released code: 100)."""
    log_every: int = 10
    """Record the loss parts every this many iterations (loss_history.json, the progress bar)."""
    progress: bool = True
    """Show a progress bar (iterations/s and the loss parts)."""


@dataclass
class FclnEvaluationConfig:
    """Dense captions of a held-out split, written for `dam-bench densecap`."""

    split: Literal["test", "val"] = "test"
    """The split to caption."""
    after_training: bool = True
    """Run the evaluation when training finishes."""
    max_images: int | None = None
    """Caption only the first N images of the split (None: all)."""
    max_regions: int | None = None
    """Regions kept per image, best first (None: all that survive the final NMS, as DenseCap's evaluation)."""
    score_threshold: float | None = None
    """Drop regions scoring below this (None: keep all)."""


@dataclass
class FclnTrainConfig:
    data: FclnDataConfig = field(default_factory=FclnDataConfig)
    model: FclnModelConfig = field(default_factory=FclnModelConfig)
    optim: FclnOptimConfig = field(default_factory=FclnOptimConfig)
    training: FclnTrainingConfig = field(default_factory=FclnTrainingConfig)
    evaluation: FclnEvaluationConfig = field(default_factory=FclnEvaluationConfig)

    def validate(self) -> "FclnTrainConfig":
        """Checks across keys that types alone cannot express; returns self."""
        data, optim, training = self.data, self.optim, self.training
        if not data.region_descriptions:
            raise ConfigError(
                "data.region_descriptions is not set: give the path of Visual Genome's region_descriptions.json"
            )
        for pattern in data.image_patterns:
            if "{image_id}" not in pattern:
                raise ConfigError(
                    f"data.image_patterns: {pattern!r} lacks '{{image_id}}'; e.g. '{{image_id}}.jpg'"
                )
        if not data.image_patterns:
            raise ConfigError("data.image_patterns is empty; list at least one, e.g. ['{image_id}.jpg']")
        positive = {
            "data.max_words": data.max_words, "data.min_word_count": data.min_word_count,
            "training.save_every": training.save_every, "training.log_every": training.log_every,
            "training.val_images": training.val_images,
        }
        if training.cpu_threads is not None:
            positive["training.cpu_threads"] = training.cpu_threads
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        for key, value in {"data.num_val": data.num_val, "data.num_test": data.num_test,
                           "data.num_workers": data.num_workers, "training.val_every": training.val_every}.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0, got {value}")
        low, high = data.min_regions_per_image, data.max_regions_per_image
        if low is not None and high is not None and low > high:
            raise ConfigError(
                f"data.min_regions_per_image={low} exceeds data.max_regions_per_image={high}; no image could pass"
            )
        if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {optim.betas}")
        for key in ("learning_rate", "cnn_learning_rate"):
            if not getattr(optim, key) > 0:
                raise ConfigError(f"optim.{key} must be positive, got {getattr(optim, key)}")
        if optim.cnn_frozen_epochs < 0:
            raise ConfigError(f"optim.cnn_frozen_epochs must be >= 0, got {optim.cnn_frozen_epochs}")
        if training.num_epochs <= 0 and training.max_iterations <= 0:
            raise ConfigError("set training.num_epochs > 0 or training.max_iterations > 0")
        self.fcln_config(["<placeholder>"])  # the model section's errors surface before any data is read
        return self

    def fcln_config(self, vocabulary: list[str]) -> FclnConfig:
        """The FclnConfig of `model.fcln` with `vocabulary`; unknown or bad fields raise ConfigError."""
        accepted = [name for name in inspect.signature(FclnConfig.__init__).parameters
                    if name not in ("self", "kwargs", *_DATA_DERIVED)]
        for name in self.model.fcln:
            if name in _DATA_DERIVED:
                raise ConfigError(
                    f"model.fcln.{name} cannot be set: the vocabulary is built from the training split "
                    "(see data.min_word_count) and saved into the model's config"
                )
            if name not in accepted:
                close = difflib.get_close_matches(str(name), accepted, n=1)
                hint = f" (did you mean 'model.fcln.{close[0]}'?)" if close else ""
                raise ConfigError(f"unknown config key 'model.fcln.{name}'{hint}; model.fcln accepts: {', '.join(accepted)}")
        try:
            return FclnConfig(**self.model.fcln, vocabulary=vocabulary)
        except DamInputError as error:
            raise ConfigError(f"model.fcln: {error}") from None
        except TypeError as error:  # a value of the wrong kind deep in FclnConfig (e.g. a string for a size)
            raise ConfigError(f"model.fcln: {error}") from None


def load_fcln_config(path: str | Path | None, overrides: list[str] | None = None) -> FclnTrainConfig:
    """The FclnTrainConfig of a YAML file (None: defaults) with `key.sub=value` overrides applied."""
    data = read_yaml(path, "configs/train/fcln/") if path is not None else {}
    return from_dict(FclnTrainConfig, apply_overrides(data, list(overrides or []))).validate()
