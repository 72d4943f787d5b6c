"""The detached training worker: builds everything from RUN_DIR/preset.yaml and trains.

It never talks to a terminal: progress goes to events.jsonl (schema in tuiwiz.runs.events),
state to status.json, and everything else (library output, tracebacks) to train.log.
A SIGTERM asks for a graceful stop: finish the step, save a checkpoint and the adapter, exit.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from tuiwiz.errors import CannotWrite, UserError
from tuiwiz.preset import Preset, load_preset
from tuiwiz.runs.events import (DoneEvent, ErrorEvent, EstimateLevels, EventWriter, MemoryEvent, ReplanEvent,
                                StartEvent, StoppedEvent, read_events)
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import last_checkpoint, take_lock, update_status

if TYPE_CHECKING:
    from tuiwiz.models import ModelSpec
    from tuiwiz.planning.memory import MemoryEstimate
    from tuiwiz.train.dataset import BuiltData
    from tuiwiz.train.probe import GpuMeter

HEARTBEAT_S = float(os.environ.get("TUIWIZ_HEARTBEAT_S", "5"))


def log(msg: str) -> None:
    print(f"[tuiwiz {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict[str, str]:
    """The versions that ran (tuiwiz's own from the imported source: PYTHONPATH may shadow an install)."""
    import importlib.metadata as md

    import torch

    import tuiwiz

    out = {"python": platform.python_version(), "tuiwiz": tuiwiz.__version__}
    for dist in ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "missing"
    out["cuda"] = str(torch.version.cuda)
    return out


def plan_gpus(preset: Preset) -> int:
    """The GPU count the plan was estimated for (over all nodes)."""
    return preset.hardware.count * getattr(preset.hardware, "nodes", 1)


def plan_estimate(preset: Preset) -> tuple[ModelSpec, MemoryEstimate]:
    """The model's shape, read as the planner reads it, and the plan's uncalibrated estimate:
    what the `memory` event compares with and the calibration store learns from."""
    from tuiwiz.models import resolve_model
    from tuiwiz.planning.memory import estimate_memory

    spec = resolve_model(preset.model.path or preset.model.id)
    return spec, estimate_memory(spec, preset.training, plan_gpus(preset))


def budget_bytes(preset: Preset) -> int:
    """The plan's memory budget per GPU: the preset's, else the card's less the default headroom."""
    from tuiwiz.planning.advisor import DEFAULT_HEADROOM
    from tuiwiz.planning.memory import GIB

    if preset.estimate is not None:
        return int(preset.estimate.budget_gib * GIB)
    return int(preset.hardware.memory_gib * (1 - DEFAULT_HEADROOM) * GIB)


def next_knobs(preset: Preset, spec: ModelSpec | None, needed_bytes: int | None) -> dict[str, Any]:
    """The plan to relaunch with after an OOM: the same effective batch in smaller steps, as many
    as the measured shortfall asks for (`tuiwiz.planning.replan`)."""
    from tuiwiz.planning.advisor import smaller_plan
    from tuiwiz.planning.replan import next_plan

    if spec is None:
        return smaller_plan(preset.training).model_dump(mode="json")
    nxt = next_plan(spec, preset.training, gpus=plan_gpus(preset), budget_bytes=budget_bytes(preset),
                    needed_bytes=needed_bytes)
    return nxt.knobs.model_dump(mode="json")


def checkpoint_step(ckpt: Path | None) -> int:
    """The global step a `checkpoint-N` folder was saved at (0: no checkpoint)."""
    return int(ckpt.name.rsplit("-", 1)[1]) if ckpt is not None else 0


def _tokenizer_folder(preset: Preset) -> str:
    tok = preset.model.tokenizer
    if tok:
        p = Path(tok).expanduser()
        return str(p.parent if p.is_file() else p)
    return preset.model.path or preset.model.id


def _write_pid_file(paths: RunPaths, rank: int) -> None:
    d = paths.root / "workers"
    d.mkdir(exist_ok=True)
    (d / f"{rank}.pid").write_text(f"{os.getpid()}\n", encoding="utf-8")


def _disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


class Worker:
    """One worker process: data, model, trainer, train, save; every failure becomes an error event.

    Rank 0 alone writes events.jsonl and status.json. What the steps resolve (device, dtype,
    trainer, ...) is kept on the instance, where the start event and the failure path read it.
    """

    def __init__(self, paths: RunPaths, *, resume: bool, merge: bool, rank: int, stop_flag: threading.Event,
                 record_pid: bool = False) -> None:
        self.paths = paths
        self.resume = resume
        self.merge = merge
        self.rank = rank
        self.is_main = rank == 0
        self.stop_flag = stop_flag
        self.record_pid = record_pid
        self.stop_heartbeat = threading.Event()
        self.writer: EventWriter | None = None
        self.phase = "setup"
        self.step: int | None = None
        self.preset: Preset | None = None
        self.data: BuiltData | None = None
        self.device = "cpu"
        self.dtype: Any = None
        self.note: str | None = None
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.report = "none"
        self.resume_ckpt: Path | None = None
        self.trainer: Any = None
        self.history: list[Any] = []  # the run's events before this start (earlier attempts, resumes)
        self.attempt = 1
        self.start_step = 0
        self.gpu: GpuMeter | None = None
        self.spec: ModelSpec | None = None
        self.estimate: MemoryEstimate | None = None

    # ---- writing -------------------------------------------------------------------------
    def emit(self, event: Any) -> None:
        if self.writer is not None:
            self.writer.write(event)

    def status(self, **changes: Any) -> None:
        if self.is_main:
            update_status(self.paths, **changes)

    def heartbeat(self) -> None:
        while not self.stop_heartbeat.wait(HEARTBEAT_S):
            try:
                self.status(heartbeat=time.time())
            except (OSError, CannotWrite):
                pass  # a full disk is reported by the main thread's next write

    # ---- the run -------------------------------------------------------------------------
    def run(self) -> int:
        threading.Thread(target=self.heartbeat, daemon=True, name="heartbeat").start()
        try:
            return self._run()
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an error event
            return self._fail(exc)
        finally:
            self.stop_heartbeat.set()
            if self.writer is not None:
                self.writer.release_reserve()
                self.writer.close()

    def _run(self) -> int:
        self._open()
        self.preset = preset = load_preset(self.paths.preset)
        self.data = data = self._build_data(preset)
        if self.stop_flag.is_set():
            return self._stopped_before_training()
        model, tokenizer = self._build_model(preset)
        if self.stop_flag.is_set():
            return self._stopped_before_training()
        self.trainer, stop_cb = self._build_trainer(preset, data, model, tokenizer)
        result = self._train()
        if stop_cb.stopped_at is not None:
            return self._finish_stopped()
        return self._finish_done(result, tokenizer)

    def _open(self) -> None:
        """pid file, events.jsonl with its disk reserve, status 'running'."""
        _write_pid_file(self.paths, self.rank)
        self.history = read_events(self.paths.events)
        self.attempt = 1 + sum(isinstance(e, ReplanEvent) for e in self.history)
        if self.is_main:
            self.writer = EventWriter(self.paths.events)
            self.writer.reserve()
        pid = {"pid": os.getpid()} if self.record_pid else {}
        self.status(state="running", heartbeat=time.time(), **pid)
        log(f"worker pid {os.getpid()} rank {self.rank} for run {self.paths.run_id}")

    def _build_data(self, preset: Preset) -> BuiltData:
        self.phase = "data"
        from tuiwiz.train.dataset import build_examples

        data = build_examples(preset)
        log(f"data: {data.total} examples -> {len(data.train)} train / {len(data.eval)} validation, "
            f"{data.tokens} tokens" + (f"; {'; '.join(data.notes)}" if data.notes else ""))
        return data

    def _build_model(self, preset: Preset) -> tuple[Any, Any]:
        """The quantized base and the tokenizer, on this rank's device in the dtype the card can run."""
        self.phase = "model"
        import torch

        from tuiwiz.train import build
        from tuiwiz.train.probe import GpuMeter

        self.device = device = build.resolve_device()
        self.gpu = GpuMeter(device)
        self.gpu.read_baseline()  # before this process holds any GPU memory
        notes = []
        if device == "cpu":
            notes.append("running on CPU (no CUDA device visible): fine for tiny test models only")
            log(notes[-1])
            torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        self.dtype, warning = build.choose_compute_dtype(preset.training.compute_dtype, device.startswith("cuda"),
                                                         build.device_capability(device), preset.hardware.bf16)
        for warning in (warning, build.liger_problem(preset.training, device)):
            if warning:
                notes.append(warning)
                log(f"WARNING: {warning}")
        self.note = "; ".join(notes) or None  # the start event carries it to the monitor
        model = build.build_model(preset, preset.training, device, dtype=self.dtype)
        tokenizer = build.load_hf_tokenizer(_tokenizer_folder(preset), preset.model.trust_remote_code)
        try:
            self.spec, self.estimate = plan_estimate(preset)
        except Exception as e:  # noqa: BLE001 - the run trains without an estimate to compare with
            log(f"no memory estimate for this model ({e}); memory events carry the measurement only")
        return model, tokenizer

    def _build_trainer(self, preset: Preset, data: BuiltData, model: Any, tokenizer: Any) -> tuple[Any, Any]:
        """The SFTTrainer with the events, graceful-stop and fault callbacks; and the stop callback."""
        self.phase = "train"
        from tuiwiz.train import build
        from tuiwiz.train.callbacks import EventsCallback, FaultCallback, FaultyCollator, GracefulStopCallback
        from tuiwiz.train.faults import fault_from_env, step_delay_from_env

        knobs = preset.training
        if self.resume:
            self.resume_ckpt = last_checkpoint(self.paths)
            if self.resume_ckpt is None:
                raise UserError(f"{self.paths.checkpoints}: no complete checkpoint to resume from.")
        self.report = build.report_to()
        if self.report == "tensorboard":
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(self.paths.tensorboard))
        fault = fault_from_env()
        if fault is not None and self.attempt > 1:
            log(f"TEST SEAM: TUIWIZ_FAULT={fault.kind}@{fault.step} fires in a run's first attempt only; "
                f"this is attempt {self.attempt}")
            fault = None
        stop_cb = GracefulStopCallback(self.stop_flag)
        events_cb = EventsCallback(self.writer, self.paths, self._start_event, self.device,
                                   samples_per_step=knobs.effective_batch(self.world))
        trainer = build.build_trainer(model, tokenizer, knobs, data.train, data.eval, self.paths.checkpoints,
                                      device=self.device, report=self.report, dtype=self.dtype,
                                      callbacks=[events_cb, stop_cb, FaultCallback(fault, step_delay_from_env())])
        if fault is not None:
            log(f"TEST SEAM: TUIWIZ_FAULT={fault.kind}@{fault.step} is set")
            if fault.kind == "data":
                trainer.data_collator = FaultyCollator(trainer.data_collator, fault, trainer)
        self._install_probe(trainer)
        return trainer, stop_cb

    def _install_probe(self, trainer: Any) -> None:
        """Worst case first (the sampler), and the `memory` events after it and at the end."""
        from tuiwiz.train.probe import MemoryCallback, install, start_chain

        assert self.gpu is not None
        self.start_step = checkpoint_step(self.resume_ckpt)
        probe = install(trainer, start_chain(self.history, self.start_step))
        if probe.sampler is None:
            log("probe: the trainer orders the data itself; the first step is not the worst case")
        est = self.estimate
        levels = EstimateLevels(allocated_gib=round(est.allocated_gib, 3), reserved_gib=round(est.reserved_gib, 3),
                                peak_gib=round(est.peak_gib, 3)) if est is not None else None
        trainer.add_callback(MemoryCallback(self.emit, self.device, probe.meter, self.gpu, levels,
                                            on_probe=self._record_calibration))

    def _record_calibration(self, ev: MemoryEvent) -> None:
        """After the probe on a GPU: one line in the user's calibration store (rank 0 only)."""
        from tuiwiz.planning.calibration import MeasuredLevels, append_record, record_for

        m, gpu = ev.measured, self.gpu
        if not self.is_main or self.estimate is None or gpu is None or ev.gpu is None:
            return
        if m.allocated_gib is None or m.reserved_gib is None or m.nvml_gib is None:
            log("calibration: NVML gave no reading for this process; no record written")
            return
        assert self.preset is not None
        total = gpu.total_bytes()
        try:
            record = record_for(gpu=ev.gpu, total_gib=total / 1024**3 if total else self.preset.hardware.memory_gib,
                                model=self.preset.model.id, knobs=self.preset.training, estimate=self.estimate,
                                measured=MeasuredLevels(allocated_gib=m.allocated_gib, reserved_gib=m.reserved_gib,
                                                        nvml_gib=m.nvml_gib))
            log(f"calibration: record appended to {append_record(record)}")
        except CannotWrite as e:
            log(f"calibration: {e}")

    def _start_event(self, state: Any) -> StartEvent:
        """Called by EventsCallback when training begins: the knobs plus what they resolved to."""
        from tuiwiz.train import build

        assert self.preset is not None and self.data is not None
        knobs, trainer, data = self.preset.training, self.trainer, self.data
        cfg = knobs.model_dump(mode="json")
        targets = trainer.model.peft_config["default"].target_modules
        cfg.update({
            "resolved": {
                "device": self.device, "compute_dtype": str(self.dtype).replace("torch.", ""),
                "quantization": {4: "bnb nf4" + (" + double quant" if knobs.double_quant else ""),
                                 8: "bnb int8", 16: "none"}[knobs.quant_bits],
                "attn_implementation": trainer.model.config._attn_implementation,
                "lora_target_modules": sorted(targets) if isinstance(targets, (set, list)) else targets,
                "loss": "trl fused lm head (chunked log-probs)" if knobs.loss == "chunked"
                        else "full logits (transformers Trainer.compute_loss)",
                "gradient_checkpointing_kwargs": build.GC_KWARGS if knobs.grad_checkpointing else None,
                "param_dtypes": build.param_dtype_summary(trainer.model),
                "report_to": self.report, "eval_steps": trainer.args.eval_steps,
                "save_steps": trainer.args.save_steps,
                "cutoff_len": knobs.cutoff_len, "truncated": data.truncated, "dropped": data.dropped_no_target,
                "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or os.environ.get("PYTORCH_ALLOC_CONF"),
            },
            "plan_peak_gib": self.preset.estimate.peak_gib if self.preset.estimate else None,  # driver level
            "plan_allocated_gib": self.preset.estimate.allocated_gib if self.preset.estimate else None,  # torch's
        })
        ckpt = self.resume_ckpt
        return StartEvent(run_id=self.paths.run_id, pid=os.getpid(),
                          device="cuda" if self.device.startswith("cuda") else "cpu", world_size=self.world,
                          versions=versions(), config=cfg, total_steps=state.max_steps,
                          start_step=state.global_step, resumed_from=str(ckpt) if ckpt else None,
                          train_samples=len(data.train), eval_samples=len(data.eval), note=self.note,
                          attempt=self.attempt)

    def _train(self) -> Any:
        ckpt = str(self.resume_ckpt) if self.resume_ckpt else None
        if ckpt:
            log(f"resuming from {ckpt}")
        result = self.trainer.train(resume_from_checkpoint=ckpt)
        self.step = self.trainer.state.global_step
        return result

    # ---- endings -------------------------------------------------------------------------
    def _finish_stopped(self) -> int:
        """Stopped on request: the trainer saved a checkpoint at this step; save the adapter too."""
        step, ckpt = self.step, last_checkpoint(self.paths)
        from tuiwiz.train.build import save_adapter

        save_adapter(self.trainer, str(self.paths.adapter), is_main=self.is_main)  # every rank when sharded
        self.emit(StoppedEvent(step=step, graceful=True, adapter_path=str(self.paths.adapter),
                               checkpoint_path=str(ckpt) if ckpt else None))
        self.status(state="stopped", step=step, ended_at=time.time())
        log(f"stopped at step {step}; checkpoint {ckpt}, adapter {self.paths.adapter}")
        return 0

    def _finish_done(self, result: Any, tokenizer: Any) -> int:
        """A last evaluation if the final step had none, then the adapter (and merged model)."""
        trainer, step = self.trainer, self.step
        if self.data and self.data.eval and trainer.state.log_history and not any(
                "eval_loss" in h and h.get("step") == step for h in trainer.state.log_history):
            trainer.evaluate()
        merged = None
        from tuiwiz.train.build import save_adapter

        save_adapter(trainer, str(self.paths.adapter), is_main=self.is_main)  # every rank when sharded
        if self.is_main:
            tokenizer.save_pretrained(str(self.paths.adapter))
            if self.merge:
                merged = self._merge(tokenizer)
        self.emit(DoneEvent(step=step, adapter_path=str(self.paths.adapter), merged_path=merged,
                            train_loss=result.training_loss, runtime_s=result.metrics.get("train_runtime"),
                            peak_gib=self._peak_gib()))
        self.status(state="finished", step=step, ended_at=time.time())
        log(f"done at step {step}; adapter saved to {self.paths.adapter}")
        return 0

    def _merge(self, tokenizer: Any) -> str | None:
        assert self.preset is not None
        if self.preset.training.quant_bits != 16:
            log("merge skipped: the base is quantized; merging into 4/8-bit weights would lose precision")
            return None
        merged = self.trainer.model.merge_and_unload()
        merged.save_pretrained(str(self.paths.merged))
        tokenizer.save_pretrained(str(self.paths.merged))
        log(f"merged model saved to {self.paths.merged}")
        return str(self.paths.merged)

    def _stopped_before_training(self) -> int:
        log("stop requested before training started; exiting without a checkpoint")
        self.emit(StoppedEvent(step=self.step, graceful=True))
        self.status(state="stopped", ended_at=time.time())
        return 0

    def _oom_fields(self, exc: BaseException) -> dict[str, Any]:
        """The error event's OOM fields: whether it hit the probe step, the measured overshoot, and
        the next plan corrected by it (what the step needed at least: this process's memory at
        the failure, or the card's used memory, plus the allocation that did not fit)."""
        from tuiwiz.train.classify import oom_sizes

        assert self.preset is not None
        sizes = oom_sizes(exc)
        needed = None
        if sizes is not None:
            own = self.gpu.process_bytes() if self.gpu is not None else None
            needed = (own + sizes.overshoot) if own is not None else (sizes.total - sizes.free + sizes.tried)
        probe = self.phase == "train" and self.step is not None and self.step == self.start_step
        return {"probe": probe, "overshoot_gib": round(sizes.overshoot / 1024**3, 3) if sizes else None,
                "smaller_plan": next_knobs(self.preset, self.spec, needed)}

    def _peak_gib(self) -> float | None:
        if not self.device.startswith("cuda"):
            return None
        import torch

        return round(torch.cuda.max_memory_allocated(self.device) / 1024**3, 3)

    def _fail(self, exc: BaseException) -> int:
        """Error event, then status 'failed', then the traceback in train.log; each is attempted
        even when another cannot be written. The disk reserve is given back first, so on a full
        disk the two records that say what happened still fit."""
        from tuiwiz.train.classify import classify

        free = _disk_free(self.paths.root)
        if self.writer is not None:
            self.writer.release_reserve()
        kind, message, suggestion = classify(exc, self.phase, run_dir=self.paths.root, disk_free=free)
        if self.step is None and self.trainer is not None:
            self.step = self.trainer.state.global_step
        oom: dict[str, Any] = {}
        if kind == "oom" and self.preset is not None:
            oom = _attempt("re-plan after the OOM", self._oom_fields, exc) or {}
        _attempt("write the error event", self.emit, ErrorEvent(
            kind=kind, message=message, suggestion=suggestion, step=self.step,
            peak_gib=_attempt("read the peak memory", self._peak_gib), **oom))
        _attempt("write status.json", self.status, state="failed", ended_at=time.time(), message=f"{kind}: {message}")
        _attempt("log the traceback", traceback.print_exception, exc)
        _attempt("log", log, f"FAILED ({kind}) during {self.phase}: {message}")
        return 1


