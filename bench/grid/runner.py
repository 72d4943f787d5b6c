"""The parent side of a child: start it, answer its NVML question, watch its memory through
NVML, and kill it on its timeout or the slice's deadline. Whatever happens becomes a result."""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grid import child
from grid.stack import NvmlProbe

FORK_FAILURE_SIGNS = ("forked subprocess", "initialization error", "cuda_error_not_initialized",
                      "cudaerrorinitializationerror")


@dataclass
class _Peaks:
    """The NVML peaks of one child: over its whole life, and over training alone."""

    all: int = 0
    train: int = 0
    src_all: str | None = None
    src_train: str | None = None
    training: bool = False

    def add(self, reading: tuple[int, str]) -> None:
        v, src = reading
        if v > self.all:
            self.all, self.src_all = v, src
        if self.training and v > self.train:
            self.train, self.src_train = v, src

    def fields(self) -> dict[str, Any]:
        return {"nvml_peak": self.train or None, "nvml_peak_all": self.all or None,
                "nvml_source": self.src_train or self.src_all}


class Runner:
    """Starts children and watches them. `mode` is "fork" or "spawn"; a child still running past
    `deadline_at` (time.monotonic) is killed and recorded as interrupted."""

    def __init__(self, scratch: Path, mode: str, probe: NvmlProbe | None, deadline_at: float | None):
        self.mode, self.probe, self.deadline_at = mode, probe, deadline_at
        self.logs = scratch / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def child(self, job: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run one job in a child; the result always has a status, wall_s and the NVML fields."""
        ctx = mp.get_context(self.mode)
        self.n += 1
        job = {**job, "log": str(self.logs / f"{self.n:03d}-{job['task']}.log")}
        parent_conn, child_conn = ctx.Pipe()
        if self.probe:
            self.probe.reset_baseline()
        proc = ctx.Process(target=child.child_main, args=(job, child_conn), daemon=True)
        t0 = time.monotonic()
        proc.start()
        child_conn.close()
        peaks = _Peaks()
        result, killed = self._watch(proc, parent_conn, peaks, t0, timeout)
        if result is None and killed is None:
            result = _late_result(parent_conn)
        _reap(proc)
        wall = round(time.monotonic() - t0, 2)
        if result is None:
            result = _no_result(killed, timeout, proc.exitcode)
        if result.get("status") != "ok" or job["task"] == "checkpoint":
            result["log_tail"] = tail(Path(job["log"]), 2500)
        result.update(peaks.fields())
        result["wall_s"] = wall
        return result

    def _watch(self, proc: Any, conn: Any, peaks: _Peaks, t0: float,
               timeout: float) -> tuple[dict[str, Any] | None, str | None]:
        """Until the child reports or exits: (its result, None); or (None, why it was killed)."""
        while True:
            result = self._receive(proc.pid, conn, peaks)
            reading = self._read(proc.pid)
            if reading:
                peaks.add(reading)
            if result is not None or not proc.is_alive():
                return result, None
            killed = self._kill_reason(t0, timeout)
            if killed:
                proc.kill()
                return None, killed

    def _receive(self, pid: int, conn: Any, peaks: _Peaks) -> dict[str, Any] | None:
        """Handle one message, if any: answer "ready" with NVML's reading, note "train", return a result."""
        try:
            if conn.poll(0.005):
                kind, payload = conn.recv()
                if kind == "ready":
                    reading = self._read(pid, samples=3)
                    conn.send(("nvml", reading[0] if reading else None))
                elif kind == "train":
                    peaks.training = True
                elif kind == "result":
                    return payload
        except (EOFError, OSError):
            pass
        return None

    def _kill_reason(self, t0: float, timeout: float) -> str | None:
        now = time.monotonic()
        if now - t0 > timeout:
            return "timeout"
        if self.deadline_at is not None and now > self.deadline_at:
            return "interrupted"
        return None

    def _read(self, pid: int, samples: int = 1) -> tuple[int, str] | None:
        """The largest of `samples` NVML readings of the child (None without NVML)."""
        if not self.probe:
            return None
        best = None
        for i in range(samples):
            try:
                r = self.probe.sample(pid)
            except Exception:  # noqa: BLE001
                return best
            best = r if best is None or r[0] > best[0] else best
            if i + 1 < samples:
                time.sleep(0.01)
        return best


def _late_result(conn: Any) -> dict[str, Any] | None:
    """A result sent just before the child exited."""
    while True:
        try:
            if not conn.poll(0.2):
                return None
            kind, payload = conn.recv()
            if kind == "result":
                return payload
        except (EOFError, OSError):
            return None


def _reap(proc: Any) -> None:
    proc.join(30)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _no_result(killed: str | None, timeout: float, exitcode: int | None) -> dict[str, Any]:
    if killed == "timeout":
        return {"status": "timeout", "error": f"killed after {timeout:.0f} s"}
    if killed == "interrupted":
        return {"status": "interrupted", "error": "the slice's deadline passed while it ran"}
    return {"status": "crash", "error": f"child exited with code {exitcode} and no result"}


def tail(path: Path, n: int) -> str:
    try:
        data = path.read_bytes()[-n:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def looks_like_fork_failure(rec: dict[str, Any]) -> bool:
    """Did CUDA fail to start in a forked child (then spawned children are the way)?"""
    text = f"{rec.get('error', '')} {rec.get('log_tail', '')}".lower()
    return any(s in text for s in FORK_FAILURE_SIGNS)
