"""The events.jsonl schema and its append-only writer.

One JSON object per line, appended on an O_APPEND descriptor (normally in one `os.write`), so
any number of readers can follow the file while the worker writes it. Readers never take a
line without its newline; a write the disk cannot hold is cut back to the last whole line.
See docs/runs.md.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

SCHEMA_VERSION = 1
#: oom: out of GPU memory; data: a bad example; cuda: a CUDA/driver fault; setup: a missing or
#: unusable package (e.g. flash_attn); disk: the run folder's disk is full; other: anything else.
ErrorKind = Literal["oom", "data", "cuda", "setup", "disk", "other"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    t: float = Field(default_factory=time.time, description="unix time the event was written")


class StartEvent(_Event):
    """Written once per worker start (a resume writes another one)."""

    event: Literal["start"] = "start"
    schema_version: int = SCHEMA_VERSION
    run_id: str
    pid: int
    device: str = Field(description="'cuda' or 'cpu'")
    world_size: int = 1
    versions: dict[str, str]
    config: dict[str, Any] = Field(description="the knobs that ran, plus resolved trainer settings")
    total_steps: int
    start_step: int = 0
    resumed_from: str | None = None
    train_samples: int
    eval_samples: int
    note: str | None = None
    attempt: int = Field(1, ge=1, description="1, then 2, 3... for each relaunch after a `replan` event")


class LogEvent(_Event):
    event: Literal["log"] = "log"
    step: int
    epoch: float | None = None
    loss: float | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_s: float | None = None
    samples_per_s: float | None = None
    mem_allocated_gib: float | None = None
    mem_reserved_gib: float | None = None
    mem_peak_gib: float | None = None
    eta_s: float | None = None


class EvalEvent(_Event):
    event: Literal["eval"] = "eval"
    step: int
    epoch: float | None = None
    eval_loss: float


class CheckpointEvent(_Event):
    event: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str


class DoneEvent(_Event):
    """Training finished normally; the adapter is saved."""

    event: Literal["done"] = "done"
    step: int
    adapter_path: str
    merged_path: str | None = None
    train_loss: float | None = None
    runtime_s: float | None = None
    peak_gib: float | None = None


class StoppedEvent(_Event):
    """Stopped on request: `graceful` means a checkpoint and the adapter were saved."""

    event: Literal["stopped"] = "stopped"
    step: int | None = None
    graceful: bool = True
    adapter_path: str | None = None
    checkpoint_path: str | None = None


class ErrorEvent(_Event):
    event: Literal["error"] = "error"
    kind: ErrorKind
    message: str
    suggestion: str
    step: int | None = None
    peak_gib: float | None = Field(None, description="torch's max allocated GPU memory when it failed (GiB)")
    smaller_plan: dict[str, Any] | None = Field(
        None, description="after an OOM: the TrainingKnobs of the next plan (same effective batch, smaller steps), "
                          "corrected by `overshoot_gib` when it was measured")
    probe: bool | None = Field(None, description="the OOM hit the worst-case first step after a start")
    overshoot_gib: float | None = Field(
        None, description="after a CUDA OOM: how far past the free GPU memory the failed allocation reached (GiB)")


class MemoryLevels(BaseModel):
    """What torch and NVML measured: null (left out) where they could not (on CPU)."""

    model_config = ConfigDict(extra="forbid")

    allocated_gib: float | None = Field(None, description="torch.cuda.max_memory_allocated since training began")
    reserved_gib: float | None = Field(None, description="torch.cuda.max_memory_reserved since training began")
    nvml_gib: float | None = Field(None, description="NVML: this process's GPU memory (or the device's used "
                                                     "memory minus what it used before the model loaded)")


class EstimateLevels(BaseModel):
    """The plan's (uncalibrated) estimate at the same three levels."""

    model_config = ConfigDict(extra="forbid")

    allocated_gib: float
    reserved_gib: float
    peak_gib: float = Field(description="driver level: reserved + CUDA context, compared with `nvml_gib`")


class MemoryEvent(_Event):
    """Measured memory next to the estimate: after the worst-case first step (`probe`) and at the end."""

    event: Literal["memory"] = "memory"
    step: int
    probe: bool = Field(description="true after the worst-case step that opens every (re)start")
    batch_tokens: int | None = Field(None, description="real tokens (no padding) in the largest micro-batch of "
                                                       "the step (of the whole run, for the end event)")
    gpu: str | None = Field(None, description="the NVML name of this rank's GPU")
    measured: MemoryLevels = Field(default_factory=MemoryLevels)
    estimate: EstimateLevels | None = None


