"""The detached worker's environment: NVML's GPU numbering and offline Hugging Face by default."""

from __future__ import annotations

from pathlib import Path

from tuiwiz.preset import preset_from_dict
from tuiwiz.runs.launcher import worker_env

from tiny_model import tiny_preset_dict


def _preset(indices: list[int] | None = None):
    d = tiny_preset_dict(Path("/nowhere/model"), Path("/nowhere/data.json"))
    if indices is not None:
        d["hardware"]["indices"] = indices
        d["hardware"]["count"] = len(indices)
    return preset_from_dict(d)


def test_gpu_indices_are_counted_by_pci_bus_like_nvml() -> None:
    env = worker_env(_preset([2, 0]), {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"})
    assert env["CUDA_VISIBLE_DEVICES"] == "2,0"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_without_indices_the_gpu_selection_is_left_alone() -> None:
    env = worker_env(_preset(), {"CUDA_VISIBLE_DEVICES": "1"})
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and "CUDA_DEVICE_ORDER" not in env


def test_the_worker_is_offline_by_default_even_if_the_shell_is_not() -> None:
    env = worker_env(_preset(), {"HF_HUB_OFFLINE": "0"})
    assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"


def test_online_lifts_an_inherited_offline_setting() -> None:
    env = worker_env(_preset(), {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "KEEP": "x"}, online=True)
    assert "HF_HUB_OFFLINE" not in env and "TRANSFORMERS_OFFLINE" not in env
    assert env["KEEP"] == "x"


def test_huggingface_hub_reads_the_offline_flag_as_set() -> None:
    """The consumer's own parser: huggingface_hub's constants module, in a fresh interpreter."""
    import subprocess
    import sys

    env = worker_env(_preset(), {"PATH": "/usr/bin:/bin"})
    code = "import huggingface_hub.constants as c; print(c.HF_HUB_OFFLINE)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "True", out.stderr
