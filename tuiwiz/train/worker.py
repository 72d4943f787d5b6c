"""The detached training worker: builds everything from RUN_DIR/preset.yaml and trains.

It never talks to a terminal: progress goes to events.jsonl (schema in tuiwiz.runs.events),
state to status.json, and everything else (library output, tracebacks) to train.log.
A SIGTERM asks for a graceful stop: finish the step, save a checkpoint and the adapter, exit.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from tuiwiz.errors import UserError
from tuiwiz.preset import Preset, load_preset
from tuiwiz.runs.events import DoneEvent, ErrorEvent, EventWriter, StartEvent, StoppedEvent
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import last_checkpoint, take_lock, update_status

HEARTBEAT_S = float(os.environ.get("TUIWIZ_HEARTBEAT_S", "5"))


def log(msg: str) -> None:
    print(f"[tuiwiz {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("tuiwiz", "torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            if dist == "tuiwiz":
                import tuiwiz

                out[dist] = tuiwiz.__version__
            else:
                out[dist] = "missing"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda)
    except ImportError:  # pragma: no cover
        pass
    return out


def smaller_knobs(preset: Preset) -> dict[str, Any]:
    """The advisor's smaller plan to relaunch with after an OOM."""
    from tuiwiz.planning.advisor import smaller_plan

    return smaller_plan(preset.training).model_dump(mode="json")


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