class ReplanEvent(_Event):
    """A relaunch with the next plan after an OOM (`tuiwiz launch --auto-replan` or the monitor's key)."""

    event: Literal["replan"] = "replan"
    attempt: int = Field(ge=2, description="the attempt this relaunch starts (the first launch is attempt 1)")
    knobs: dict[str, Any] = Field(description="the TrainingKnobs the new attempt runs with")
    changed: dict[str, list[Any]] = Field(description="knob -> [before, after]")
    overshoot_gib: float | None = None
    resume_from: str | None = Field(None, description="the checkpoint it continues from; none: from step 0")
    auto: bool = False


Event = Annotated[
    Union[StartEvent, LogEvent, EvalEvent, CheckpointEvent, DoneEvent, StoppedEvent, ErrorEvent, MemoryEvent,
          ReplanEvent],
    Field(discriminator="event"),
]
EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
TERMINAL_EVENTS = ("done", "stopped", "error")


def parse_event(line: str | bytes) -> Event:
    """Validate one events.jsonl line; raises ValueError when it does not fit the schema."""
    try:
        return EVENT_ADAPTER.validate_json(line)
    except ValidationError as err:
        raise ValueError(str(err)) from None


def encode_event(event: BaseModel) -> bytes:
    """One whole line, newline included: the unit that is written atomically."""
    return (event.model_dump_json(exclude_none=True) + "\n").encode("utf-8")


#: Kept free next to events.jsonl while a run writes, so the final error event and status.json
#: still fit after the disk fills up (see `EventWriter.reserve`).
RESERVE_BYTES = 1024 * 1024
RESERVE_NAME = ".disk-reserve"


class EventWriter:
    """Appends events to events.jsonl as whole lines: a write the disk cannot take is undone.

    `write` is injectable so tests can play a disk that takes part of a line and then fills up.
    """

    def __init__(self, path: str | os.PathLike[str], *, write: Callable[[int, bytes], int] = os.write) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write = write
        self._repair_tail()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    @property
    def reserve_path(self) -> Path:
        return self.path.parent / RESERVE_NAME

    def reserve(self, size: int = RESERVE_BYTES) -> None:
        """Hold `size` bytes of the disk in a file, to be given back by `release_reserve` when it fills.

        Random bytes, not zeros or a sparse file: a compressing or deduplicating file system
        would otherwise hold nothing.
        """
        try:
            with open(self.reserve_path, "wb") as fh:
                fh.write(os.urandom(size))
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            self.release_reserve()
            raise

    def release_reserve(self) -> None:
        """Give the reserved bytes back (the disk is full, or the run is over)."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            pass

    def _repair_tail(self) -> None:
        """Drop an unterminated last line left by a killed writer.

        One write(2) is all-or-nothing for readers in practice, but Linux may cut a write
        that crosses a page boundary short when SIGKILL arrives mid-copy. Readers never
        consume a line without its newline; a new writer (resume) truncates such a tail
        so that the next event does not get glued onto it.
        """
        try:
            with open(self.path, "rb+") as fh:
                size = fh.seek(0, os.SEEK_END)
                if size == 0:
                    return
                fh.seek(size - 1)
                if fh.read(1) == b"\n":
                    return
                pos = size
                while pos > 0:
                    step = min(4096, pos)
                    fh.seek(pos - step)
                    chunk = fh.read(step)
                    nl = chunk.rfind(b"\n")
                    if nl >= 0:
                        fh.truncate(pos - step + nl + 1)
                        return
                    pos -= step
                fh.truncate(0)
        except FileNotFoundError:
            pass

    def write(self, event: BaseModel) -> None:
        """Append one line. A short write is continued; when the disk is full the partial line is
        cut off again and OSError(ENOSPC) names the file, so the log only ever holds whole lines."""
        data = encode_event(event)
        start = os.fstat(self._fd).st_size  # the only writer: the line starts at today's end
        done = 0
        try:
            while done < len(data):
                n = self._write(self._fd, data[done:])
                if n <= 0:  # a write that takes nothing: the disk is full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                done += n
        except OSError as err:
            if done:
                os.ftruncate(self._fd, start)
            if err.filename is None:
                raise OSError(err.errno, err.strerror, str(self.path)) from err
            raise

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "EventWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_events(path: str | os.PathLike[str]) -> list[Event]:
    """All complete, valid events in a file (a trailing partial line is not an event yet)."""
    return list(iter_events(path))


def iter_events(path: str | os.PathLike[str]) -> Iterator[Event]:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return
    for raw in data.split(b"\n")[:-1]:
        if raw.strip():
            try:
                yield parse_event(raw)
            except ValueError:
                continue


class EventFollower:
    """Incrementally reads new complete lines from events.jsonl (re-attach replays from 0)."""

    def __init__(self, path: str | os.PathLike[str], offset: int = 0) -> None:
        self.path = Path(path)
        self.offset = offset
        self._partial = b""
        self.bad_lines = 0

    def poll(self) -> list[Event]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out: list[Event] = []
        for raw in lines:
            if not raw.strip():
                continue
            try:
                out.append(parse_event(raw))
            except ValueError:
                self.bad_lines += 1
        return out
