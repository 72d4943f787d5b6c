"""The run monitor: a Textual screen that follows a detached run (attach, detach, re-attach).

A worker thread follows events.jsonl (replaying history first), tails train.log and polls
NVML, posting typed messages; the screen folds events into a `RunView` (tuiwiz.runs.view, no
Textual there) and redraws at most a few times a second so a slow SSH link is not flooded.
Keys: s stop (confirmed), r relaunch with the smaller plan after an OOM, d detach (the run
goes on), q quit (asks: the run goes on). Designed for 80x24.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import ProgressBar, Static
from textual.worker import Worker, get_current_worker
from textual_plotext import PlotextPlot

from tuiwiz.runs.events import Event, EventFollower
from tuiwiz.runs.paths import RunPaths
from tuiwiz.runs.view import RunView, memory_summary
from tuiwiz.tui.base_app import BaseApp
from tuiwiz.tui.keybar import KeyBar
from tuiwiz.tui.screens.modals import ConfirmScreen

if TYPE_CHECKING:
    from tuiwiz.hardware import GpuInfo
    from tuiwiz.runs.launcher import LaunchedRun

POLL_S = 0.5
GPU_POLL_S = 2.0
REDRAW_S = 0.5
LOG_LINES = 200
#: Lines of a failure's message shown in full before the rest is left to train.log.
ERROR_LINES = 3

GpuReader = Callable[[], "list[GpuInfo]"]


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def tail_lines(path: Path, n: int = LOG_LINES, max_bytes: int = 64 * 1024) -> list[str]:
    """The last `n` lines of a (possibly huge) log, reading only its end."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", errors="replace").replace("\r", "\n")
    return [ln for ln in text.splitlines() if ln.strip()][-n:]


class EventsArrived(Message):
    def __init__(self, events: list[Event]) -> None:
        super().__init__()
        self.events = events


class LogTail(Message):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines


class GpuSample(Message):
    def __init__(self, gpus: list[GpuInfo]) -> None:
        super().__init__()
        self.gpus = gpus


class Liveness(Message):
    def __init__(self, live: bool) -> None:
        super().__init__()
        self.live = live


class StopSent(Message):
    """What `stop_run` did (a StopResult word: "sent", "killed", "not-running", ...)."""

    def __init__(self, result: str) -> None:
        super().__init__()
        self.result = result


class Relaunched(Message):
    def __init__(self, run: LaunchedRun) -> None:
        super().__init__()
        self.run = run


def _default_gpu_reader() -> list[GpuInfo]:
    try:
        from tuiwiz.hardware import read_gpus

        return list(read_gpus())
    except Exception:  # noqa: BLE001 - the monitor must never die for NVML
        return []


def memory_line(v: RunView) -> str:
    """The measurement beside the estimate at the same level: the `memory` event's levels when the
    worker wrote one, else torch's allocated peak against the plan's allocated."""
    if v.memory is not None:
        head, levels = memory_summary(v.memory)
        return f"{head}: {levels}"
    out = f"plan peak {v.plan_peak_gib:.2f} GiB" if v.plan_peak_gib is not None else "no plan estimate"
    if v.mem_peak_gib is not None:
        out += f"  allocated {v.mem_peak_gib:.2f} GiB"
        if v.plan_allocated_gib:
            out += f" ({(v.mem_peak_gib / v.plan_allocated_gib - 1) * 100:+.0f}% vs plan's allocated)"
    return out


