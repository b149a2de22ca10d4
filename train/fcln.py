"""Training the DenseCap FCLN on Visual Genome: `dam-train fcln --config ...`.

    dam-train fcln --config configs/train/fcln/vgg16_vg.yaml training.output_dir=runs/densecap
    dam-train fcln --config configs/train/fcln/vgg16_vg.yaml training.output_dir=runs/densecap --resume
    dam-train fcln --config configs/train/fcln/vgg16_vg.yaml training.output_dir=runs/densecap --eval-only
    dam-bench densecap --gt runs/densecap/eval/test_region_descriptions.json \\
        --pred runs/densecap/eval/final_test_predictions.json

CPU smoke run (about a minute): `dam-data synthetic --format visual-genome --num-images 200 --out
data/shapes_vg`, then `dam-train fcln --config configs/train/fcln/tiny_shapes.yaml`.

What the paper prescribes (Johnson et al., CVPR 2016, section 3.4) and this does:
- one image per iteration, resized to a longer side of 720 (FclnImageProcessor);
- Adam for the localization layer, recognition network and language model; the CNN's trainable
  convolutions are frozen for the first epoch and then trained with SGD with momentum 0.9 (its
  first four convs never train); learning rates and the rest are config values (train.fcln_config);
- a validation loss every `val_every` iterations, on a fixed subset, with its own RNG so it does
  not change the training;
- checkpoint-N/ every `save_every` iterations: the model (save_pretrained), both optimizers, the
  iteration, the RNG states and the loss history, written to a hidden folder and renamed, so a
  folder named checkpoint-N is always complete. The data order is a function of the iteration
  (train.fcln_data.IterationSampler), so a resumed run continues exactly where the checkpoint
  left off; on the CPU it reproduces the uninterrupted run's weights bit for bit;
- final/: the trained model, whose config carries the vocabulary (FclnModel.from_pretrained
  decodes captions on its own); then, unless disabled, dense captions of the test split in
  eval/, scored by `dam-bench densecap` (this package may not import `bench`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dam.configio import ConfigError, to_dict
from dam.errors import DamInputError
from dam.fcln import FclnImageProcessor, FclnModel, FclnOutput
from dam.fcln.evaluation import PredictionCheckpoint, prediction_record
from dam.fingerprint import model_identity
from dam.jsonio import write_json_atomic
from train.fcln_config import FclnTrainConfig, load_fcln_config
from train.fcln_data import (
    FclnExample,
    FclnImageDataset,
    FclnPreprocessed,
    IterationSampler,
    load_or_preprocess,
    split_ground_truth,
    unbatched,
)

logger = logging.getLogger(__name__)

FINAL_DIR = "final"
EVAL_DIR = "eval"
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.pt"
_EXIT_USER_ERROR = 2
# Short names of the loss parts for the progress bar.
_SHORT = {"objectness_loss": "obj", "anchor_box_loss": "abox", "final_score_loss": "fscore",
          "final_box_loss": "fbox", "caption_loss": "cap"}


# -- model and optimizers ------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("training.device is 'cuda' but no CUDA GPU is visible; use 'cpu' or 'auto'")
    return torch.device(name)


def build_model(config: FclnTrainConfig, vocabulary: list[str]) -> FclnModel:
    """A new FclnModel with the data's vocabulary, seeded, ImageNet weights loaded when given."""
    torch.manual_seed(config.training.seed)
    weights = config.model.backbone_weights
    return FclnModel(config.fcln_config(vocabulary), backbone_weights=weights)


def cnn_parameters(model: FclnModel) -> list[nn.Parameter]:
    """The backbone's trainable parameters (the convs after the frozen ones): what the paper's SGD trains.

    Read right after the model is built, before `FclnOptimizers` switches their gradients off.
    """
    return [p for p in model.backbone.parameters() if p.requires_grad]


