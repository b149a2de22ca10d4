"""Fine-tuning with transformers' Trainer (DDP, DeepSpeed ZeRO-2/3, offload; bf16; checkpointing).

    run_training(load_config("configs/train/dam_3b_image.yaml"), resume=False)

Launch under `torchrun`, `deepspeed` or `accelerate launch` for several GPUs or nodes; the
Trainer reads the rank variables they set. What this adds to the Trainer:
- the seeded length-grouped sampler of train.data (identical data order after `--resume`),
- the corrupt-row count in the logs,
- a final model in DAM format (LoRA merged; ZeRO-3 shards gathered) at output_dir/final,
  written to a temporary folder and renamed, loadable by `DescribeAnything.from_pretrained`.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments
from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from dam.distributed import set_single_process_env
from dam.jsonio import write_json_atomic
from dam.modeling import DamForConditionalGeneration
from dam.processing import DamProcessor
from train.config import TrainConfig
from dam.configio import ConfigError, to_dict
from train.data import DamCollator, LengthGroupedSampler, MixedRegionDataset
from train.model import apply_freeze_policy, build_model, merged_for_saving

logger = logging.getLogger(__name__)

FINAL_DIR = "final"


class DamTrainer(Trainer):
    """Trainer with the DAM sampler, corrupt-row accounting and DAM-format final saves."""

    def __init__(self, *args: Any, group_by_length: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group_by_length = group_by_length
        self.corrupt_rows = 0

    def _get_train_sampler(self, train_dataset: Any = None) -> LengthGroupedSampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = dataset.lengths() if self.group_by_length else None
        batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthGroupedSampler(lengths, len(dataset), batch, seed=self.args.seed)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        corrupt = inputs.pop("num_corrupt_rows", None)
        if corrupt is not None:
            if self.args.world_size > 1:  # every rank calls this each step, so the reduce is safe
                corrupt = self.accelerator.reduce(corrupt.to(self.args.device), reduction="sum")
            self.corrupt_rows += int(corrupt)
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs["corrupt_rows"] = self.corrupt_rows
        super().log(logs, *args, **kwargs)

    def _is_zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3

    def save_dam(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """The trained model in DAM format (merged, gathered, tokenizer included), atomically."""
        model = self.accelerator.unwrap_model(self.model)
        state = self.accelerator.get_state_dict(self.model_wrapped) if self._is_zero3() else None  # collective
        if self.is_world_process_zero():
            if state is not None:
                plugin = self.accelerator.state.deepspeed_plugin
                unset_hf_deepspeed_config()  # the CPU copy must not be partitioned again
                try:
                    model = _rebuild_with_state(model, state)
                finally:
                    set_hf_deepspeed_config(plugin.hf_ds_config)
            model = merged_for_saving(model)
            if dtype is not None:
                model = model.to(dtype)
            directory = Path(directory)
            partial = directory.with_name(directory.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            self.processing_class.save_pretrained(partial)
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(partial, directory)
            logger.info("final model written to %s", directory)
        self.accelerator.wait_for_everyone()


def _rebuild_with_state(model: DamForConditionalGeneration, state: dict[str, torch.Tensor]) -> DamForConditionalGeneration:
    """A CPU copy of a ZeRO-3-partitioned model (same structure, LoRA included) holding `state`."""
    from peft import PeftModel, get_peft_model

    copy = DamForConditionalGeneration(model.config)
    if isinstance(model.language_model, PeftModel):
        copy.language_model = get_peft_model(copy.language_model, model.language_model.peft_config["default"])
    missing, unexpected = copy.load_state_dict(state, strict=False)
    if unexpected or any(not name.endswith("lm_head.weight") for name in missing):
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    copy.generation_config = model.generation_config
    return copy


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    # transformers 5.23 renamed gradient_checkpointing to activation_checkpointing; older 5.x lack it.
    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False}}


def training_arguments(config: TrainConfig) -> TrainingArguments:
    training = config.training
    if training.deepspeed:
        set_single_process_env()
    return TrainingArguments(
        output_dir=training.output_dir,
        num_train_epochs=training.num_epochs,
        max_steps=training.max_steps,
        per_device_train_batch_size=training.per_device_batch_size,
        gradient_accumulation_steps=training.gradient_accumulation_steps,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        warmup_steps=training.warmup_ratio,  # a float below 1 is a share of the total steps
        lr_scheduler_type=training.lr_scheduler,
        max_grad_norm=training.max_grad_norm,
        bf16=training.bf16,
        **_checkpointing_arguments(training.gradient_checkpointing),
        deepspeed=training.deepspeed,
        save_strategy="steps",
        save_steps=training.save_steps,
        save_total_limit=training.save_total_limit,
        logging_steps=training.logging_steps,
        logging_first_step=True,
        seed=training.seed,
        data_seed=training.seed,
        use_cpu=training.use_cpu,
        ddp_backend="gloo" if training.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        ddp_find_unused_parameters=False,
        dataloader_num_workers=config.data.num_workers,
        report_to=list(training.report_to) or "none",
        remove_unused_columns=False,
    )


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N whose trainer state was written (the Trainer writes it last).

    A run killed while saving leaves a checkpoint folder without it; resuming skips that one.
    """
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = sorted(
        (int(path.name.split("-")[1]), path)
        for path in folder.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
        if path.is_dir() and path.name.split("-")[1].isdigit()
    )
    for _, path in reversed(steps):
        if (path / TRAINER_STATE_NAME).is_file():
            return str(path)
        logger.warning("ignoring incomplete checkpoint %s (no %s)", path, TRAINER_STATE_NAME)
    return None


