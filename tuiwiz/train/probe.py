"""The worst-case probe: the first optimizer step of every (re)start takes the longest samples,
and the memory it used is measured next to the plan's estimate.

- **Ordering.** `WorstFirstSampler` replaces the Trainer's train sampler (`install`). Each epoch
  it draws the very permutation the Trainer would (accelerate's `SeedableRandomSampler`:
  `torch.randperm(n)` seeded with `seed + epoch`), then, at the position of each step the run
  was started from in that epoch (step 0 of a fresh run, the checkpoint's step of a resume),
  moves the longest `per_step` rows of what follows to the front, longest first
  (`worst_first_order`). Nothing else moves, so every epoch still holds every row once, and
  the Trainer's skipping of already-trained batches on a resume skips exactly the rows that
  earlier starts trained.
- **Measurement.** `TokenMeter` counts the real tokens of each training micro-batch as the
  collator builds it; `MemoryCallback` reads torch's peaks and NVML after the first step
  and at the end, and writes `memory` events.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback

from tuiwiz.runs.events import EstimateLevels, MemoryEvent, MemoryLevels, StartEvent

GIB = 1024**3


# ---- ordering ----------------------------------------------------------------------------

def worst_first_order(perm: Sequence[int], lengths: Sequence[int], per_step: int,
                      offsets: Iterable[int]) -> list[int]:
    """`perm` with, at each offset (in increasing order), the `per_step` longest rows of
    `perm[offset:]` moved to `offset`, longest first; every other row keeps its order.

    Ties go to the row that came first, so the result is a pure function of its inputs.
    """
    order = list(perm)
    for offset in sorted(set(offsets)):
        if offset >= len(order):
            continue
        rest = range(offset, len(order))
        picked = heapq.nlargest(per_step, rest, key=lambda p: lengths[order[p]])  # stable: earlier first on ties
        chosen = set(picked)
        order[offset:] = [order[p] for p in picked] + [order[p] for p in rest if p not in chosen]
    return order


def steps_per_epoch(rows: int, micro_batch: int, grad_accum: int, world: int) -> int:
    """Optimizer steps in one epoch, as the Trainer counts them (batches per process, then steps;
    accelerate's even batches round a last partial round of processes up)."""
    batches = math.ceil(math.ceil(rows / micro_batch) / max(1, world))
    return max(1, math.ceil(batches / grad_accum))


def start_chain(events: Iterable[Any], current_step: int) -> list[int]:
    """The steps the training now resumed was started from, this start included.

    A start at step s ends every earlier start's future beyond s (a resume from checkpoint s
    discards what ran after it); a fresh start (no checkpoint, e.g. after a re-plan) begins a new chain.
    """
    chain: list[int] = []
    for ev in events:
        if isinstance(ev, StartEvent):
            chain = [s for s in chain if s < ev.start_step] + [ev.start_step] if ev.resumed_from else [ev.start_step]
    if not current_step:
        return [0]
    return [s for s in chain if s < current_step] + [current_step]


class WorstFirstSampler(Sampler[int]):
    """The Trainer's seeded shuffle, with the worst-case rows first at each start (module docstring)."""

    def __init__(self, lengths: Sequence[int], *, micro_batch: int, grad_accum: int, world: int, seed: int,
                 starts: Sequence[int] = (0,)) -> None:
        self.lengths = list(lengths)
        self.per_step = micro_batch * grad_accum * max(1, world)
        self.spe = steps_per_epoch(len(self.lengths), micro_batch, grad_accum, world)
        self.seed = seed
        self.starts = sorted(set(starts))
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def offsets(self, epoch: int) -> list[int]:
        """Where in `epoch`'s order a start moved the longest rows (in rows)."""
        return [(s % self.spe) * self.per_step for s in self.starts if s // self.spe == epoch]

    def order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.lengths), generator=gen).tolist()
        return worst_first_order(perm, self.lengths, self.per_step, self.offsets(epoch))

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)
        self.epoch += 1  # as accelerate's sampler does, for a loop that never calls set_epoch


def row_lengths(dataset: Any) -> list[int]:
    """Tokens per row of the trainer's (prepared, possibly packed) training set."""
    import pyarrow.compute as pc

    if hasattr(dataset, "with_format"):
        return pc.list_value_length(dataset.with_format("arrow")[:]["input_ids"]).to_pylist()
    return [len(row["input_ids"]) for row in dataset]


# ---- measuring -----------------------------------------------------------------------------

def real_tokens(batch: Any) -> int:
    """Tokens of a collated micro-batch that are not padding (as trl counts `num_tokens`)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if "position_ids" in batch:  # padding-free: one flattened row
        return int(batch["position_ids"].size(1))
    return int(batch["input_ids"].numel())


class TokenMeter:
    """Wraps the training collator: the real tokens of the first step's micro-batches, and of the largest."""

    def __init__(self, first_step_batches: int, inner: Callable[[Any], Any] | None = None) -> None:
        self.inner = inner
        self.first_step_batches = first_step_batches
        self.first: list[int] = []
        self.largest: int | None = None

    def __call__(self, features: Any) -> Any:
        assert self.inner is not None
        batch = self.inner(features)
        n = real_tokens(batch)
        if len(self.first) < self.first_step_batches:
            self.first.append(n)
        self.largest = n if self.largest is None else max(self.largest, n)
        return batch

    @property
    def first_step(self) -> int | None:
        return max(self.first) if self.first else None