class FclnOptimizers:
    """Adam for the heads, SGD with momentum (or Adam) for the CNN, and the CNN's on/off switch."""

    def __init__(self, model: FclnModel, config: FclnTrainConfig) -> None:
        optim = config.optim
        self.cnn_params = cnn_parameters(model)
        cnn_ids = {id(p) for p in self.cnn_params}
        self.head_params = [p for p in model.parameters() if p.requires_grad and id(p) not in cnn_ids]
        self.heads = torch.optim.Adam(self.head_params, lr=optim.learning_rate, betas=tuple(optim.betas),
                                      eps=optim.eps, weight_decay=optim.weight_decay)
        if optim.cnn_optimizer == "sgd":
            self.cnn: torch.optim.Optimizer | None = torch.optim.SGD(
                self.cnn_params, lr=optim.cnn_learning_rate, momentum=optim.cnn_momentum,
                weight_decay=optim.cnn_weight_decay,
            )
        else:
            self.cnn = torch.optim.Adam(self.cnn_params, lr=optim.cnn_learning_rate, betas=tuple(optim.betas),
                                        eps=optim.eps, weight_decay=optim.cnn_weight_decay)
        if not self.cnn_params:  # e.g. frozen_backbone_convs covers every conv
            self.cnn = None
        self.cnn_trainable = True
        self.set_cnn_trainable(False)

    def set_cnn_trainable(self, trainable: bool) -> None:
        """Switch the CNN's gradients: while frozen, backward stops at the localization layer."""
        if trainable != self.cnn_trainable:
            for parameter in self.cnn_params:
                parameter.requires_grad_(trainable)
            self.cnn_trainable = trainable

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict(), "cnn": self.cnn.state_dict() if self.cnn is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.heads.load_state_dict(state["heads"])
        if self.cnn is not None and state["cnn"] is not None:
            self.cnn.load_state_dict(state["cnn"])


def total_iterations(config: FclnTrainConfig, num_train: int) -> int:
    training = config.training
    return training.max_iterations if training.max_iterations > 0 else math.ceil(training.num_epochs * num_train)


def cnn_start_iteration(config: FclnTrainConfig, num_train: int) -> int | None:
    """The first iteration (0-based) that trains the CNN; None when it never trains."""
    if not config.optim.finetune_cnn:
        return None
    return round(config.optim.cnn_frozen_epochs * num_train)


def _targets(example: FclnExample, device: torch.device) -> list[dict[str, torch.Tensor]]:
    return [{"boxes": example.boxes.to(device), "captions": example.captions.to(device)}]


def train_step(model: FclnModel, example: FclnExample, optimizers: FclnOptimizers, device: torch.device,
               max_grad_norm: float | None) -> FclnOutput:
    """Forward and backward on one image, then one step of each active optimizer."""
    output = model(example.pixels[None].to(device), _targets(example, device))
    output.loss.backward()
    if max_grad_norm is not None:
        nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
    optimizers.heads.step()
    if optimizers.cnn is not None and optimizers.cnn_trainable:
        optimizers.cnn.step()
    model.zero_grad(set_to_none=True)
    return output


@torch.no_grad()
def validation_loss(model: FclnModel, dataset: FclnImageDataset, num_images: int, seed: int,
                    device: torch.device) -> dict[str, float]:
    """Mean loss and loss parts over the first `num_images` images, in eval mode (no dropout).

    Box sampling draws random numbers; a forked RNG seeded the same every time makes the value
    comparable across validations and leaves the training's random stream untouched.
    """
    totals: dict[str, float] = {}
    count = 0
    was_training = model.training
    model.eval()
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for index in range(min(num_images, len(dataset))):
            example = dataset[index]
            if example.pixels is None:
                continue
            output = model(example.pixels[None].to(device), _targets(example, device))
            parts = {"loss": float(output.loss), **output.loss_parts()}
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            count += 1
    model.train(was_training)
    return {key: value / count for key, value in totals.items()} if count else {}


# -- checkpoints ---------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoint-N folders, oldest first (a folder only gets its name once complete)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and suffix.isdigit() and (path / STATE_FILE).is_file():
            found.append((int(suffix), path))
    return sorted(found)


def resume_checkpoint(output_dir: str | Path, resume: bool | str) -> Path | None:
    """The checkpoint to resume from: `resume` True (the newest; one must exist), "auto" (the newest
    if any) or a checkpoint folder. Without `resume`, refuses to start over an existing run."""
    checkpoints = list_checkpoints(output_dir)
    last = checkpoints[-1][1] if checkpoints else None
    if resume == "auto":
        return last
    if resume is True or resume == "latest":
        if last is None:
            raise ConfigError(f"--resume: no complete checkpoint-N folder in training.output_dir={str(output_dir)!r}")
        return last
    if resume:
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise ConfigError(f"--resume: {str(resume)!r} is not a complete FCLN checkpoint folder (no {STATE_FILE})")
        return path
    existing = last or (Path(output_dir) / FINAL_DIR if (Path(output_dir) / FINAL_DIR).is_dir() else None)
    if existing is not None:
        raise ConfigError(
            f"training.output_dir={str(output_dir)!r} already holds {existing.name}: pass --resume to continue "
            "that run, or choose another output_dir"
        )
    return None


