"""What the parent knows of the machine: the training stack imported without a CUDA context
(so forked children start warm), NVML readings of a child's memory, the GPU and the versions."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any, Iterable, Iterator

#: Imported lazily by the stack on first use; the parent imports them too, so each child does not.
LAZY = ("transformers.integrations.bitsandbytes", "transformers.quantizers.quantizer_bnb_4bit",
        "peft.tuners.lora.bnb", "bitsandbytes.optim")
VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets", "pyarrow",
             "huggingface_hub", "tokenizers", "safetensors", "pydantic")


def _nvml(index: int = 0) -> tuple[Any, Any]:
    """pynvml, initialised, and the handle of GPU `index` (raises when there is no NVML)."""
    import pynvml

    pynvml.nvmlInit()
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)


def nvml_capability(index: int = 0) -> tuple[int, int] | None:
    try:
        nv, handle = _nvml(index)
        major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
        return int(major), int(minor)
    except Exception:  # noqa: BLE001
        return None


def gpu_info() -> dict[str, Any]:
    try:
        nv, h = _nvml()
        name = nv.nvmlDeviceGetName(h)
        drv = nv.nvmlSystemGetDriverVersion()
        return {"gpu": name.decode() if isinstance(name, bytes) else name,
                "driver": drv.decode() if isinstance(drv, bytes) else drv,
                "gpu_total_bytes": int(nv.nvmlDeviceGetMemoryInfo(h).total)}
    except Exception as e:  # noqa: BLE001
        return {"gpu": None, "nvml_error": f"{type(e).__name__}: {e}"}


def import_stack(device: str, model_types: Iterable[str]) -> list[str]:
    """Import the training stack in the parent without creating a CUDA context, so forked children
    start warm. bitsandbytes asks torch for the compute capability while choosing its native
    library, which would initialise CUDA: NVML answers instead during that import. Returns notes."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() via NVML
    import torch  # noqa: F401

    cap = nvml_capability() if device.startswith("cuda") else None
    with _capability_from(cap):
        _import_training_stack()
        models = {mt: f"transformers.models.{mt}.modeling_{mt}" for mt in sorted(set(model_types))}
        return _pre_import({**models, **{mod: mod for mod in LAZY}})


def _import_training_stack() -> None:
    import bitsandbytes  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from trl import SFTConfig, SFTTrainer  # noqa: F401

    from tuiwiz.train import build  # noqa: F401


@contextlib.contextmanager
def _capability_from(cap: tuple[int, int] | None) -> Iterator[None]:
    """torch.cuda.get_device_capability answers `cap` (when known) without touching CUDA."""
    import torch

    original = torch.cuda.get_device_capability
    if cap is not None:
        torch.cuda.get_device_capability = lambda device=None: cap  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.cuda.get_device_capability = original  # type: ignore[assignment]


def _pre_import(modules: dict[str, str]) -> list[str]:
    """Import what can be imported (name -> module); a note for each that cannot."""
    notes = []
    for name, mod in modules.items():
        try:
            importlib.import_module(mod)
        except ImportError as e:
            notes.append(f"could not pre-import {name}: {e}")
    return notes


def parent_cuda_initialised() -> bool:
    import torch

    return bool(torch.cuda.is_initialized())


class NvmlProbe:
    """The parent's view of a child's GPU memory: NVML's per-process figure for the child's pid,
    else the only compute process on the device (containers show host pids), else the device's
    used memory minus the baseline taken before the child started."""

    def __init__(self, index: int = 0):
        self.nv, self.handle = _nvml(index)
        self.baseline = self.device_used()

    def device_used(self) -> int:
        return int(self.nv.nvmlDeviceGetMemoryInfo(self.handle).used)

    def reset_baseline(self) -> None:
        self.baseline = self.device_used()

    def sample(self, pid: int) -> tuple[int, str]:
        procs = self.nv.nvmlDeviceGetComputeRunningProcesses(self.handle)
        for p in procs:
            if p.pid == pid and p.usedGpuMemory:
                return int(p.usedGpuMemory), "process"
        if len(procs) == 1 and procs[0].usedGpuMemory:
            return int(procs[0].usedGpuMemory), "process-single"
        return self.device_used() - self.baseline, "device-minus-baseline"


def versions() -> dict[str, str]:
    """The versions the points ran with (the machine's python may differ from the kit's)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in VERSIONED:
        mod = sys.modules.get(name)
        v = getattr(mod, "__version__", None) if mod else None
        if v is None:
            try:
                v = md.version(name)
            except md.PackageNotFoundError:
                v = "missing"
        out[name] = str(v)
    torch = sys.modules.get("torch")
    if torch is not None:
        out["cuda"] = str(torch.version.cuda)
    return out
