"""Trainer callbacks: events.jsonl + status.json, graceful stop, and the fault-injection seams."""

from __future__ import annotations

import errno
import os
import threading
import time
from typing import Any, Callable

import torch
from transformers import TrainerCallback

from tuiwiz.runs.events import CheckpointEvent, EvalEvent, EventWriter, LogEvent, StartEvent
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import update_status
from tuiwiz.train.errors import DataError
from tuiwiz.train.faults import Fault

GIB = 1024**3


def gpu_memory(device: str) -> dict[str, float | None]:
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return {"mem_allocated_gib": None, "mem_reserved_gib": None, "mem_peak_gib": None}
    return {
        "mem_allocated_gib": round(torch.cuda.memory_allocated(device) / GIB, 3),
        "mem_reserved_gib": round(torch.cuda.memory_reserved(device) / GIB, 3),
        "mem_peak_gib": round(torch.cuda.max_memory_allocated(device) / GIB, 3),
    }


def _f(v: Any) -> float | None:
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


class EventsCallback(TrainerCallback):
    """Writes start/log/eval/checkpoint events (rank 0 only) and keeps status.json current."""

    def __init__(self, writer: EventWriter | None, paths: RunPaths, start_info: Callable[[Any], StartEvent],
                 device: str, samples_per_step: int) -> None:
        self.writer = writer
        self.paths = paths
        self.start_info = start_info
        self.device = device
        self.samples_per_step = samples_per_step
        self.t0 = time.time()
        self.start_step = 0
        self.last: tuple[float, int, float] | None = None  # (time, step, num_tokens)

    def _emit(self, event: Any) -> None:
        if self.writer is not None:
            self.writer.write(event)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        self.t0 = time.time()
        self.start_step = state.global_step
        self.last = (self.t0, state.global_step, 0.0)
        if state.is_world_process_zero:
            self._emit(self.start_info(state))
            update_status(self.paths, step=state.global_step, total_steps=state.max_steps, started_at=self.t0)

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[override]
        if not state.is_world_process_zero or not logs:
            return
        now = time.time()
        if "eval_loss" in logs:
            self._emit(EvalEvent(step=state.global_step, epoch=_f(state.epoch), eval_loss=float(logs["eval_loss"])))
            update_status(self.paths, eval_loss=float(logs["eval_loss"]), heartbeat=now)
            return
        if "loss" not in logs:
            return
        tokens = _f(logs.get("num_tokens")) or 0.0
        tps = sps = None
        if self.last is not None:
            t_prev, s_prev, tok_prev = self.last
            dt = now - t_prev
            if dt > 0:
                if tokens > tok_prev:
                    tps = (tokens - tok_prev) / dt
                sps = (state.global_step - s_prev) * self.samples_per_step / dt
        self.last = (now, state.global_step, tokens)
        done = state.global_step - self.start_step
        eta = (state.max_steps - state.global_step) * (now - self.t0) / done if done > 0 else None
        loss = _f(logs.get("loss"))
        self._emit(LogEvent(step=state.global_step, epoch=_f(state.epoch), loss=loss,
                            lr=_f(logs.get("learning_rate")), grad_norm=_f(logs.get("grad_norm")),
                            tokens_per_s=tps, samples_per_s=sps, eta_s=eta, **gpu_memory(self.device)))
        update_status(self.paths, step=state.global_step, loss=loss, heartbeat=now)

    def on_save(self, args, state, control, **kwargs):  # type: ignore[override]
        if state.is_world_process_zero:
            path = f"{args.output_dir}/checkpoint-{state.global_step}"
            self._emit(CheckpointEvent(step=state.global_step, path=path))


class GracefulStopCallback(TrainerCallback):
    """SIGTERM sets `flag`; at the next optimizer step the trainer saves a checkpoint and stops."""

    def __init__(self, flag: threading.Event) -> None:
        self.flag = flag
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        if self._any_rank_stopping(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def _any_rank_stopping(self, args: Any) -> bool:
        """Under DDP every rank must stop at the same step, so the flag is max-reduced across ranks."""
        flag = self.flag.is_set()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([1 if flag else 0], device=args.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            return bool(t.item())
        return flag


class FaultCallback(TrainerCallback):
    """Test seam (TUIWIZ_FAULT / TUIWIZ_STEP_DELAY): see tuiwiz.train.faults."""

    def __init__(self, fault: Fault | None, step_delay: float = 0.0) -> None:
        self.fault = fault
        self.step_delay = step_delay

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        if self.fault is None or state.global_step + 1 < self.fault.step:
            return
        if self.fault.kind == "oom":
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB (injected by TUIWIZ_FAULT=oom)")
        if self.fault.kind == "enospc":
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by TUIWIZ_FAULT=enospc)",
                          str(args.output_dir))

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[override]
        if self.step_delay:
            time.sleep(self.step_delay)


class FaultyCollator:
    """Wraps the data collator; raises DataError while building the batch of step `fault.step`."""

    def __init__(self, inner: Callable[..., Any], fault: Fault, trainer: Any) -> None:
        self.inner = inner
        self.fault = fault
        self.trainer = trainer

    def __call__(self, features: Any) -> Any:
        if self.trainer.model.training and self.trainer.state.global_step + 1 >= self.fault.step:
            raise DataError(f"batch for step {self.fault.step} ({len(features)} examples): 'content' is not a string "
                            "(injected by TUIWIZ_FAULT=data)")
        return self.inner(features)