def _rng_state(device: torch.device) -> dict[str, Any]:
    # Only torch's generators matter: box sampling and dropout draw from them; the data order is
    # a function of the iteration and the DataLoader has its own generator.
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _replace_folder(partial: Path, target: Path) -> None:
    """Move a finished `partial` folder to `target` (replacing an older one) by renaming."""
    if target.exists():
        stale = target.with_name(f".{target.name}.old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        os.replace(partial, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, target)


def save_checkpoint(output_dir: Path, iteration: int, model: FclnModel, optimizers: FclnOptimizers,
                    progress: dict[str, Any], device: torch.device, keep: int | None) -> Path:
    """Write checkpoint-`iteration` atomically, then drop checkpoints beyond the newest `keep`."""
    target = output_dir / f"{CHECKPOINT_PREFIX}{iteration}"
    partial = output_dir / f".{target.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    state = {"iteration": iteration, "optimizers": optimizers.state_dict(), "rng": _rng_state(device), **progress}
    torch.save(state, partial / STATE_FILE)
    _replace_folder(partial, target)
    logger.info("checkpoint written: %s", target)
    if keep is not None:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _clean_partials(output_dir: Path) -> None:
    """Folders a killed run left half-written or half-replaced (never read: only named folders count)."""
    for pattern in (".*.partial", ".*.old"):
        for path in output_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


# -- training ------------------------------------------------------------------------------------


def _check_vocabulary(model: FclnModel, data: FclnPreprocessed, checkpoint: Path) -> None:
    if list(model.config.vocabulary or []) != list(data.vocabulary):
        raise ConfigError(
            f"{checkpoint} was trained with another vocabulary than the preprocessed data's; resume with the "
            "run's original data section, or start a new training.output_dir"
        )


def _data_loader(dataset: FclnImageDataset, sampler: Any, num_workers: int) -> DataLoader:
    # A private generator: creating a loader iterator would otherwise draw from the global RNG, and
    # a resumed run creates its iterator at another point of the random stream than the original.
    return DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers, collate_fn=unbatched,
                      generator=torch.Generator())