class MonitorScreen(Screen[None]):
    """Follows one run. Push it from the wizard (`MonitorScreen(paths)`) or run `MonitorApp`."""

    CSS_PATH = "monitor.tcss"
    HELP_TITLE = "monitor"
    #: The wizard's step keys do nothing here (help lists only what works).
    HIDES_APP_ACTIONS = ("step", "goto")
    BINDINGS = [
        Binding("s", "stop", "stop", tooltip="stop the run (asks; a second stop kills it)"),
        Binding("r", "relaunch", "relaunch smaller", tooltip="this run again with the smaller plan, after an out-of-memory error"),
        Binding("d", "detach", "detach", tooltip="leave the monitor; the run goes on"),
        Binding("q", "quit_monitor", "quit", tooltip="quit (asks; the run goes on)"),
    ]

    def __init__(self, paths: RunPaths, *, gpu_reader: GpuReader | None = None, poll_s: float = POLL_S) -> None:
        super().__init__()
        self.paths = paths
        self.view = RunView(run_id=paths.run_id)
        self.gpu_reader = gpu_reader or _default_gpu_reader
        self.poll_s = poll_s
        self.gpus: list[GpuInfo] = []
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        #: whether a worker process is alive (None until the follower's first reading)
        self.live: bool | None = None
        self._dirty = True
        self._stop_sent = False
        self._plot_key: tuple[int, int] = (-1, -1)
        self.events_seen = 0
        self.redraws = 0

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        with Horizontal(id="progress-row"):
            yield ProgressBar(total=None, show_eta=False, id="progress")
            yield Static(id="eta")
        yield Static(id="stats")
        yield Static(id="gpu")
        yield PlotextPlot(id="curves")
        yield Static(id="logtail")
        yield KeyBar()

    def on_mount(self) -> None:
        self.follow()
        self.set_interval(REDRAW_S, self._redraw_if_dirty)
        self.redraw()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """This screen's workers report to the app's one handler (the message does not bubble)."""
        if isinstance(self.app, BaseApp):
            self.app.on_worker_state_changed(event)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "relaunch":  # a key only when there is a smaller plan to relaunch with
            return self.view.error is not None and bool(self.view.error.smaller_plan)
        if action == "stop":  # and stop only while there is a run to stop
            return self.live is not False
        return True

    # --- the follower thread -------------------------------------------------------------
    @work(thread=True, exclusive=True, group="follow", exit_on_error=False)
    def follow(self) -> None:
        from tuiwiz.runs.status import is_live

        worker = get_current_worker()
        follower = EventFollower(self.paths.events)
        last_gpu = 0.0
        last_log_size = -1
        while not worker.is_cancelled:
            events = follower.poll()
            if events:
                self.post_message(EventsArrived(events))
            try:
                size = self.paths.log.stat().st_size
            except FileNotFoundError:
                size = 0
            if size != last_log_size:
                last_log_size = size
                self.post_message(LogTail(tail_lines(self.paths.log)))
            now = time.monotonic()
            if now - last_gpu >= GPU_POLL_S:
                last_gpu = now
                self.post_message(GpuSample(self.gpu_reader()))
                self.post_message(Liveness(is_live(self.paths)))
            time.sleep(self.poll_s)

    @on(EventsArrived)
    def _events(self, msg: EventsArrived) -> None:
        had_error = self.view.error is not None
        self.view.fold(msg.events)
        self.events_seen += len(msg.events)
        self._dirty = True
        if (self.view.error is not None) != had_error:
            self.refresh_bindings()  # r appears (or goes) with a smaller plan

    @on(LogTail)
    def _log(self, msg: LogTail) -> None:
        self.log_lines.clear()
        self.log_lines.extend(msg.lines)
        self._dirty = True

    @on(GpuSample)
    def _gpu(self, msg: GpuSample) -> None:
        self.gpus = msg.gpus
        self._dirty = True

    @on(Liveness)
    def _liveness(self, msg: Liveness) -> None:
        if msg.live != self.live:
            self.live = msg.live
            self._dirty = True
            self.refresh_bindings()

    # --- drawing -------------------------------------------------------------------------
    def _redraw_if_dirty(self) -> None:
        if self._dirty:
            self.redraw()

    def _state_text(self) -> str:
        v = self.view
        if v.state == "running" and self.live is False:
            return "stale"
        return v.state

    def gpu_text(self) -> str:
        """The memory line (plan beside run), then one line per GPU."""
        v = self.view
        lines = [memory_line(v)]
        for g in self.gpus[:3]:
            util = f"  util {g.util_pct:.0f}%" if g.util_pct is not None else ""
            lines.append(f"GPU{g.index} {g.used_gib:5.1f}/{g.total_gib:.1f} GiB{util}")
        if len(self.gpus) > 3:
            lines.append(f"... and {len(self.gpus) - 3} more GPUs")
        if not self.gpus:
            lines[0] += "  (" + ("CPU run" if v.device == "cpu" else "no GPU readings") + ")"
        return "\n".join(lines)

    def error_text(self) -> str:
        err = self.view.error
        if err is None:
            return ""
        at = f" at step {err.step}" if err.step is not None else ""
        message = err.message.strip().splitlines() or [""]
        shown = "\n".join(message[:ERROR_LINES]) + ("\n(more in train.log)" if len(message) > ERROR_LINES else "")
        out = f"[b red]{err.kind.upper()}{at}[/]: {escape(shown)}\n{escape(err.suggestion)}"
        if err.smaller_plan:
            sp = err.smaller_plan
            out += (f"\n[b]r[/b]: relaunch with micro_batch_size {sp.get('micro_batch_size')}, grad_accum "
                    f"{sp.get('grad_accum')}, cutoff {sp.get('cutoff_len')}")
        return out

    def redraw(self) -> None:
        """Draw the view now (the timer calls it at most every REDRAW_S, when something changed)."""
        self._dirty = False
        self.redraws += 1
        v = self.view
        state = self._state_text()
        note = f"  · {escape(v.note)}" if v.note else ""
        self.query_one("#title", Static).update(f"[b]{escape(self.paths.run_id)}[/b]  {state.upper()}  {v.device}{note}")
        bar = self.query_one("#progress", ProgressBar)
        if v.total_steps:
            bar.update(total=v.total_steps, progress=min(v.step, v.total_steps))
        eta = f"{v.step}/{v.total_steps or '?'}  ETA {fmt_duration(v.eta_s) if state == 'running' else '-'}"
        self.query_one("#eta", Static).update(eta)

        def f(x: float | None, spec: str) -> str:
            return "-" if x is None else format(x, spec)

        self.query_one("#stats", Static).update(
            f"loss {f(v.loss, '.4f')}  eval {f(v.eval_loss, '.4f')}  lr {f(v.lr, '.2e')}  "
            f"tok/s {f(v.tokens_per_s, ',.0f')}  smp/s {f(v.samples_per_s, '.2f')}")
        self.query_one("#gpu", Static).update(self.error_text() if v.error is not None else escape(self.gpu_text()))
        tail = list(self.log_lines)[-4:]
        self.query_one("#logtail", Static).update(
            Text("\n".join(tail), no_wrap=True, overflow="ellipsis") if tail else "(train.log is empty)")
        key = (len(v.train_curve), len(v.eval_curve))
        if key != self._plot_key:
            self._plot_key = key
            self._draw_curves()

    def _draw_curves(self) -> None:
        plot = self.query_one("#curves", PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        plt.title("loss")
        if self.view.train_curve:
            xs, ys = zip(*self.view.train_curve)
            plt.plot(list(xs), list(ys), label="train", marker="braille")
        if self.view.eval_curve:
            xs, ys = zip(*self.view.eval_curve)
            plt.plot(list(xs), list(ys), label="eval", marker="dot")
        plot.refresh()

    # --- actions -------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.live is False:
            self.notify("the run is not running", severity="warning")
            return
        kill = self._stop_sent
        question = ("Stop already requested. Kill it now, without saving?" if kill
                    else f"Stop {self.paths.run_id}? It saves a checkpoint and the adapter first.")

        def done(ok: bool | None) -> None:
            if ok:
                self._do_stop(kill)

        self.app.push_screen(ConfirmScreen(question, yes="Kill" if kill else "Stop", no="Keep running"), done)

    @work(thread=True, group="control", exit_on_error=False)
    def _do_stop(self, kill: bool) -> None:
        from tuiwiz.runs.control import stop_run

        self.post_message(StopSent(str(stop_run(self.paths, force=kill))))

    @on(StopSent)
    def _stop_sent_msg(self, msg: StopSent) -> None:
        self._stop_sent = True
        self.notify(f"stop: {msg.result}")

    def action_relaunch(self) -> None:
        err = self.view.error
        if err is None or not err.smaller_plan:
            self.notify("relaunch is offered after an out-of-memory error", severity="warning")
            return

        def done(ok: bool | None) -> None:
            if ok:
                self._relaunch()

        self.app.push_screen(ConfirmScreen("Relaunch this run with the smaller plan (same effective batch)?",
                                           yes="Relaunch"), done)

    @work(thread=True, exclusive=True, group="relaunch", exit_on_error=False)
    def _relaunch(self) -> None:
        """Off the UI thread: the same re-plan `tuiwiz launch --auto-replan` makes, in the same run."""
        from tuiwiz.runs.replan import relaunch_with_next_plan

        self.post_message(Relaunched(relaunch_with_next_plan(self.paths)))

    @on(Relaunched)
    def _relaunched(self, msg: Relaunched) -> None:
        self.notify(f"launched {msg.run.run_id}")
        self.app.switch_screen(MonitorScreen(msg.run.paths, gpu_reader=self.gpu_reader, poll_s=self.poll_s))

    def action_detach(self) -> None:
        """Leave the run going; back to whoever pushed us (or exit when standalone)."""
        if isinstance(self.app, MonitorApp):
            self.app.exit()
        else:
            self.app.pop_screen()

    def action_quit_monitor(self) -> None:
        def done(ok: bool | None) -> None:
            if ok:
                self.app.exit()

        self.app.push_screen(ConfirmScreen("Detach and quit? The run goes on; `tuiwiz attach` follows it again.",
                                           yes="Quit", no="Stay"), done)


class MonitorApp(BaseApp):
    """`tuiwiz attach RUN`: the monitor on its own."""

    TITLE = "tuiwiz monitor"
    WORKER_TITLES = {"relaunch": "Relaunch failed", "control": "Stop failed", "follow": "Following the run failed"}
    BINDINGS = [
        Binding("f1", "help", "help", tooltip="this help", priority=True),
        Binding("question_mark", "help", "help", tooltip="this help", show=False),
        Binding("ctrl+q", "quit", "quit", tooltip="quit at once (the run goes on)", priority=True),
    ]

    def __init__(self, paths: RunPaths, *, gpu_reader: GpuReader | None = None, poll_s: float = POLL_S,
                 error_log: Path | None = None) -> None:
        super().__init__(error_log=error_log)
        self.paths = paths
        self.gpu_reader = gpu_reader
        self.poll_s = poll_s

    def on_mount(self) -> None:
        self.push_screen(MonitorScreen(self.paths, gpu_reader=self.gpu_reader, poll_s=self.poll_s))