class Worker:
    def __init__(self, paths: RunPaths, *, resume: bool, merge: bool, rank: int, stop_flag: threading.Event) -> None:
        self.paths = paths
        self.resume = resume
        self.merge = merge
        self.rank = rank
        self.is_main = rank == 0
        self.stop_flag = stop_flag
        self.writer = EventWriter(paths.events) if self.is_main else None
        self.phase = "setup"
        self.step: int | None = None
        self.device = "cpu"
        self.preset: Preset | None = None
        self.trainer: Any = None

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
            except OSError:
                pass

    def run(self) -> int:
        self.stop_heartbeat = threading.Event()
        threading.Thread(target=self.heartbeat, daemon=True, name="heartbeat").start()
        try:
            return self._run()
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an error event
            return self._fail(exc)
        finally:
            self.stop_heartbeat.set()
            if self.writer is not None:
                self.writer.close()

    def _peak_gib(self) -> float | None:
        try:
            import torch

            if self.device.startswith("cuda") and torch.cuda.is_available():
                return round(torch.cuda.max_memory_allocated(self.device) / 1024**3, 3)
        except Exception:  # noqa: BLE001
            pass
        return None

    def _fail(self, exc: BaseException) -> int:
        from tuiwiz.train.classify import classify

        traceback.print_exc()
        kind, message, suggestion = classify(exc, self.phase)
        smaller = None
        if kind == "oom" and self.preset is not None:
            try:
                smaller = smaller_knobs(self.preset)
            except Exception as e:  # noqa: BLE001
                log(f"could not compute a smaller plan: {e}")
        if self.step is None and self.trainer is not None:
            self.step = self.trainer.state.global_step
        self.emit(ErrorEvent(kind=kind, message=message, suggestion=suggestion, step=self.step,
                             peak_gib=self._peak_gib(), smaller_plan=smaller))
        self.status(state="failed", ended_at=time.time(), message=f"{kind}: {message}")
        log(f"FAILED ({kind}) during {self.phase}: {message}")
        return 1

    def _stopped_before_training(self) -> int:
        log("stop requested before training started; exiting without a checkpoint")
        self.emit(StoppedEvent(step=self.step, graceful=True))
        self.status(state="stopped", ended_at=time.time())
        return 0

    def _run(self) -> int:
        paths = self.paths
        self.status(state="running", heartbeat=time.time())
        log(f"worker pid {os.getpid()} rank {self.rank} for run {paths.run_id}")
        self.preset = preset = load_preset(paths.preset)
        knobs = preset.training

        self.phase = "data"
        from tuiwiz.train.dataset import build_examples

        data = build_examples(preset)
        log(f"data: {data.total} examples -> {len(data.train)} train / {len(data.eval)} validation, "
            f"{data.tokens} tokens" + (f"; {'; '.join(data.notes)}" if data.notes else ""))
        if self.stop_flag.is_set():
            return self._stopped_before_training()

        self.phase = "model"
        import torch

        from tuiwiz.train import build
        from tuiwiz.train.callbacks import EventsCallback, FaultCallback, FaultyCollator, GracefulStopCallback
        from tuiwiz.train.faults import fault_from_env, step_delay_from_env

        self.device = device = build.resolve_device()
        note = None
        if device == "cpu":
            note = "running on CPU (no CUDA device visible): fine for tiny test models only"
            log(note)
            torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        dtype = build.compute_dtype(knobs, device, preset.hardware.bf16)
        model = build.build_model(preset, knobs, device)
        tokenizer = build.load_hf_tokenizer(_tokenizer_folder(preset), preset.model.trust_remote_code)
        if self.stop_flag.is_set():
            return self._stopped_before_training()

        self.phase = "train"
        fault = fault_from_env()
        world = int(os.environ.get("WORLD_SIZE", "1"))
        resume_ckpt = last_checkpoint(paths) if self.resume else None
        if self.resume and resume_ckpt is None:
            raise UserError(f"{paths.checkpoints}: no complete checkpoint to resume from.")
        report = build.report_to()
        if report == "tensorboard":
            os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(paths.tensorboard))
        stop_cb = GracefulStopCallback(self.stop_flag)
        holder: dict[str, Any] = {}

        def start_event(state: Any) -> StartEvent:
            trainer = holder["trainer"]
            cfg = knobs.model_dump(mode="json")
            cfg.update({
                "resolved": {
                    "device": device, "compute_dtype": str(dtype).replace("torch.", ""),
                    "quantization": {4: "bnb nf4" + (" + double quant" if knobs.double_quant else ""),
                                     8: "bnb int8", 16: "none"}[knobs.quant_bits],
                    "attn_implementation": build.attn_implementation(knobs, device, model.config.model_type),
                    "lora_target_modules": build.lora_targets(knobs, model),
                    "loss": "trl fused lm head (chunked log-probs)" if knobs.loss == "chunked"
                            else "full logits (transformers Trainer.compute_loss)",
                    "gradient_checkpointing_kwargs": build.GC_KWARGS if knobs.grad_checkpointing else None,
                    "param_dtypes": build.param_dtype_summary(trainer.model),
                    "report_to": report, "eval_steps": trainer.args.eval_steps, "save_steps": trainer.args.save_steps,
                    "cutoff_len": knobs.cutoff_len, "truncated": data.truncated, "dropped": data.dropped_no_target,
                },
                "plan_peak_gib": preset.estimate.peak_gib if preset.estimate else None,
            })
            return StartEvent(run_id=paths.run_id, pid=os.getpid(), device="cuda" if device.startswith("cuda") else "cpu",
                              world_size=world, versions=versions(), config=cfg, total_steps=state.max_steps,
                              start_step=state.global_step, resumed_from=str(resume_ckpt) if resume_ckpt else None,
                              train_samples=len(data.train), eval_samples=len(data.eval), note=note)

        events_cb = EventsCallback(self.writer, paths, start_event, device,
                                   samples_per_step=knobs.micro_batch_size * knobs.grad_accum * world)
        trainer = build.build_trainer(model, tokenizer, knobs, data.train, data.eval, paths.checkpoints,
                                      device=device, report=report, hardware_bf16=preset.hardware.bf16,
                                      callbacks=[events_cb, stop_cb, FaultCallback(fault, step_delay_from_env())])
        holder["trainer"] = self.trainer = trainer
        if fault is not None:
            log(f"TEST SEAM: TUIWIZ_FAULT={fault.kind}@{fault.step} is set")
            if fault.kind == "data":
                trainer.data_collator = FaultyCollator(trainer.data_collator, fault, trainer)
        if resume_ckpt is not None:
            log(f"resuming from {resume_ckpt}")
        result = trainer.train(resume_from_checkpoint=str(resume_ckpt) if resume_ckpt else None)
        self.step = step = trainer.state.global_step

        if stop_cb.stopped_at is not None:
            ckpt = last_checkpoint(paths)
            if self.is_main:
                trainer.save_model(str(paths.adapter))
            self.emit(StoppedEvent(step=step, graceful=True, adapter_path=str(paths.adapter),
                                   checkpoint_path=str(ckpt) if ckpt else None))
            self.status(state="stopped", step=step, ended_at=time.time())
            log(f"stopped at step {step}; checkpoint {ckpt}, adapter {paths.adapter}")
            return 0

        if data.eval and trainer.state.log_history and not any(
                "eval_loss" in h and h.get("step") == step for h in trainer.state.log_history):
            trainer.evaluate()
        merged = None
        if self.is_main:
            trainer.save_model(str(paths.adapter))
            tokenizer.save_pretrained(str(paths.adapter))
            if self.merge:
                merged = self._merge(trainer, tokenizer)
        self.emit(DoneEvent(step=step, adapter_path=str(paths.adapter), merged_path=merged,
                            train_loss=result.training_loss, runtime_s=result.metrics.get("train_runtime"),
                            peak_gib=self._peak_gib()))
        self.status(state="finished", step=step, ended_at=time.time())
        log(f"done at step {step}; adapter saved to {paths.adapter}")
        return 0

    def _merge(self, trainer: Any, tokenizer: Any) -> str | None:
        assert self.preset is not None
        if self.preset.training.quant_bits != 16:
            log("--merge skipped: the base is quantized; merging into 4/8-bit weights would lose precision")
            return None
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(str(self.paths.merged))
        tokenizer.save_pretrained(str(self.paths.merged))
        log(f"merged model saved to {self.paths.merged}")
        return str(self.paths.merged)


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
    _write_pid_file(paths, rank)
    if lock_fd is not None:
        update_status(paths, pid=os.getpid())
    try:
        return Worker(paths, resume=args.resume, merge=args.merge, rank=rank, stop_flag=stop_flag).run()
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