def resume_checkpoint(output_dir: str, resume: bool | str) -> str | None:
    """The checkpoint to resume from: `resume` is True/"latest" (must exist), "auto" (if any) or a folder.

    Without `resume`, refuses to start over a run that has checkpoints.
    """
    last = latest_complete_checkpoint(output_dir)
    if resume == "auto":
        return last
    if resume is True or resume == "latest":
        if last is None:
            raise ConfigError(f"--resume: no complete checkpoint-N folder in training.output_dir={output_dir!r}")
        return last
    if resume:
        if not (Path(resume) / TRAINER_STATE_NAME).is_file():
            raise ConfigError(f"--resume: {resume!r} is not a complete checkpoint folder (no {TRAINER_STATE_NAME})")
        return str(resume)
    if last is not None:
        raise ConfigError(
            f"training.output_dir={output_dir!r} already holds {Path(last).name}: pass --resume to continue "
            "that run, or choose another output_dir"
        )
    return None


def run_training(config: TrainConfig, resume: bool | str = False) -> Path:
    """Train as configured; returns the folder of the final model."""
    checkpoint = resume_checkpoint(config.training.output_dir, resume)
    args = training_arguments(config)
    model, tokenizer = build_model(config.model, seed=config.training.seed)
    model = apply_freeze_policy(model, config.freeze, config.lora)
    processor = DamProcessor(tokenizer, model.config)
    dataset = MixedRegionDataset(config.data, processor, model.config.num_video_frames, seed=config.training.seed)
    trainer = DamTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DamCollator(processor, config.data.padding_side),
        processing_class=tokenizer,
        group_by_length=config.data.group_by_length,
    )
    if trainer.is_world_process_zero():
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.output_dir) / "train_config.json", to_dict(config))
    trainer.train(resume_from_checkpoint=checkpoint)
    final = Path(args.output_dir) / FINAL_DIR
    trainer.save_dam(final, dtype=torch.bfloat16 if config.training.bf16 else None)
    if trainer.is_world_process_zero():
        history = [entry for entry in trainer.state.log_history if "loss" in entry]
        write_json_atomic(Path(args.output_dir) / "loss_history.json", history)
        logger.info("corrupt rows skipped: %d", trainer.corrupt_rows)
    return final



