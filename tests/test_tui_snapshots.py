"""SVG snapshots: the UI's visual contract, at the design size 80x24 for every screen, every modal
and the monitor (live, stopped, failed), plus 120x40 (wider knobs, the breakdown beside the
reasons) and 60x20 (the verdict, the current step, quit and help stay).

Deterministic by construction: injected hardware and host numbers, the bundled demo with the
heuristic tokenizer, a relative dataset path, GPU polling off, fixed run events, and the cursor
blink frozen. Regenerate with `pytest tests/test_tui_snapshots.py --snapshot-update` and LOOK at
the SVGs (e.g. `rsvg-convert x.svg -o x.png`) before keeping them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("pytest_textual_snapshot")

from textual.widgets import Input  # noqa: E402
from textual.worker import WorkerCancelled, WorkerFailed  # noqa: E402

from tuiwiz.data import HeuristicTokenizer  # noqa: E402
from tuiwiz.planner import PlanRequest  # noqa: E402
from tuiwiz.preset import DatasetRef  # noqa: E402
from tuiwiz.runs.paths import RunPaths  # noqa: E402
from tuiwiz.tui import fixtures  # noqa: E402
from tuiwiz.tui.app import make_app  # noqa: E402
from tuiwiz.tui.monitor import MonitorApp, MonitorScreen  # noqa: E402
from waiting import wait_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIZES = {"80x24": (80, 24), "120x40": (120, 40), "60x20": (60, 20)}
STEPS = ("hardware", "model", "dataset", "plan")


def _app(step: str, hardware: Any = None, request: PlanRequest | None = None,
         tokenizer_loader: Callable[[PlanRequest], Any] | None = None) -> Any:
    req = request or PlanRequest(dataset=DatasetRef(path="tuiwiz/demo/demo.jsonl"))
    return make_app(req, hardware=hardware or fixtures.workstation(), gpu_reader=lambda: [],
                    tokenizer_loader=tokenizer_loader or (lambda r: HeuristicTokenizer()), cached_models=[],
                    poll_s=0, start_step=step, launcher=lambda preset: None)


async def _still(pilot: Any) -> None:
    for screen in pilot.app.screen_stack:
        for inp in screen.query(Input):
            inp.cursor_blink = False
    await pilot.pause()


async def _settle(pilot: Any, *keys: str) -> None:
    for _ in range(2):  # profiling, then the preview it triggers
        try:
            await pilot.app.workers.wait_for_complete()
        except (WorkerFailed, WorkerCancelled):
            pass
        await pilot.pause()
    for key in keys:
        await pilot.press(key)
        await pilot.pause()
    await _still(pilot)


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the dataset path is shown relative


# ---- the wizard's steps ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", STEPS)
def test_step_snapshot(snap_compare, step: str, size: str) -> None:
    assert snap_compare(_app(step), terminal_size=SIZES[size], run_before=_settle)


@pytest.mark.parametrize("tab", ["tab-stats", "tab-longest", "tab-preview"])
def test_dataset_tab_snapshot(snap_compare, tab: str) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot)
        pilot.app.screen.query_one("#ds-tabs").active = tab
        await _settle(pilot)

    assert snap_compare(_app("dataset"), terminal_size=(80, 24), run_before=run_before)


def test_dataset_without_a_dataset_snapshot(snap_compare) -> None:
    assert snap_compare(_app("dataset", request=PlanRequest()), terminal_size=(80, 24), run_before=_settle)


def test_plan_while_the_dataset_is_counted_snapshot(snap_compare) -> None:
    """The verdict says `estimating…` and shows no number until the profile is in."""
    release = threading.Event()

    def counting(req: PlanRequest) -> Any:
        release.wait(30)
        return HeuristicTokenizer()

    async def run_before(pilot: Any) -> None:
        app = pilot.app
        await wait_for(pilot, lambda: app.state.plan is not None and app.state.provisional, "a provisional plan")
        # the count goes on, but its result is for a superseded request: the picture stays provisional
        app.state.profile_generation += 1
        release.set()
        await _still(pilot)

    try:
        assert snap_compare(_app("plan", tokenizer_loader=counting), terminal_size=(80, 24), run_before=run_before)
    finally:
        release.set()


@pytest.mark.parametrize("size", ["80x24", "120x40"])
def test_no_nvml_hardware_snapshot(snap_compare, size: str) -> None:
    assert snap_compare(_app("hardware", fixtures.no_nvml()), terminal_size=SIZES[size], run_before=_settle)


def test_plan_that_does_not_fit_snapshot(snap_compare) -> None:
    req = PlanRequest(model="Qwen/Qwen2.5-32B", dataset=DatasetRef(path="tuiwiz/demo/demo.jsonl"))
    assert snap_compare(_app("plan", request=req), terminal_size=(80, 24), run_before=_settle)


# ---- help and every modal ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["80x24", "120x40"])
def test_help_snapshot(snap_compare, size: str) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot, "f1")

    assert snap_compare(_app("plan"), terminal_size=SIZES[size], run_before=run_before)


@pytest.mark.parametrize("key", ["ctrl+s", "ctrl+g", "ctrl+l"])
def test_plan_modal_snapshot(snap_compare, key: str) -> None:
    """Export, the equivalent command, and the launch question."""
    async def run_before(pilot: Any) -> None:
        await _settle(pilot, key)

    assert snap_compare(_app("plan"), terminal_size=(80, 24), run_before=run_before)


def test_error_panel_snapshot(snap_compare) -> None:
    async def run_before(pilot: Any) -> None:
        await _settle(pilot, "ctrl+l")  # launching without a dataset: the readable error panel

    assert snap_compare(_app("plan", request=PlanRequest()), terminal_size=(80, 24), run_before=run_before)


def test_file_browser_snapshot(snap_compare, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ctrl+o on the Dataset step: the folder of the current file, without hidden files and caches."""
    data = tmp_path / "data"
    (data / "more").mkdir(parents=True)
    (data / "__pycache__").mkdir()
    (data / ".cache").mkdir()
    (data / "train.jsonl").write_bytes((REPO / "tuiwiz" / "demo" / "demo.jsonl").read_bytes())
    for name in ("eval.jsonl", "notes.md", ".hidden.jsonl"):
        (data / name).write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    req = PlanRequest(dataset=DatasetRef(path="data/train.jsonl"))

    async def run_before(pilot: Any) -> None:
        await _settle(pilot, "ctrl+o")  # the tree lists folders in a worker that waits for more: wait on rows
        await wait_for(pilot, lambda: len(pilot.app.screen.query_one("#browser").root.children) == 4,
                       "the folder listed")
        await _still(pilot)

    assert snap_compare(_app("dataset", request=req), terminal_size=(80, 24), run_before=run_before)


