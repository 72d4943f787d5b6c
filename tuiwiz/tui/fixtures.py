"""Fixed hardware readings and a fixed run for tests, snapshots and screenshots, so pictures never vary.

Real runs read NVML; these stand in for a two-GPU workstation and for a laptop without NVML.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tuiwiz.hardware import (DEFAULT_CATALOG_GPU, GpuInfo, HardwareInventory, HostInfo, catalog_gpu,
                             gpus_from_catalog)

if TYPE_CHECKING:
    from tuiwiz.runs.paths import RunPaths

HOST = HostInfo(cpu_cores=16, ram_total_gib=62.8, ram_available_gib=48.2, disk_free_gib=410.0, disk_path="/data")
WORKSTATION_GPUS = (
    GpuInfo(0, "NVIDIA GeForce RTX 4090", 23.99, 1.20, 22.79, True, "8.9", 3.0, 41.0),
    GpuInfo(1, "NVIDIA GeForce RTX 3090", 24.00, 0.40, 23.60, True, "8.6", 0.0, 35.0),
)


def workstation() -> HardwareInventory:
    """Two 24 GB cards seen through NVML."""
    return HardwareInventory(WORKSTATION_GPUS, HOST, "nvml", "550.54.15", "12.4")


def no_nvml() -> HardwareInventory:
    """What `detect_hardware` returns on a machine without the NVIDIA driver."""
    card = catalog_gpu(DEFAULT_CATALOG_GPU)
    return HardwareInventory(
        gpus_from_catalog(card, 1), HOST, "catalog",
        note="NVML not available (no NVIDIA driver library on this machine): planning for a catalog GPU. "
             f"Using {card.name} ({card.published_gb} GB); name another card or a size (24GB) to plan for.",
        nvml_problem="NVML not available (no NVIDIA driver library on this machine): planning for a catalog GPU.")


# ---- a run to monitor: fixed events and log lines (snapshots and screenshots) ----------------------

DEMO_RUN_ID = "qwen-demo"
DEMO_LOG = ["loading Qwen/Qwen2.5-7B-Instruct in 4 bits", "trainable params: 40,370,176",
            "step 20/60 loss 1.71", "saved checkpoint-20"]
RunKind = Literal["live", "stopped", "failed"]


def _demo_logs(upto: int) -> list[Any]:
    from tuiwiz.runs.events import EvalEvent, LogEvent

    out: list[Any] = []
    for step in range(1, upto + 1):
        out.append(LogEvent(step=step, loss=round(2.4 - 0.9 * step / 60 + 0.05 * (step % 3), 4), lr=2e-4,
                            tokens_per_s=5210.0, samples_per_s=3.4, eta_s=(60 - step) * 4.0, mem_peak_gib=19.1,
                            t=float(step)))
        if step % 10 == 0:
            out.append(EvalEvent(step=step, eval_loss=round(2.2 - 0.8 * step / 60, 4), t=float(step)))
    return out


def demo_run_events(kind: RunKind) -> list[Any]:
    """The events of a 60-step run on the demo: going (`live`), stopped at step 30, or out of memory."""
    from tuiwiz.runs.events import (CheckpointEvent, ErrorEvent, EstimateLevels, MemoryEvent, MemoryLevels,
                                    StartEvent, StoppedEvent)

    start = StartEvent(run_id=DEMO_RUN_ID, pid=1, device="cuda", versions={},
                       config={"plan_peak_gib": 18.4, "plan_allocated_gib": 16.9},
                       total_steps=60, train_samples=270, eval_samples=30, t=0.0)
    probe = MemoryEvent(step=1, probe=True, batch_tokens=11264, gpu="NVIDIA GeForce RTX 4090",
                        measured=MemoryLevels(allocated_gib=16.2, reserved_gib=17.1, nvml_gib=17.8),
                        estimate=EstimateLevels(allocated_gib=16.9, reserved_gib=18.0, peak_gib=18.4), t=1.0)
    if kind == "live":
        logs = _demo_logs(25)
        return [start, logs[0], probe, *logs[1:], CheckpointEvent(step=20, path="checkpoints/checkpoint-20", t=20.0)]
    if kind == "stopped":
        logs = _demo_logs(30)
        return [start, logs[0], probe, *logs[1:], StoppedEvent(step=30, t=30.0)]
    return [start, *_demo_logs(3), ErrorEvent(
        kind="oom", message="CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.99 GiB total capacity)",
        suggestion="the plan was too large for this GPU: relaunch with a smaller micro-batch", step=4,
        peak_gib=23.6, smaller_plan={"micro_batch_size": 2, "grad_accum": 8, "cutoff_len": 2816}, t=4.0)]


def demo_run(root: Path, kind: RunKind) -> tuple[RunPaths, int | None]:
    """A run folder under `root` as the worker leaves it. A `live` run's lock is taken by this process
    (the returned fd: close it to end the run); the others hold none."""
    import yaml

    from tuiwiz.runs.events import EventWriter
    from tuiwiz.runs.paths import RunPaths
    from tuiwiz.runs.status import RunStatus, take_lock, write_status

    paths = RunPaths(root / DEMO_RUN_ID)
    paths.root.mkdir(parents=True)
    paths.preset.write_text(yaml.safe_dump({
        "version": 1, "name": DEMO_RUN_ID, "model": {"id": "Qwen/Qwen2.5-7B-Instruct"},
        "dataset": {"path": "demo.jsonl"}, "hardware": {"gpu": "RTX 4090", "memory_gib": 23.99},
        "training": {"micro_batch_size": 4, "grad_accum": 4}}))
    paths.log.write_text("\n".join(DEMO_LOG) + "\n")
    write_status(paths, RunStatus(run_id=DEMO_RUN_ID, pid=os.getpid() if kind == "live" else None))
    with EventWriter(paths.events) as w:
        for event in demo_run_events(kind):
            w.write(event)
    return paths, take_lock(paths) if kind == "live" else None