def run_fcln_training(config: FclnTrainConfig, resume: bool | str = False) -> Path:
    """Train as configured (see the module docstring); returns the folder of the final model."""
    training = config.training
    output_dir = Path(training.output_dir)
    checkpoint = resume_checkpoint(output_dir, resume)
    data = load_or_preprocess(config.data, output_dir, must_match=checkpoint is not None, progress=training.progress)
    device = resolve_device(training.device)
    if training.cpu_threads is not None:
        torch.set_num_threads(training.cpu_threads)
    if checkpoint is None:
        model = build_model(config, data.vocabulary)
    else:
        model = FclnModel.from_pretrained(checkpoint)
        _check_vocabulary(model, data, checkpoint)
    model.to(device).train()
    optimizers = FclnOptimizers(model, config)
    train_split = data.splits["train"]
    num_train = len(train_split)
    total = total_iterations(config, num_train)
    cnn_start = cnn_start_iteration(config, num_train)
    progress: dict[str, Any] = {"loss_history": [], "val_history": [], "skipped_images": 0}
    start = 0
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
        start = int(state["iteration"])
        if start > total:
            raise ConfigError(
                f"{checkpoint} is at iteration {start}, past this config's {total} iterations; raise "
                "training.max_iterations or training.num_epochs to continue it"
            )
        progress = {key: state[key] for key in progress}
        optimizers.set_cnn_trainable(cnn_start is not None and start >= cnn_start)
        optimizers.load_state_dict(state["optimizers"])
        _set_rng_state(state["rng"], device)
        logger.info("resuming from %s at iteration %d of %d", checkpoint, start, total)
    output_dir.mkdir(parents=True, exist_ok=True)
    _clean_partials(output_dir)
    write_json_atomic(output_dir / "train_config.json", to_dict(config))
    logger.info("training on %s: %d images, %d iterations, CNN trained from iteration %s, %d parameters",
                device, num_train, total, cnn_start, sum(p.numel() for p in model.parameters()))

    processor = FclnImageProcessor.from_config(model.config)
    train_set = FclnImageDataset(train_split, processor)
    val_set = FclnImageDataset(data.splits["val"], processor)
    loader = _data_loader(train_set, IterationSampler(num_train, training.seed, start, total),
                          config.data.num_workers)
    bar = tqdm(total=total, initial=start, desc="fcln", unit="it", dynamic_ncols=True, disable=not training.progress)
    iteration = start
    last_saved = start if checkpoint is not None else None
    for example in loader:
        optimizers.set_cnn_trainable(cnn_start is not None and iteration >= cnn_start)
        if example.pixels is None:
            progress["skipped_images"] += 1
            logger.warning("iteration %d skipped: %s", iteration, example.error)
        else:
            output = train_step(model, example, optimizers, device, config.optim.max_grad_norm)
            loss = float(output.loss.detach())
            if not math.isfinite(loss):
                raise DamInputError(
                    f"the training loss became {loss} at iteration {iteration} (image {example.image_id!r}); "
                    "lower optim.learning_rate / optim.cnn_learning_rate or set optim.max_grad_norm, then --resume"
                )
            if iteration % training.log_every == 0:
                parts = output.loss_parts()
                progress["loss_history"].append({"iteration": iteration, "loss": loss, **parts})
                bar.set_postfix({"loss": f"{loss:.3f}", **{_SHORT[k]: f"{v:.3f}" for k, v in parts.items()}},
                                refresh=False)
        iteration += 1
        bar.update(1)
        if training.val_every and (iteration % training.val_every == 0 or iteration == total) and len(val_set):
            values = validation_loss(model, val_set, training.val_images, training.seed, device)
            progress["val_history"].append({"iteration": iteration, **values})
            logger.info("validation loss at iteration %d: %s", iteration,
                        ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
        if iteration % training.save_every == 0 or iteration == total:
            save_checkpoint(output_dir, iteration, model, optimizers, progress, device, training.keep_checkpoints)
            write_json_atomic(output_dir / "loss_history.json", progress)
            last_saved = iteration
    bar.close()
    if last_saved != total:  # a resumed run that had nothing left to do
        save_checkpoint(output_dir, total, model, optimizers, progress, device, training.keep_checkpoints)
    write_json_atomic(output_dir / "loss_history.json", progress)
    final = output_dir / FINAL_DIR
    partial = output_dir / f".{FINAL_DIR}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    _replace_folder(partial, final)
    logger.info("final model written to %s (%d images skipped as unreadable)", final, progress["skipped_images"])
    if config.evaluation.after_training:
        evaluate_fcln(config, final, data=data, model=model)
    return final


# -- evaluation ----------------------------------------------------------------------------------


@dataclass
class FclnEvaluationFiles:
    """What `evaluate_fcln` wrote."""

    predictions: Path
    """[{"image_id", "box": [x1, y1, x2, y2], "score", "caption"}] in the boxes' original pixels."""
    ground_truth: Path
    """The evaluated images' kept regions in VG's region_descriptions.json layout."""
    num_images: int
    num_detections: int


@torch.no_grad()
def evaluate_fcln(config: FclnTrainConfig, model_path: str | Path | None = None, *,
                  data: FclnPreprocessed | None = None, model: FclnModel | None = None) -> FclnEvaluationFiles:
    """Dense captions of the configured split, written for `dam-bench densecap`.

    Writes output_dir/eval/{model folder}_{split}_predictions.json and
    output_dir/eval/{split}_region_descriptions.json (the references: phrases normalised, regions
    longer than data.max_words dropped, as DenseCap evaluates). `model_path` defaults to
    output_dir/final; `data` and `model` skip reloading what the caller already holds.
    Resumable: each image's detections are checkpointed as it is captioned (in a hidden folder
    beside the predictions, removed once they are written), so a rerun skips the images done.
    """
    evaluation, training = config.evaluation, config.training
    output_dir = Path(training.output_dir)
    model_path = Path(model_path) if model_path is not None else output_dir / FINAL_DIR
    if model is None:
        if not (model_path / "config.json").is_file():
            raise ConfigError(
                f"no FCLN model in {str(model_path)!r}: train first (dam-train fcln --config ...) or pass --model "
                "with a final/ or checkpoint-N/ folder"
            )
        model = FclnModel.from_pretrained(model_path).to(resolve_device(training.device))
    if data is None:
        data = load_or_preprocess(config.data, output_dir, progress=training.progress)
    split = data.splits[evaluation.split]
    count = len(split) if evaluation.max_images is None else min(evaluation.max_images, len(split))
    if count == 0:
        raise ConfigError(f"the {evaluation.split} split has no images; set data.num_{evaluation.split} > 0")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eval_dir = output_dir / EVAL_DIR
    predictions_file = eval_dir / f"{model_path.name}_{evaluation.split}_predictions.json"
    # Per-image results are checkpointed beside the predictions file, so that a run killed during
    # the hours a full test split takes resumes at the first image not done; the folder is ours,
    # so one left by another model (or other thresholds) is discarded, not an error.
    checkpoint_dir = eval_dir / f".{predictions_file.stem}.partial"
    settings = {"model": model_identity(model), "split": evaluation.split,
                "max_regions": evaluation.max_regions, "score_threshold": evaluation.score_threshold}
    checkpoint = PredictionCheckpoint(checkpoint_dir, settings, replace_stale=True, what="evaluation")
    done = checkpoint.done()
    todo = [index for index in range(count) if str(split.image_ids[index]) not in done]
    dataset = FclnImageDataset(split, FclnImageProcessor.from_config(model.config))
    loader = _data_loader(dataset, todo, config.data.num_workers)
    for example in tqdm(loader, total=count, initial=count - len(todo), desc=f"captioning {evaluation.split}",
                        unit="img", disable=not training.progress):
        if example.pixels is None:
            logger.warning("image %r not evaluated: %s", example.image_id, example.error)
            continue
        detection = model.generate(example.pixels[None].to(device), evaluation.max_regions,
                                   evaluation.score_threshold)[0]
        sx, sy = example.scale
        height, width = (float(v) for v in split.sizes[example.index])
        boxes = detection.boxes.float().cpu() / torch.tensor([sx, sy, sx, sy])  # (N, 4) in the boxes' frame
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([width, height, width, height]))
        records = [prediction_record(example.image_id, box, score, caption) for box, score, caption
                   in zip(boxes.tolist(), detection.scores.float().tolist(), detection.captions)]
        checkpoint.add([(example.image_id, records)])
    model.train(was_training)
    predictions = checkpoint.predictions(split.image_ids[:count])
    files = FclnEvaluationFiles(
        predictions=predictions_file,
        ground_truth=eval_dir / f"{evaluation.split}_region_descriptions.json",
        num_images=count, num_detections=len(predictions),
    )
    write_json_atomic(files.predictions, predictions)
    write_json_atomic(files.ground_truth, split_ground_truth(split, count))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the predictions file now holds everything
    logger.info("%d detections on %d %s images written to %s; score them with: dam-bench densecap --gt %s --pred %s",
                len(predictions), count, evaluation.split, files.predictions, files.ground_truth, files.predictions)
    return files


