"""Training config: YAML + dotted overrides, strict conversion, validation, shipped configs, CLI, freezing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.factories import tiny_dam
from train.cli import main
from train.config import DatasetConfig, FreezeConfig, LoraConfig, TrainConfig
from dam.configio import ConfigError, apply_overrides, from_dict, read_yaml
from train.model import apply_freeze_policy

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "train" / "tiny_cpu.yaml"


def convert(data: dict[str, Any], *overrides: str) -> TrainConfig:
    return from_dict(TrainConfig, apply_overrides(data, list(overrides)))


def valid(**sections: dict[str, Any]) -> dict[str, Any]:
    """A minimal valid config mapping, with `sections` merged in."""
    data: dict[str, Any] = {"model": {"checkpoint": "ckpt"}, "data": {"datasets": [{"path": "data"}]}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


# ---- overrides and conversion ---------------------------------------------------------------


def test_overrides_set_nested_keys_new_sections_and_list_items() -> None:
    data = {"training": {"max_steps": 5}, "data": {"datasets": [{"path": "a"}, {"path": "b"}]}}
    apply_overrides(data, ["training.max_steps=7", "lora.r=4", "data.datasets.1.weight=2", "freeze.llm=lora"])
    assert data["training"] == {"max_steps": 7} and data["lora"] == {"r": 4} and data["freeze"] == {"llm": "lora"}
    assert data["data"]["datasets"] == [{"path": "a"}, {"path": "b", "weight": 2}]


def test_override_into_a_null_section_creates_it() -> None:
    assert convert({"model": None}, "model.checkpoint=ckpt").model.checkpoint == "ckpt"


def test_override_values_are_parsed_as_yaml() -> None:
    config = convert(
        valid(),
        "training.learning_rate=1e-4",
        "training.bf16=true",
        "training.deepspeed=null",
        "training.report_to=[tensorboard, wandb]",
        "data.datasets=[{path: x, weight: 0.5}, {path: y}]",
        "training.output_dir=runs/a=b",
    )
    training = config.training
    assert isinstance(training.learning_rate, float) and training.learning_rate == 1e-4
    assert training.bf16 is True and training.deepspeed is None and training.report_to == ["tensorboard", "wandb"]
    assert config.data.datasets == [DatasetConfig("x", 0.5), DatasetConfig("y")]
    assert training.output_dir == "runs/a=b"


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_steps", "key.sub=value"),
        ("=3", "key.sub=value"),
        ("data.datasets.3.weight=2", "has 1 items"),
        ("data.datasets.x.weight=2", "has 1 items"),
        ("training.max_steps.deep=1", "is a value, not a section"),
    ],
)
def test_bad_overrides_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(valid(training={"max_steps": 3}), [override])


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("training", {"learnig_rate": 1e-4}, r"'training\.learnig_rate'.*did you mean 'training\.learning_rate'"),
        ("training", {"max_steps": "ten"}, r"training\.max_steps must be an integer"),
        ("training", {"bf16": 3}, r"training\.bf16 must be true or false"),
        ("training", {"learning_rate": "fast"}, r"training\.learning_rate must be a number"),
        ("freeze", {"llm": "partial"}, r"freeze\.llm must be one of 'full', 'frozen', 'lora'"),
        ("data", {"padding_side": "middle"}, r"data\.padding_side must be one of 'right', 'left'"),
        ("data", {"datasets": [{"weight": 2}]}, r"data\.datasets\.0.*path"),
        ("data", {"datasets": {"path": "x"}}, r"data\.datasets must be a list"),
        ("data", {"augmentation": {"detail_prob": 0.9}}, r"sum to 1"),
    ],
)
def test_from_dict_names_the_bad_key(section: str, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, valid(**{section: values}))


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"model": {"checkpoint": None}}, "no model given"),
        ({"model": {"checkpoint": None, "vision": "siglip"}}, "no model given"),
        ({"model": {"vision": "siglip", "llm": "lm"}}, "not both"),
        ({"model": {"dam": {"projector_type": "mlp2x_gelu"}}}, "remove model.dam"),
        ({"data": {"datasets": []}}, "data.datasets is empty"),
        ({"data": {"datasets": [{"path": "a"}, {"path": "b", "weight": 0}]}}, r"data\.datasets\.1\.weight must be > 0"),
        ({"data": {"max_length": 0}}, r"data\.max_length must be >= 1"),
        ({"training": {"deepspeed": "configs/deepspeed/zero9.json"}}, r"training\.deepspeed: .*zero9\.json"),
        ({"training": {"per_device_batch_size": 0}}, r"training\.per_device_batch_size must be >= 1"),
    ],
)
def test_validate_rejects_inconsistent_configs(sections: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, valid(**sections)).validate()


def test_a_valid_config_validates() -> None:
    assert from_dict(TrainConfig, valid()).validate().model.checkpoint == "ckpt"
    assert from_dict(TrainConfig, valid(model={"checkpoint": None, "vision": "v", "llm": "l"})).validate().model.llm == "l"


# ---- shipped configs ------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_train_configs_match_the_schema(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # their deepspeed paths are relative to the repository
    config = from_dict(TrainConfig, read_yaml(path, "configs/train/"))
    if not (config.model.checkpoint or config.model.vision):  # tiny_cpu.yaml leaves these to the command line
        config.model.checkpoint = "ckpt"
    config.data.datasets = config.data.datasets or [DatasetConfig("data")]
    config.validate()


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_shipped_deepspeed_configs(path: Path) -> None:
    zero = json.loads(path.read_text())["zero_optimization"]
    assert zero["stage"] in (2, 3)
    if "offload" in path.name:
        assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


# ---- the command line -----------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, list[str]]:
    """(exit status, stdout, the `dam-train: error:` lines of stderr) of `dam-train --config tiny_cpu.yaml ARGS`."""
    status = main(["--config", str(TINY), *args])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.startswith("dam-train: error:")]


def test_cli_prints_the_resolved_config(capsys: pytest.CaptureFixture) -> None:
    status, out, errors = run_cli(
        capsys, "--print-config", "model.checkpoint=ckpt", "data.datasets=[{path: d, weight: 2}]", "training.learning_rate=5e-5"
    )
    assert status == 0 and not errors
    printed = json.loads(out)
    assert printed["model"]["checkpoint"] == "ckpt" and printed["training"]["learning_rate"] == 5e-5
    assert printed["data"]["datasets"] == [{"path": "d", "weight": 2.0, "root": None}]
    assert printed["training"]["max_steps"] == 30  # from the YAML


@pytest.mark.parametrize(
    "args, named",
    [
        (["--print-config", "model.checkpoint=c", "data.datasets=[{path: d}]", "training.max_stpes=3"], "training.max_stpes"),
        (["--print-config", "data.datasets=[{path: d}]"], "no model given: set model.checkpoint"),
        (["data.datasets=[{path: d}]", "model.checkpoint=TMP/missing", "training.output_dir=TMP/run"], "model.checkpoint: "),
        (["data.datasets=[{path: d}]", "model.checkpoint=c", "training.output_dir=TMP/run", "--resume"], "--resume"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str], named: str) -> None:
    status, out, errors = run_cli(capsys, *(arg.replace("TMP", str(tmp_path)) for arg in args))
    assert status == 2 and out == ""
    assert len(errors) == 1 and named in errors[0], errors


# ---- freezing -------------------------------------------------------------------------------


def trainable(parameters: Any) -> set[bool]:
    return {p.requires_grad for p in parameters}


def unused_parameters(model: Any) -> list[Any]:
    return [p for module in model.vision.unused_modules() for p in module.parameters()]


def used_adapter_parameters(model: Any) -> list[Any]:
    return [p for adapter in model.vision.adapters[: model.config.num_vision_layers_run] for p in adapter.parameters()]


def test_frozen_tower_keeps_adapters_trainable() -> None:
    model = apply_freeze_policy(tiny_dam(), FreezeConfig(vision_tower="frozen"), LoraConfig())
    assert trainable(model.vision.tower.parameters()) == {False}
    assert trainable(used_adapter_parameters(model)) == {True}
    assert trainable(model.vision.mask_patch_embedding.parameters()) == {True}
    assert trainable(model.projector.parameters()) == trainable(model.language_model.parameters()) == {True}


def test_lora_trains_only_lora_weights_of_the_llm() -> None:
    from peft import PeftModel

    lora = LoraConfig(r=2, alpha=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = apply_freeze_policy(tiny_dam(), FreezeConfig(llm="lora"), lora)
    assert isinstance(model.language_model, PeftModel)
    llm = dict(model.language_model.named_parameters())
    assert {name for name, p in llm.items() if p.requires_grad} == {name for name in llm if "lora_" in name} != set()
    assert trainable(model.projector.parameters()) == {True}
    with pytest.raises(ConfigError, match="lora.target_modules"):
        apply_freeze_policy(tiny_dam(), FreezeConfig(llm="lora"), LoraConfig(target_modules=["no_such_proj"]))


def test_freezing_everything_is_a_config_error() -> None:
    everything = FreezeConfig(vision_tower="frozen", mask_embedding="frozen", adapters="frozen", projector="frozen", llm="frozen")
    with pytest.raises(ConfigError, match="nothing to train"):
        apply_freeze_policy(tiny_dam(), everything, LoraConfig())


@pytest.mark.parametrize("freeze", [FreezeConfig(), FreezeConfig(vision_tower="frozen", llm="frozen")], ids=["full", "adapters"])
def test_unused_parameters_never_train(freeze: FreezeConfig) -> None:
    model = apply_freeze_policy(tiny_dam(), freeze, LoraConfig())
    unused = unused_parameters(model)
    assert unused and trainable(unused) == {False}
    assert trainable(used_adapter_parameters(model)) == {True}


def test_an_override_after_resume_is_an_override(monkeypatch):
    import train.trainer
    from train import cli

    seen = {}
    monkeypatch.setattr(train.trainer, "run_training", lambda config, resume: seen.update(config=config, resume=resume) or "x")
    argv = ["--config", str(REPO / "configs/train/dam_3b_image.yaml"), "--resume", "training.max_steps=7"]
    monkeypatch.chdir(REPO)
    assert cli.main(argv) == 0
    assert seen["resume"] is True and seen["config"].training.max_steps == 7
