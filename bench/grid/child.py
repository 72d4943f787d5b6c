"""A child process (forked or spawned): one task, one result message. Tasks: "point" (build
the model with the worker's own builder and train a few steps), "checkpoint" (draw a random
checkpoint), "probe" (can a child start CUDA?). The parent reads NVML while the child runs."""

from __future__ import annotations

import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from tuiwiz.planning.knobs import TrainingKnobs


def child_main(job: dict[str, Any], conn: Any) -> None:
    """Entry point of a child process: one task, one ("result", record) message, then exit."""
    _redirect_output(job["log"])
    rec: dict[str, Any] = {}  # filled in place, so an exception keeps what was measured (and the phase)
    try:
        if job["task"] == "checkpoint":
            rec.update(_checkpoint(job))
        elif job["task"] == "probe":
            rec.update(_probe())
        else:
            _point(job, conn, rec)
    except BaseException as e:  # noqa: BLE001 - everything goes into the record
        oom = "out of memory" in str(e).lower()
        rec.update(status="oom" if oom else "error", oom=oom, error=f"{type(e).__name__}: {str(e)[:400]}",
                   traceback=traceback.format_exc()[-3000:])
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        conn.send(("result", rec))
        conn.close()
    finally:
        os._exit(0)


def _redirect_output(log: str) -> None:
    """stdout and stderr into the point's log: the parent keeps its tail when the point fails."""
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    except OSError:
        pass


def _checkpoint(job: dict[str, Any]) -> dict[str, Any]:
    from tuiwiz.train.build import random_checkpoint

    t0 = time.monotonic()
    tmp = Path(job["path"] + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    device = "cuda:0" if job["device"].startswith("cuda") else "cpu"
    random_checkpoint(job["config"], tmp, device=device)
    os.replace(tmp, job["path"])
    return {"status": "ok", "ckpt_s": round(time.monotonic() - t0, 2)}


def _probe() -> dict[str, Any]:
    """Can a child forked from this parent start CUDA? (The parent's imports may have initialised
    the driver without creating a context, which NVML cannot see.)"""
    import torch

    torch.cuda.init()
    x = torch.ones(16, device="cuda:0")
    return {"status": "ok" if float(x.sum().item()) == 16.0 else "error"}


# ---- a point -----------------------------------------------------------------------------------

def _point(job: dict[str, Any], conn: Any, rec: dict[str, Any]) -> None:
    """Start CUDA (and cap the allocator for a plan check), then load and train; torch's peaks last."""
    import torch

    knobs = TrainingKnobs.model_validate(job["knobs"])
    on_gpu = job["device"].startswith("cuda")
    rec["phase"] = "init"
    if on_gpu:
        _start_cuda(job, conn, rec)
    try:
        _load_and_train(job, knobs, conn, rec, on_gpu)
        rec.update(status="ok", oom=False)
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", oom=True, error=str(e).splitlines()[0][:300])
    if on_gpu:
        rec["max_allocated"] = int(torch.cuda.max_memory_allocated())
        rec["max_reserved"] = int(torch.cuda.max_memory_reserved())
    else:
        rec.update(max_allocated=None, max_reserved=None)


def _start_cuda(job: dict[str, Any], conn: Any, rec: dict[str, Any]) -> None:
    """Create the context and a cuBLAS handle, ask the parent for NVML's reading of this process
    (the context = that minus torch's reserved), and cap the allocator to the simulated card."""
    import torch

    torch.cuda.set_device(0)
    x = torch.ones((256, 256), device=job["device"], dtype=torch.bfloat16)
    (x @ x).sum().item()  # context, cuBLAS handle
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    conn.send(("ready", {"reserved": reserved}))
    reply = conn.recv()  # ("nvml", bytes | None): the parent's reading of this process
    nvml_now = reply[1] if reply and reply[0] == "nvml" else None
    rec["ctx_at_init"] = int(nvml_now - reserved) if nvml_now else None
    total = torch.cuda.get_device_properties(0).total_memory
    rec["total_memory"] = int(total)
    if job.get("card_bytes"):
        rec.update(_cap_allocator(job["card_bytes"], rec["ctx_at_init"], total))
    del x


def _cap_allocator(card_bytes: int, ctx_at_init: int | None, total: int) -> dict[str, Any]:
    """The card minus the CUDA context (the cap does not cover the context): measured, else the prior."""
    import torch

    from tuiwiz.planning.memory import CUDA_CONTEXT_BYTES

    ctx = ctx_at_init if ctx_at_init and ctx_at_init > 0 else CUDA_CONTEXT_BYTES
    cap = min(total, card_bytes - ctx)
    frac = max(0.01, min(1.0, cap / total))
    torch.cuda.set_per_process_memory_fraction(frac, 0)
    return {"cap_bytes": int(cap), "cap_fraction": round(frac, 5)}


def _load_and_train(job: dict[str, Any], knobs: TrainingKnobs, conn: Any, rec: dict[str, Any],
                    on_gpu: bool) -> None:
    """The worker's own builder and trainer; torch's peak stats are reset once both are built."""
    import torch

    from tuiwiz.train.build import build_model, build_trainer

    rec["phase"] = "load"
    t0 = time.monotonic()
    model = build_model(job["checkpoint"], knobs, device=job["device"])
    rec["load_s"] = round(time.monotonic() - t0, 2)
    if on_gpu:
        rec["after_load_allocated"] = int(torch.cuda.memory_allocated())
        rec["after_load_reserved"] = int(torch.cuda.memory_reserved())
    rows = _synthetic_rows(knobs, int(model.config.vocab_size))
    times: list[float] = []
    rec["phase"] = "trainer"
    trainer = build_trainer(model, _dummy_tokenizer(), knobs, rows, [], job["out_dir"], device=job["device"],
                            callbacks=[_step_timer(times, on_gpu)])
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    conn.send(("train", {}))
    rec["phase"] = "train"
    t0 = time.monotonic()
    trainer.train()
    if on_gpu:
        torch.cuda.synchronize()
    rec["train_s"] = round(time.monotonic() - t0, 2)
    if len(times) >= 2:
        rec["s_per_step"] = round((times[-1] - times[0]) / (len(times) - 1), 3)


def _synthetic_rows(knobs: TrainingKnobs, vocab: int) -> list[dict[str, Any]]:
    """Full-length pre-tokenized rows, every token scored: the worst case the estimate covers."""
    import torch

    n_rows = knobs.micro_batch_size * knobs.grad_accum * (knobs.max_steps or 1)
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(10, max(11, vocab - 10), (knobs.cutoff_len,), generator=g).tolist(),
             "completion_mask": [1] * knobs.cutoff_len} for _ in range(n_rows)]


def _step_timer(times: list[float], on_gpu: bool) -> Any:
    """A trainer callback that appends the time at the end of each optimizer step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # type: ignore[override]
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.monotonic())

    return StepTimer()


def _dummy_tokenizer() -> Any:
    """A fast tokenizer for padding only (rows are pre-tokenized): pad 1, eos 2, bos 3."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t1", eos_token="t2", bos_token="t3")