class GpuMeter:
    """NVML's view of this process's GPU; every reading is None off CUDA or without NVML."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.index = int(device.split(":")[1]) if device.startswith("cuda:") else None
        self.baseline: int | None = None

    def _handle(self) -> Any:
        import pynvml

        pynvml.nvmlInit()
        try:  # NVML numbers cards its own way; torch maps CUDA_VISIBLE_DEVICES onto it
            nvml_index = torch.cuda._get_nvml_device_index(self.index)
        except Exception:  # noqa: BLE001 - fall back to the CUDA ordinal
            nvml_index = self.index
        return pynvml.nvmlDeviceGetHandleByIndex(nvml_index)

    def _read(self, fn: Callable[[Any], Any]) -> Any:
        if self.index is None:
            return None
        try:
            return fn(self._handle())
        except Exception:  # noqa: BLE001 - a measurement never fails the run
            return None

    def read_baseline(self) -> None:
        """The device's used memory before this process allocates anything (call before loading)."""
        import pynvml

        self.baseline = self._read(lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used)

    def name(self) -> str | None:
        import pynvml

        name = self._read(pynvml.nvmlDeviceGetName)
        if name is None and self.index is not None:
            try:
                name = torch.cuda.get_device_name(self.index)
            except Exception:  # noqa: BLE001
                return None
        return name.decode() if isinstance(name, bytes) else name

    def total_bytes(self) -> int | None:
        import pynvml

        return self._read(lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).total)

    def process_bytes(self) -> int | None:
        """This process's GPU memory per NVML; else the device's used memory minus the baseline
        (in a container NVML may not see our pid)."""
        import pynvml

        def mine(h: Any) -> int | None:
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return int(p.usedGpuMemory)
            return None

        own = self._read(mine)
        if own is not None:
            return own
        used = self._read(lambda h: pynvml.nvmlDeviceGetMemoryInfo(h).used)
        return used - self.baseline if used is not None and self.baseline is not None else None


def _gib(n: int | None) -> float | None:
    return None if n is None else round(n / GIB, 3)


def measure(device: str, gpu: GpuMeter) -> MemoryLevels:
    """torch's peaks since training began, and NVML's reading now (the caching allocator keeps
    what the step reserved, so right after a step that is the step's driver-level peak)."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return MemoryLevels()
    return MemoryLevels(allocated_gib=_gib(torch.cuda.max_memory_allocated(device)),
                        reserved_gib=_gib(torch.cuda.max_memory_reserved(device)),
                        nvml_gib=_gib(gpu.process_bytes()))


@dataclass
class Probe:
    """What `install` put on the trainer."""

    sampler: WorstFirstSampler | None
    meter: TokenMeter


def install(trainer: Any, starts: Sequence[int]) -> Probe:
    """Put the worst-first sampler and the token meter on `trainer` (before `train()`).

    Both are instance-level overrides of the two Trainer methods that build the training
    loader, so the evaluation loader and the trainer classes stay untouched. A training set
    ordered by another strategy (`group_by_length`...) keeps it, without the probe order.
    """
    args = trainer.args
    meter = TokenMeter(args.gradient_accumulation_steps)
    sampler = None
    if getattr(args, "train_sampling_strategy", "random") == "random":
        seed = args.data_seed if args.data_seed is not None else args.seed
        sampler = WorstFirstSampler(row_lengths(trainer.train_dataset), micro_batch=args.per_device_train_batch_size,
                                    grad_accum=args.gradient_accumulation_steps, world=args.world_size, seed=seed,
                                    starts=starts)
        trainer._get_train_sampler = lambda train_dataset=None: sampler
    build_loader = trainer.get_train_dataloader

    def train_loader_with_meter() -> Any:
        """The loader keeps the collator it is built with: the meter, around today's collator."""
        inner = meter.inner = trainer.data_collator
        trainer.data_collator = meter
        try:
            return build_loader()
        finally:
            trainer.data_collator = inner

    trainer.get_train_dataloader = train_loader_with_meter
    return Probe(sampler, meter)


class MemoryCallback(TrainerCallback):
    """`memory` events: after the first step of this start (the probe) and when training ends."""

    def __init__(self, emit: Callable[[MemoryEvent], None], device: str, meter: TokenMeter, gpu: GpuMeter,
                 estimate: EstimateLevels | None, on_probe: Callable[[MemoryEvent], None] | None = None) -> None:
        self.emit = emit
        self.device = device
        self.meter = meter
        self.gpu = gpu
        self.estimate = estimate
        self.on_probe = on_probe
        self.start: int | None = None

    def event(self, step: int, probe: bool) -> MemoryEvent:
        tokens = self.meter.first_step if probe else self.meter.largest
        return MemoryEvent(step=step, probe=probe, batch_tokens=tokens, gpu=self.gpu.name(),
                           measured=measure(self.device, self.gpu), estimate=self.estimate)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        self.start = state.global_step
        if self.device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats(self.device)  # loading peaks are not the step's

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        if self.start is not None and state.global_step == self.start + 1:
            ev = self.event(state.global_step, probe=True)
            self.emit(ev)
            if self.on_probe is not None:
                self.on_probe(ev)

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[override]
        self.emit(self.event(state.global_step, probe=False))