# ---- the monitor ----------------------------------------------------------------------------------

@pytest.fixture
def run_dir(tmp_path: Path) -> Any:
    locks: list[int] = []

    def make(kind: fixtures.RunKind) -> RunPaths:
        paths, lock = fixtures.demo_run(tmp_path / "runs", kind)
        if kind == "live":
            assert lock is not None  # held by this process: the run reads as live
            locks.append(lock)
        return paths

    yield make
    for fd in locks:
        os.close(fd)


def _monitor_ready(kind: fixtures.RunKind, *keys: str) -> Callable[[Any], Any]:
    async def run_before(pilot: Any) -> None:
        app = pilot.app
        events = len(fixtures.demo_run_events(kind))
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen.events_seen >= events
                       and bool(app.screen.log_lines) and app.screen.live is not None, "the run on screen")
        app.screen.redraw()
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.pause()

    return run_before


@pytest.mark.parametrize("kind", ["live", "stopped", "failed"])
def test_monitor_snapshot(snap_compare, run_dir, kind: fixtures.RunKind) -> None:
    app = MonitorApp(run_dir(kind), gpu_reader=lambda: [], poll_s=0.02)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_monitor_ready(kind))


@pytest.mark.parametrize("key", ["s", "q"])
def test_monitor_dialog_snapshot(snap_compare, run_dir, key: str) -> None:
    """The stop question and the quit question (the run goes on)."""
    app = MonitorApp(run_dir("live"), gpu_reader=lambda: [], poll_s=0.02)
    assert snap_compare(app, terminal_size=(80, 24), run_before=_monitor_ready("live", key))


def test_monitor_narrow_snapshot(snap_compare, run_dir) -> None:
    app = MonitorApp(run_dir("live"), gpu_reader=lambda: [], poll_s=0.02)
    assert snap_compare(app, terminal_size=(60, 20), run_before=_monitor_ready("live"))
