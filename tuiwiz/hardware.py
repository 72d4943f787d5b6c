"""GPU and host inventory: NVML for the GPUs, psutil for the host, a catalog when NVML is absent.

NVML is read directly (`pynvml`, from the `nvidia-ml-py` package) because it is fast and
does not create a CUDA context; torch is never imported here. Without a driver or GPU we
say so in one line and plan for a card from `GPU_CATALOG` (by name, or a size such as 24GB).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuiwiz.errors import BadValue
from tuiwiz.gpu_features import native_bf16

GIB = 1024**3


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    total_gib: float
    used_gib: float
    free_gib: float
    bf16: bool
    compute_capability: str | None = None
    util_pct: float | None = None
    temp_c: float | None = None


@dataclass(frozen=True)
class HostInfo:
    cpu_cores: int
    ram_total_gib: float
    ram_available_gib: float
    disk_free_gib: float | None
    disk_path: str


@dataclass(frozen=True)
class HardwareInventory:
    gpus: tuple[GpuInfo, ...]
    host: HostInfo
    source: str  # "nvml" | "catalog"
    driver_version: str | None = None
    cuda_version: str | None = None
    note: str | None = None  # why we fell back to the catalog and what it plans for, in one line
    nvml_problem: str | None = None  # why NVML gave no GPUs (None when it did, or was not asked)

    def selected(self, indices: list[int] | None) -> tuple[GpuInfo, ...]:
        if not indices:
            return self.gpus
        by_index = {g.index: g for g in self.gpus}
        missing = [i for i in indices if i not in by_index]
        if missing:
            have = ", ".join(str(g.index) for g in self.gpus) or "none"
            raise BadValue("gpus", ",".join(map(str, indices)),
                           f"no GPU with index {', '.join(map(str, missing))} here (this machine has: {have})")
        return tuple(by_index[i] for i in indices)


@dataclass(frozen=True)
class CatalogGpu:
    name: str
    published_gb: int  # the vendor's figure ("24 GB")
    total_mib: int  # what NVML reports as total on that card, which the plan budgets against
    bf16: bool
    aliases: tuple[str, ...] = field(default=())

    @property
    def memory_gib(self) -> float:
        return self.total_mib / 1024


# Published memory and bf16 support; `total_mib` is NVML's total on a real card (a little
# under the box figure: the driver keeps some framebuffer for itself). Generic sizes use GB=GiB.
GPU_CATALOG: tuple[CatalogGpu, ...] = (
    CatalogGpu("Tesla T4", 16, 15360, False, ("t4",)),
    CatalogGpu("NVIDIA L4", 24, 23034, True, ("l4",)),
    CatalogGpu("NVIDIA A10G", 24, 23028, True, ("a10g", "a10")),
    CatalogGpu("GeForce RTX 3090", 24, 24576, True, ("rtx3090", "3090")),
    CatalogGpu("GeForce RTX 4090", 24, 24564, True, ("rtx4090", "4090")),
    CatalogGpu("GeForce RTX 5090", 32, 32607, True, ("rtx5090", "5090")),
    CatalogGpu("RTX A6000", 48, 49140, True, ("a6000", "rtxa6000")),
    CatalogGpu("NVIDIA L40S", 48, 46068, True, ("l40s",)),
    CatalogGpu("A100 40GB", 40, 40960, True, ("a100-40gb", "a100-40", "a10040gb", "a10040g")),
    CatalogGpu("A100 80GB", 80, 81920, True, ("a100", "a100-80gb", "a100-80", "a10080gb", "a10080g")),
    CatalogGpu("H100 80GB", 80, 81559, True, ("h100", "h100-80gb", "h10080gb", "h100sxm", "h100pcie")),
    CatalogGpu("H200", 141, 143771, True, ("h200", "h200-141gb")),
)

#: The most GPUs one node can hold, and the most nodes, that a plan accepts.
MAX_GPUS_PER_NODE = 64
MAX_NODES = 1024

#: What `--auto` plans for when there is no NVML and no `--gpu`.
DEFAULT_CATALOG_GPU = "GeForce RTX 4090"


def gpu_key(name: str) -> str:
    """A card's name normalised for matching: NVML's "NVIDIA GeForce RTX 4090" and the catalog's
    "GeForce RTX 4090" both give "rtx4090" (also used to match calibration records)."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("geforce", "").replace("nvidia", "").replace("tesla", ""))


