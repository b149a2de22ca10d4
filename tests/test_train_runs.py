"""End-to-end training runs of a tiny DAM on CPU: plain, DeepSpeed ZeRO-2/3, 2-process gloo,
LoRA with merge-on-save, kill + resume, bad configs and corrupt rows."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dam import DescribeAnything
from tests.train_fixtures import save_tiny_checkpoint, tiny_train_overrides, write_squares_dataset
from train.config import load_config
from train.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "train" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("train")
    checkpoint = save_tiny_checkpoint(root / "checkpoint")
    data = write_squares_dataset(root / "data", num_rows=48, video_every=8)
    return checkpoint, data, root


def _train(assets: tuple[Path, Path, Path], name: str, **overrides: object) -> Path:
    checkpoint, data, root = assets
    run_training(load_config(CONFIG, tiny_train_overrides(checkpoint, data, root / name, **overrides)))
    return root / name


def _cli(args: list[str], launcher: list[str] | None = None, **popen: object) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [*(launcher or [sys.executable]), "-m", "train.cli", "--config", str(CONFIG), *args]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _finish(process: subprocess.Popen, timeout: float = 300) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def _losses(run: Path) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in json.loads((run / "loss_history.json").read_text())}


def _assert_loss_falls(losses: dict[int, float]) -> None:
    steps = sorted(losses)
    first = np.mean([losses[s] for s in steps[:3]])
    last = np.mean([losses[s] for s in steps[-3:]])
    assert last < 0.85 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def _assert_describes(final: Path) -> None:
    model = DescribeAnything.from_pretrained(final)
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    mask = np.zeros((32, 32), dtype=bool)
    mask[4:20, 6:22] = True
    assert isinstance(model.describe(image, mask, max_new_tokens=4), str)


@pytest.fixture(scope="module")
def baseline(assets: tuple[Path, Path, Path]) -> Path:
    """30 uninterrupted steps, checkpoints every 10."""
    return _train(assets, "baseline")


def test_tiny_dam_loss_falls_and_the_final_model_describes(baseline: Path) -> None:
    losses = _losses(baseline)
    assert sorted(losses) == list(range(1, 31))
    _assert_loss_falls(losses)
    _assert_describes(baseline / "final")
    saved = json.loads((baseline / "train_config.json").read_text())
    assert saved["training"]["max_steps"] == 30


def test_killed_run_resumes_with_the_uninterrupted_loss_trajectory(assets, baseline: Path) -> None:
    checkpoint, data, root = assets
    run = root / "killed"
    process = _cli(tiny_train_overrides(checkpoint, data, run))
    marker = run / "checkpoint-10" / "trainer_state.json"
    deadline = time.monotonic() + 240
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert marker.exists(), "the run never wrote checkpoint-10"
    assert not (run / "final").exists(), "the run finished before it could be killed"
    run_training(load_config(CONFIG, tiny_train_overrides(checkpoint, data, run)), resume=True)
    resumed, uninterrupted = _losses(run), _losses(baseline)
    after = [step for step in sorted(uninterrupted) if step > 10]
    torch.testing.assert_close(
        torch.tensor([resumed[s] for s in after]), torch.tensor([uninterrupted[s] for s in after]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_on_cpu(assets, stage: str) -> None:
    checkpoint, data, root = assets
    run = root / stage
    overrides = tiny_train_overrides(
        checkpoint, data, run, **{"training.deepspeed": f"configs/deepspeed/{stage}.json", "training.max_steps": 16}
    )
    _finish(_cli(overrides))
    _assert_loss_falls(_losses(run))
    _assert_describes(run / "final")


def test_two_process_gloo_run_with_torchrun(assets) -> None:
    checkpoint, data, root = assets
    run = root / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    output = _finish(_cli(tiny_train_overrides(checkpoint, data, run, **{"training.max_steps": 8}), launcher))
    assert output.count("done: ") == 2, "both ranks must finish"
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 9))
    _assert_describes(run / "final")


def test_lora_run_saves_a_merged_model_that_loads_and_generates(assets) -> None:
    checkpoint, _, _ = assets
    run = _train(assets, "lora", **{"freeze.llm": "lora", "lora.r": 4, "lora.alpha": 8, "training.max_steps": 12})
    final = run / "final"
    with safe_open(str(final / "model.safetensors"), "pt") as saved, safe_open(str(checkpoint / "model.safetensors"), "pt") as start:
        names = list(saved.keys())
        assert not any("lora" in name or "base_layer" in name for name in names)
        layer = "language_model.model.layers.0.self_attn.q_proj.weight"
        assert layer in names
        assert not torch.equal(saved.get_tensor(layer), start.get_tensor(layer)), "LoRA was not merged into the weights"
        embedding = "language_model.model.embed_tokens.weight"
        torch.testing.assert_close(saved.get_tensor(embedding), start.get_tensor(embedding))  # frozen under LoRA
    _assert_describes(final)


def test_corrupt_rows_are_skipped_and_counted(assets, tmp_path: Path) -> None:
    checkpoint, data, root = assets
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    for index in (9, 10, 13, 17, 21, 22, 25, 30, 33, 41):  # the first rows stay readable
        (broken / "images" / f"{index:04d}.png").unlink()
    run = tmp_path / "run"
    run_training(load_config(CONFIG, tiny_train_overrides(checkpoint, broken, run, **{"training.max_steps": 10})))
    history = json.loads((run / "loss_history.json").read_text())
    assert history[-1]["corrupt_rows"] > 0
    assert (run / "final").is_dir()


def test_restarting_over_existing_checkpoints_needs_resume(assets, baseline: Path) -> None:
    checkpoint, data, _ = assets
    from dam.configio import ConfigError

    with pytest.raises(ConfigError, match="--resume"):
        run_training(load_config(CONFIG, tiny_train_overrides(checkpoint, data, baseline)))