# -- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dam-train fcln",
        description="Train the DenseCap FCLN on Visual Genome (resumable), or caption a held-out split with it.",
        epilog="Overrides: key.sub=value after the options, e.g. optim.learning_rate=1e-4 model.fcln.backbone=resnet50. "
        "Score the predictions with: dam-bench densecap --gt OUT/eval/test_region_descriptions.json "
        "--pred OUT/eval/final_test_predictions.json",
    )
    parser.add_argument("--config", required=True, help="YAML config (see configs/train/fcln/)")
    parser.add_argument(
        "--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
        help="continue from the newest complete checkpoint in training.output_dir, or the given checkpoint "
        "folder; 'auto': resume if there is a checkpoint, else start",
    )
    parser.add_argument("--eval-only", action="store_true",
                        help="do not train: caption the evaluation.split with --model and write the predictions")
    parser.add_argument("--model", default=None, help="with --eval-only: the model folder (default: output_dir/final)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(args.resume, str) and "=" in args.resume and not os.path.exists(args.resume):
        args.overrides.insert(0, args.resume)  # `--resume key=value`: an override, not a checkpoint
        args.resume = True
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_fcln_config(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(json.dumps(to_dict(config), indent=2) + "\n")
            return 0
        if args.model is not None and not args.eval_only:
            raise ConfigError("--model goes with --eval-only; to continue training a run use --resume")
        if args.eval_only:
            evaluate_fcln(config, args.model)
        else:
            run_fcln_training(config, resume=args.resume)
    except DamInputError as error:
        sys.stderr.write(f"dam-train fcln: error: {error}\n")
        return _EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