def catalog_gpu(name: str) -> CatalogGpu:
    """Find a card by name (`4090`, `A100-80GB`, `H100`) or make a generic one from a size (`24GB`)."""
    key = gpu_key(name)
    for g in GPU_CATALOG:
        if key == gpu_key(g.name) or key in {gpu_key(a) for a in g.aliases}:
            return g
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(g|gb|gib)?\s*", name, re.IGNORECASE)
    if m:
        gib = float(m.group(1))
        if not 1 <= gib <= 1024:
            raise BadValue("gpu", name, "a memory size must be between 1 and 1024 GB, such as 24GB")
        return CatalogGpu(f"generic {gib:g}GB GPU", round(gib), int(gib * 1024), True)
    known = ", ".join(g.name for g in GPU_CATALOG)
    raise BadValue("gpu", name, f"unknown card; known: {known}; or give a size such as 24GB")


def gpus_from_catalog(card: CatalogGpu, count: int = 1) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(index=i, name=card.name, total_gib=card.memory_gib, used_gib=0.0, free_gib=card.memory_gib,
                bf16=card.bf16)
        for i in range(count)
    )


def read_host(path: str | Path = ".") -> HostInfo:
    import psutil

    vm = psutil.virtual_memory()
    p = Path(path).expanduser()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        disk = shutil.disk_usage(p).free / GIB
    except OSError:
        disk = None
    return HostInfo(
        cpu_cores=psutil.cpu_count(logical=True) or 1,
        ram_total_gib=vm.total / GIB,
        ram_available_gib=vm.available / GIB,
        disk_free_gib=disk,
        disk_path=str(p),
    )


def _nvml_text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_nvml() -> tuple[tuple[GpuInfo, ...], str | None, str | None]:
    """Read every GPU through NVML. Raises on any NVML failure (the caller explains it)."""
    import pynvml

    pynvml.nvmlInit()
    try:
        driver = _nvml_text(pynvml.nvmlSystemGetDriverVersion())
        try:
            cv = pynvml.nvmlSystemGetCudaDriverVersion()
            cuda = f"{cv // 1000}.{(cv % 1000) // 10}"
        except pynvml.NVMLError:
            cuda = None
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            try:
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc = f"{major}.{minor}"
                bf16 = native_bf16((major, minor))
            except pynvml.NVMLError:
                cc, bf16 = None, False
            try:
                util = float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
            except pynvml.NVMLError:
                util = None
            try:
                temp = float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU))
            except pynvml.NVMLError:
                temp = None
            gpus.append(GpuInfo(
                index=i, name=_nvml_text(pynvml.nvmlDeviceGetName(h)), total_gib=mem.total / GIB,
                used_gib=mem.used / GIB, free_gib=mem.free / GIB, bf16=bf16, compute_capability=cc,
                util_pct=util, temp_c=temp,
            ))
        return tuple(gpus), driver, cuda
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def nvml_unavailable_reason(exc: BaseException) -> str:
    """One line a person can act on, for the usual ways NVML is missing."""
    name = type(exc).__name__
    if "LibraryNotFound" in name or isinstance(exc, (ImportError, OSError)):
        return "NVML not available (no NVIDIA driver library on this machine): planning for a catalog GPU."
    if "DriverNotLoaded" in name:
        return "NVIDIA driver not loaded (NVML): planning for a catalog GPU."
    if "NoPermission" in name:
        return "no permission to query the GPUs through NVML: planning for a catalog GPU."
    return f"NVML failed ({name}: {exc}): planning for a catalog GPU."


def read_gpus() -> list[GpuInfo]:
    """Live GPU readings for monitors; empty without NVML (never raises)."""
    try:
        gpus, _, _ = _read_nvml()
        return list(gpus)
    except Exception:
        return []


def detect_hardware(gpu: str | None = None, gpu_count: int = 1, disk_path: str | Path = ".") -> HardwareInventory:
    """The machine's GPUs through NVML, or a catalog card.

    `gpu` (a catalog name or size, e.g. "4090" / "24GB") forces planning for that card even
    where NVML works, so a plan can be made on one machine for another. "auto"/None detects.
    """
    host = read_host(disk_path)
    if gpu and gpu.lower() != "auto":
        card = catalog_gpu(gpu)
        return HardwareInventory(gpus_from_catalog(card, gpu_count), host, "catalog",
                                 note=f"planning for {card.name} ({card.published_gb} GB), as asked.")
    try:
        gpus, driver, cuda = _read_nvml()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
        card = catalog_gpu(DEFAULT_CATALOG_GPU)
        reason = nvml_unavailable_reason(exc)
        return HardwareInventory(gpus_from_catalog(card, gpu_count), host, "catalog",
                                 note=reason + f" Using {card.name} ({card.published_gb} GB); "
                                 "name another card or a size (24GB) to plan for.", nvml_problem=reason)
    if not gpus:
        card = catalog_gpu(DEFAULT_CATALOG_GPU)
        return HardwareInventory(gpus_from_catalog(card, gpu_count), host, "catalog",
                                 note=f"NVML reports no GPUs: planning for {card.name}; name another card to plan for.",
                                 nvml_problem="NVML reports no GPUs.")
    return HardwareInventory(gpus, host, "nvml", driver, cuda)