def _attempt(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs), or None when it fails (said on stderr when stderr can still be written)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the failure path must reach its end
        try:
            print(f"[tuiwiz] could not {what}: {e}", file=sys.stderr, flush=True)
        except OSError:
            pass
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tuiwiz.train", description="tuiwiz training worker (detached)")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    ap.add_argument("--merge", action="store_true", help="also save a merged model (non-quantized bases)")
    args = ap.parse_args(argv)
    paths = RunPaths(args.run_dir.expanduser().resolve())
    if not paths.preset.exists():
        print(f"tuiwiz.train: {paths.root}: not a run directory (no preset.yaml)", file=sys.stderr)
        return 2
    rank = int(os.environ.get("RANK", "0"))
    stop_flag = threading.Event()

    def on_term(signum: int, _frame: Any) -> None:
        if not stop_flag.is_set():
            log(f"received signal {signum}: stopping after this step (checkpoint + adapter)")
        stop_flag.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a dropped SSH session must not matter
    lock_fd = None
    if "TUIWIZ_LOCK_FD" not in os.environ and "LOCAL_RANK" not in os.environ:
        lock_fd = take_lock(paths)  # started by hand: hold the run's lock ourselves
        if lock_fd is None:
            print(f"tuiwiz.train: run {paths.run_id} is already live", file=sys.stderr)
            return 2
    try:
        return Worker(paths, resume=args.resume, merge=args.merge, rank=rank, stop_flag=stop_flag,
                      record_pid=lock_fd is not None).run()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
