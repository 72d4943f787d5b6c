"""One slice on this machine: checkpoints built and released per model, each point run in a
child and recorded at once, and a stop after too many failures in a row (a broken stack)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grid.points import GIB, Point, model_bytes_bf16, model_config, point_run_knobs
from grid.records import FAILED, LEVELS, append_record, base_record, level_error
from grid.runner import Runner, looks_like_fork_failure
from grid.slices import SliceResult, run_slice
from grid.timing import Predictor, predict_ckpt_s, predict_point_s


class StopGrid(Exception):
    """Too many failures in a row: stop the slice rather than record every point as failed."""


@dataclass
class Session:
    """The state of one slice. `records` is the list read from `jsonl`; new records are appended
    to both. `env` (GPU, versions, child mode) goes into every record."""

    device: str
    scratch: Path
    tiny: bool
    point_timeout: float  # the minimum; a point's timeout is max(this, 4 x predicted)
    max_failures: int  # 0: never stop
    auto_mode: bool  # may switch from forked to spawned children when CUDA fails in a fork
    runner: Runner
    env: dict[str, Any]
    jsonl: Path
    records: list[dict[str, Any]]
    scale: float
    ckpts: dict[str, Path] = field(default_factory=dict)
    ckpt_s: dict[str, float] = field(default_factory=dict)
    failures: int = 0

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def run(self, todo: list[Point], predictor: Predictor, deadline_s: float | None,
            elapsed: Callable[[], float]) -> SliceResult:
        """The slice loop over `todo`; checkpoint folders left empty are removed, whatever happens."""
        try:
            return run_slice(todo, predictor.point, predictor.ckpt, deadline_s, elapsed, self.ensure_ckpt,
                             self.run_point, self.release_ckpt, self.on_record)
        finally:
            for root in {p.parent for p in self.ckpts.values()}:
                try:
                    root.rmdir()  # only when empty: a checkpoint left for the next slice stays
                except OSError:
                    pass

    # ---- checkpoints -------------------------------------------------------------------------

    def ensure_ckpt(self, model: str) -> str | None:
        """Draw the model's random checkpoint in a child, unless an earlier slice left it. Returns
        None, or why it failed (each point of the model is then recorded with it)."""
        path = self._ckpt_path(model)
        self.ckpts[model] = path
        if (path / "config.json").is_file():
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        res = self.runner.child({"task": "checkpoint", "config": model_config(model, self.tiny), "path": str(path),
                                 "device": self.device}, timeout=max(120.0, 6 * predict_ckpt_s(model, self.tiny)))
        if res.get("status") != "ok":
            print(f"memory_grid: checkpoint for {model} failed: {res.get('error')}\n{res.get('log_tail', '')}",
                  flush=True)
            return f"{res.get('status')}: {res.get('error')}"
        self.ckpt_s[model] = res.get("ckpt_s", res["wall_s"])
        print(f"memory_grid: checkpoint {model} -> {path} in {res['wall_s']:.1f} s", flush=True)
        return None

    def _ckpt_path(self, model: str) -> Path:
        root = scratch_dir(self.scratch, 0 if self.tiny else model_bytes_bf16(model))
        return root / (("tiny-" if self.tiny else "") + model.replace("/", "__"))

    def release_ckpt(self, model: str) -> None:
        if model in self.ckpts:
            shutil.rmtree(self.ckpts[model], ignore_errors=True)

    # ---- points ------------------------------------------------------------------------------

    def run_point(self, p: Point) -> dict[str, Any]:
        """The point's record: what it is, what the child measured, and where and how it ran."""
        rec = base_record(p)
        pred = predict_point_s(p)
        job = {"task": "point", "knobs": point_run_knobs(p).model_dump(mode="json"), "device": self.device,
               "checkpoint": str(self.ckpts[p.model]), "card_bytes": rec["card_bytes"] if self.on_gpu else None,
               "out_dir": str(self.scratch / "out")}
        rec.update(self._child(job, timeout=max(self.point_timeout, 4 * pred * self.scale)))
        rec.update(self.env)
        rec.update(pred_s=round(pred, 1), ckpt_s=self.ckpt_s.pop(p.model, None), child_mode=self.runner.mode,
                   device=self.device, time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return rec

    def _child(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run a point's child; if CUDA failed in a fork (auto mode), switch to spawn and run it again."""
        res = self.runner.child(job, timeout=timeout)
        if self.auto_mode and self.runner.mode == "fork" and res.get("status") in ("error", "crash") \
                and looks_like_fork_failure(res):
            print("memory_grid: CUDA failed in a forked child; switching to spawned children", flush=True)
            self.runner.mode = "spawn"
            res = self.runner.child(job, timeout=timeout)
        return res

    def on_record(self, p: Point, rec: dict[str, Any]) -> None:
        """Append the record at once (a killed slice keeps it), print it in brief, count failures."""
        if "id" not in rec:  # a checkpoint failure: the point still gets its record
            rec = {**base_record(p), **rec, **self.env}
        append_record(self.jsonl, rec)
        self.records.append(rec)
        print(f"memory_grid: {p.id} {json.dumps(_brief(rec))}", flush=True)
        self.failures = self.failures + 1 if rec.get("status") in FAILED else 0
        if self.max_failures and self.failures >= self.max_failures:
            print(f"memory_grid: log of the last failure:\n{rec.get('log_tail') or rec.get('traceback') or ''}",
                  flush=True)
            raise StopGrid(f"{self.failures} failures in a row: the stack looks broken. Fix it, then re-run with "
                           "--retry-errors (recorded failures are otherwise skipped).")


def _brief(rec: dict[str, Any]) -> dict[str, Any]:
    """The console line of a record: status, times, the estimate's error at each level, the error."""
    brief = {k: rec.get(k) for k in ("status", "wall_s", "pred_s")}
    for level, got, est in LEVELS:
        err = level_error(rec, got, est)
        if err is not None:
            brief[f"err_{level}"] = f"{err:+.1%}"
    if rec.get("error"):
        brief["error"] = str(rec["error"])[:200]
    return brief


def scratch_dir(requested: Path, need_bytes: int) -> Path:
    """/dev/shm when it has room for the checkpoint (plus 2 GiB), else `requested`. The /dev/shm
    folder is named after `requested`, so runs with different --scratch never share checkpoints."""
    shm = Path("/dev/shm")
    try:
        if shm.is_dir() and shutil.disk_usage(shm).free > need_bytes + 2 * GIB:
            tag = hashlib.sha1(str(requested.resolve()).encode()).hexdigest()[:8]
            return shm / f"tuiwiz-grid-{tag}"
    except OSError:
        pass
    return requested
