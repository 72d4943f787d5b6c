"""A full disk mid-run: the run ends `failed` with error kind `disk`, and events.jsonl stays whole lines.

Three levels: the classification of the errors a full disk really produces; the real worker with
the TUIWIZ_FAULT=enospc seam; and the real worker on a small tmpfs that its checkpoints fill
(root only: it mounts one).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tuiwiz.preset import preset_from_dict
from tuiwiz.runs.events import RESERVE_BYTES, RESERVE_NAME, ErrorEvent, LogEvent, parse_event
from tuiwiz.runs.launcher import launch
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.status import is_live, read_status, summarize

from tiny_model import tiny_preset_dict, worker_env

TIMEOUT = 120.0
RUN_DIR = Path("/runs/r1")


# ---- classification ---------------------------------------------------------------------------
def _classify(exc: BaseException, **kw):
    from tuiwiz.train.classify import classify

    return classify(exc, "train", run_dir=RUN_DIR, **kw)


def test_enospc_and_quota_are_disk_errors_naming_the_run_folder() -> None:
    for code in (errno.ENOSPC, errno.EDQUOT):
        kind, message, suggestion = _classify(OSError(code, os.strerror(code), "/runs/r1/events.jsonl"))
        assert kind == "disk" and str(RUN_DIR) in message and "Free space" in suggestion
        assert "--" not in suggestion  # core words, no CLI flags


def test_a_status_write_on_a_full_disk_is_a_disk_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """write_text_atomic turns the OSError into CannotWrite (`from None`); the cause is still found."""
    from tuiwiz.errors import CannotWrite
    from tuiwiz.runs.status import update_status

    paths = RunPaths(tmp_path / "r1")

    def full(_fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr("tuiwiz.atomic.os.fsync", full)
        with pytest.raises(CannotWrite) as info:
            update_status(paths, step=3)
    assert _classify(info.value)[0] == "disk"
    assert _classify(info.value)[0] == "disk"  # also in the data phase, where a UserError means bad data
    from tuiwiz.train.classify import classify

    assert classify(info.value, "data")[0] == "disk"


def test_safetensors_and_torch_save_failures_on_a_full_disk_are_disk_errors() -> None:
    safetensors = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert _classify(safetensors)[0] == "disk"
    torch_save = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert _classify(torch_save, disk_free=0)[0] == "disk"  # it never says why: the free space does
    assert _classify(torch_save, disk_free=50 * 2**30)[0] == "other"
    assert _classify(torch_save)[0] == "other"


def test_an_oom_stays_an_oom_on_a_nearly_full_disk() -> None:
    torch = pytest.importorskip("torch")
    assert _classify(torch.OutOfMemoryError("CUDA out of memory"), disk_free=0)[0] == "oom"


def _worker(tmp_path: Path, write) -> tuple[object, RunPaths]:
    import threading

    from tuiwiz.runs.events import EventWriter
    from tuiwiz.train.worker import Worker

    paths = RunPaths(tmp_path / "r1")
    paths.root.mkdir()
    w = Worker(paths, resume=False, merge=False, rank=0, stop_flag=threading.Event())
    w.writer = EventWriter(paths.events, write=write)
    w.writer.reserve(64 * 1024)
    return w, paths


def test_the_failure_path_records_failed_even_when_no_event_fits(tmp_path: Path) -> None:
    def full(_fd: int, _data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    w, paths = _worker(tmp_path, full)
    assert w._fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(paths.status))) == 1
    status = read_status(paths)
    assert status is not None and status.state == "failed" and status.message.startswith("disk: ")
    assert paths.events.read_bytes() == b""  # nothing torn was left behind
    assert not (paths.root / RESERVE_NAME).exists()


def test_the_failure_path_writes_the_disk_error_event_when_it_fits(tmp_path: Path) -> None:
    w, paths = _worker(tmp_path, os.write)
    assert (paths.root / RESERVE_NAME).stat().st_size == 64 * 1024
    w._fail(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(paths.checkpoints)))
    err = _assert_failed_on_disk(paths)
    assert str(paths.checkpoints) in err.message


# ---- the real worker ---------------------------------------------------------------------------
def _events(paths: RunPaths) -> list:
    data = paths.events.read_bytes()
    assert data == b"" or data.endswith(b"\n"), data[-200:]
    return [parse_event(raw) for raw in data.split(b"\n")[:-1]]  # every line must be whole and valid


def _wait(paths: RunPaths, done) -> None:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if done():
            return
        time.sleep(0.1)
    tail = paths.log.read_text(errors="replace")[-3000:] if paths.log.exists() else "(no log)"
    pytest.fail(f"timed out; train.log tail:\n{tail}")


def _exited(paths: RunPaths) -> bool:
    return paths.events.exists() and not is_live(paths)


def _assert_failed_on_disk(paths: RunPaths) -> ErrorEvent:
    events = _events(paths)
    err = events[-1]
    assert isinstance(err, ErrorEvent) and err.kind == "disk", paths.log.read_text(errors="replace")[-3000:]
    assert str(paths.root) in err.message
    status = read_status(paths)
    assert status is not None and status.state == "failed" and (status.message or "").startswith("disk: ")
    assert summarize(paths).state == "failed"
    assert not (paths.root / RESERVE_NAME).exists()  # given back to make room
    return err


@pytest.mark.slow
def test_injected_enospc_ends_the_run_failed_with_kind_disk(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = tiny
    preset = preset_from_dict(tiny_preset_dict(model, data, max_steps=6, save_steps=100))
    run = launch(preset, tmp_path, run_id="enospc", env=worker_env(TUIWIZ_FAULT="enospc@3", TUIWIZ_STEP_DELAY="0.3"))
    _wait(run.paths, lambda: any(isinstance(e, LogEvent) for e in _events(run.paths))
          if run.paths.events.exists() else False)
    reserve = run.paths.root / RESERVE_NAME
    assert reserve.stat().st_size == RESERVE_BYTES  # held while the run writes
    _wait(run.paths, lambda: _exited(run.paths))
    err = _assert_failed_on_disk(run.paths)
    assert err.step == 2 and "checkpoints" in err.message


def _mount_tmpfs(where: Path, mib: int) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    where.mkdir(parents=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(where)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def _fill(disk: Path, leave: int) -> None:
    """Something else takes the disk: a ballast file grows until only `leave` bytes are free.

    In steps, re-reading the free space: the worker writes meanwhile, and tmpfs undoes a whole
    fallocate that does not fit.
    """
    fd = os.open(disk / "ballast", os.O_WRONLY | os.O_CREAT, 0o644)
    size = 0
    try:
        for _ in range(10_000):
            want = shutil.disk_usage(disk).free - leave
            if want <= 0:
                return
            step = min(want, 16 << 20)
            try:
                os.posix_fallocate(fd, size, step)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                continue
            size += step
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_disk_that_fills_mid_run_ends_it_failed_with_kind_disk(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """A real tmpfs, big enough for the launch pre-flight; once training runs, a ballast file leaves
    150 KiB, less than one checkpoint of the tiny run (~170 KiB of tmpfs pages), which saves every step.
    What fails is usually torch.save ("unexpected pos", no errno): the free space names the cause."""
    model, data = tiny
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, 400)
    try:
        preset = preset_from_dict(tiny_preset_dict(model, data, max_steps=40, save_steps=1, eval_steps=100))
        run = launch(preset, disk, run_id="full", env=worker_env(TUIWIZ_STEP_DELAY="0.2"))
        _wait(run.paths, lambda: any(isinstance(e, LogEvent) for e in _events(run.paths))
              if run.paths.events.exists() else False)
        _fill(disk, 150 * 1024)
        _wait(run.paths, lambda: _exited(run.paths))
        err = _assert_failed_on_disk(run.paths)
        assert err.step is not None and err.step < 40
        assert shutil.disk_usage(disk).free < 2 * RESERVE_BYTES  # it really was full: the reserve came back
        status = json.loads(run.paths.status.read_text())
        assert status["state"] == "failed"
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
