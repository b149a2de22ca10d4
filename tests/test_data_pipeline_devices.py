"""data_pipeline.devices: which GPU a pipeline process loads its models on (torchrun, SLURM, explicit)."""

from __future__ import annotations

import pytest
import torch

from dam.errors import DamInputError
from data_pipeline.devices import resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees ``n`` GPUs."""

    def see(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return see


@pytest.mark.parametrize("environ, count, expected", [
    ({"LOCAL_RANK": "3", "RANK": "11", "WORLD_SIZE": "16"}, 8, "cuda:3"),  # torchrun: the node-local index, not RANK
    ({"SLURM_LOCALID": "2", "SLURM_PROCID": "10"}, 8, "cuda:2"),  # srun with several tasks per node
    ({"LOCAL_RANK": "1", "SLURM_LOCALID": "5"}, 8, "cuda:1"),  # torchrun inside a SLURM job: LOCAL_RANK wins
    ({"LOCAL_RANK": "9"}, 4, "cuda:1"),  # more processes than GPUs: shared round-robin
    ({}, 8, "cuda"),  # one process: the current device
])
def test_null_device_is_this_process_gpu(gpus, environ, count, expected):
    gpus(count)
    assert resolve_device(None, environ=environ) == torch.device(expected)


def test_null_device_without_cuda_is_the_cpu_and_explicit_devices_are_kept(gpus):
    gpus(0)
    assert resolve_device(None, environ={"LOCAL_RANK": "3"}) == torch.device("cpu")
    with pytest.raises(DamInputError, match=r"labeler\.device 'cuda:1' was asked for but torch sees no CUDA GPU"):
        resolve_device("cuda:1", "labeler.device", environ={})
    gpus(8)
    assert resolve_device("cuda:5", environ={"LOCAL_RANK": "3"}) == torch.device("cuda:5")
    assert resolve_device("cpu", environ={"LOCAL_RANK": "3"}) == torch.device("cpu")
    with pytest.raises(DamInputError, match=r"device 'gpu0' is not a torch device"):
        resolve_device("gpu0", environ={})
    with pytest.raises(DamInputError, match=r"LOCAL_RANK='x' is not an integer"):
        resolve_device(None, environ={"LOCAL_RANK": "x"})


def test_every_model_loader_uses_the_one_rule(gpus, monkeypatch):
    """The detector/SAM/instance/SigLIP loaders and the transformers and DAM labelers resolve devices alike."""
    from data_pipeline import detection, devices, rejection
    from data_pipeline.labelers import dam_model, transformers_vlm

    for module in (detection, rejection, transformers_vlm, dam_model):
        assert module.resolve_device is devices.resolve_device
    gpus(8)
    monkeypatch.setenv("LOCAL_RANK", "6")
    assert resolve_device(None) == torch.device("cuda:6")  # the process environment by default
