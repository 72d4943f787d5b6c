"""The events.jsonl schema and its crash-safe writer (no torch needed)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from waiting import wait_until

from tuiwiz.runs.events import (
    DoneEvent, ErrorEvent, ErrorKind, EvalEvent, EventFollower, EventWriter, LogEvent, StartEvent, StoppedEvent,
    parse_event, read_events,
)

REPO = Path(__file__).resolve().parents[1]


def _start(**kw: object) -> StartEvent:
    base = dict(run_id="r", pid=1, device="cpu", versions={"torch": "x"}, config={}, total_steps=10,
                train_samples=9, eval_samples=1)
    base.update(kw)
    return StartEvent(**base)  # type: ignore[arg-type]


def test_every_event_type_round_trips_through_one_line(tmp_path: Path) -> None:
    events = [_start(), LogEvent(step=1, loss=2.5, lr=1e-4, tokens_per_s=100.0), EvalEvent(step=1, eval_loss=2.4),
              StoppedEvent(step=1), ErrorEvent(kind="oom", message="m", suggestion="s", smaller_plan={"a": 1}),
              DoneEvent(step=1, adapter_path="/a")]
    with EventWriter(tmp_path / "events.jsonl") as w:
        for ev in events:
            w.write(ev)
    lines = (tmp_path / "events.jsonl").read_text().splitlines()
    assert len(lines) == len(events)
    assert [parse_event(line) for line in lines] == events


def test_unknown_event_name_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_event(json.dumps({"event": "bogus", "t": 1.0}))


def test_error_kind_outside_the_known_kinds_is_rejected() -> None:
    with pytest.raises(ValueError):
        parse_event(json.dumps({"event": "error", "kind": "gremlins", "message": "m", "suggestion": "s"}))


@pytest.mark.parametrize("kind", get_args(ErrorKind))
def test_every_error_kind_parses_and_is_documented(kind: str) -> None:
    docs = (REPO / "docs" / "runs.md").read_text(encoding="utf-8")
    assert f"`{kind}`" in docs  # the schema table names it
    ev = parse_event(json.dumps({"event": "error", "kind": kind, "message": "m", "suggestion": "s"}))
    assert ev.kind == kind  # type: ignore[union-attr]


def test_setup_and_disk_are_error_kinds() -> None:
    assert {"setup", "disk"} <= set(get_args(ErrorKind))


def test_extra_fields_are_rejected_so_schema_drift_is_caught() -> None:
    with pytest.raises(ValueError):
        parse_event(json.dumps({"event": "eval", "step": 1, "eval_loss": 1.0, "surprise": 1}))


def test_writer_appends_to_existing_file_and_reader_skips_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.write(LogEvent(step=1, loss=1.0))
    with EventWriter(path) as w:
        w.write(LogEvent(step=2, loss=0.5))
    with open(path, "ab") as fh:
        fh.write(b'{"event":"log","st')  # what a torn write would look like
    assert [e.step for e in read_events(path)] == [1, 2]  # type: ignore[union-attr]


def test_follower_returns_a_line_only_once_it_is_complete(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    line = LogEvent(step=7, loss=1.0).model_dump_json(exclude_none=True) + "\n"
    half = len(line) // 2
    path.write_text(line[:half])
    f = EventFollower(path)
    assert f.poll() == []
    with open(path, "a") as fh:
        fh.write(line[half:])
    got = f.poll()
    assert [e.step for e in got] == [7]  # type: ignore[union-attr]
    assert f.poll() == []


WRITER_SCRIPT = """
import sys, os
from tuiwiz.runs.events import EventWriter, LogEvent
w = EventWriter(sys.argv[1])
print("ready", flush=True)
i = 0
while True:
    i += 1
    w.write(LogEvent(step=i, loss=float(i), epoch=0.0))
    w.write(LogEvent.model_validate({"step": i, "loss": 1.0, "eta_s": 1.0}))
"""


def test_sigkill_mid_write_never_leaves_a_half_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):
        before = path.read_bytes().count(b"\n") if path.exists() else 0
        proc = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(path)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        # kill it while it writes: once it has added lines of its own
        wait_until(lambda: path.read_bytes().count(b"\n") >= before + 20, "the writer's lines")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    EventWriter(path).close()  # a resumed worker reopens the file: any torn tail is dropped
    data = path.read_bytes()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    assert len(lines) > 10
    for raw in lines:
        parse_event(raw)  # raises on any torn or invalid line


class _Disk:
    """A disk with `room` bytes left: writes take what fits (a short write), then fail ENOSPC."""

    def __init__(self, room: int, *, zero_instead_of_enospc: bool = False) -> None:
        self.room = room
        self.zero = zero_instead_of_enospc
        self.calls: list[int] = []

    def write(self, fd: int, data: bytes) -> int:
        self.calls.append(len(data))
        if self.room <= 0:
            if self.zero:
                return 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = os.write(fd, data[: self.room])  # really lands in the file, like a kernel short write
        self.room -= n
        return n


def _lines_of(path: Path) -> list[bytes]:
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n")
    return data.split(b"\n")[:-1]


def test_short_writes_are_continued_until_the_whole_line_is_in(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"

    def dribble(fd: int, data: bytes) -> int:  # a kernel that takes 7 bytes per call
        return os.write(fd, data[:7])

    with EventWriter(path, write=dribble) as w:
        w.write(LogEvent(step=1, loss=1.0))
        w.write(EvalEvent(step=1, eval_loss=0.5))
    assert [parse_event(raw) for raw in _lines_of(path)] == read_events(path)
    assert [e.event for e in read_events(path)] == ["log", "eval"]


@pytest.mark.parametrize("zero", [False, True], ids=["enospc", "zero-byte-write"])
def test_a_full_disk_cuts_the_partial_line_back_and_names_the_file(tmp_path: Path, zero: bool) -> None:
    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.write(LogEvent(step=1, loss=1.0))
    before = path.read_bytes()
    disk = _Disk(room=10, zero_instead_of_enospc=zero)
    with EventWriter(path, write=disk.write) as w:
        with pytest.raises(OSError) as info:
            w.write(LogEvent(step=2, loss=0.5, lr=1e-4))
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert len(disk.calls) == 2  # 10 bytes went in, then the disk was full
    assert path.read_bytes() == before  # the 10 bytes are gone again: only whole lines
    assert [e.step for e in read_events(path)] == [1]  # type: ignore[union-attr]


def test_after_a_full_disk_the_next_event_starts_on_a_clean_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    disk = _Disk(room=30)
    with EventWriter(path, write=disk.write) as w, pytest.raises(OSError):
        w.write(LogEvent(step=1))  # {"t":...,"event":"log","step":1} is longer than 30 bytes
    assert path.read_bytes() == b""
    with EventWriter(path) as w:
        w.write(ErrorEvent(kind="disk", message="full", suggestion="free space"))
    assert [e.event for e in read_events(path)] == ["error"]
    assert len(_lines_of(path)) == 1


def test_the_reserve_holds_real_bytes_until_released(tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "events.jsonl"
    with EventWriter(path) as w:
        w.reserve(256 * 1024)
        data = w.reserve_path.read_bytes()
        assert len(data) == 256 * 1024 and data.count(0) < 4096  # not zeros a file system could skip
        assert os.stat(w.reserve_path).st_blocks * 512 >= 256 * 1024  # allocated, not sparse
        free_held = shutil.disk_usage(tmp_path).free
        w.release_reserve()
        assert not w.reserve_path.exists()
        w.release_reserve()  # twice is fine
    assert shutil.disk_usage(tmp_path).free >= free_held  # never less room after releasing
