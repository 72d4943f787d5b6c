"""What the wizard and the monitor share: the one place where a failed worker becomes a readable error.

Every slow call runs in a thread worker with `exit_on_error=False`. When one fails, Textual
posts `Worker.StateChanged` and it bubbles up to the App, here: a `UserError` shows its own
message (fields named by their TUI label), anything else shows one line and writes the
traceback to the log file named in the panel. Screens never wrap workers in try/except.
"""

from __future__ import annotations

import os
import time
import traceback
from pathlib import Path
from typing import ClassVar

from textual.app import App
from textual.screen import ModalScreen
from textual.worker import Worker, WorkerState

from tuiwiz.errors import CancelledError, UserError
from tuiwiz.tui.state import label_of


def error_log_path() -> Path:
    """Where unexpected tracebacks go: $XDG_STATE_HOME/tuiwiz/tui.log (~/.local/state/...)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tuiwiz" / "tui.log"


def log_exception(exc: BaseException, path: Path) -> bool:
    """Append `exc`'s traceback to `path`; False when the log cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            fh.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    except OSError:
        return False
    return True


class BaseApp(App[None]):
    """A tuiwiz Textual app: shared dialogs stylesheet and worker-failure handling."""

    ENABLE_COMMAND_PALETTE = False
    CSS_PATH = "dialogs.tcss"
    #: Screens get `-narrow` (under 70 columns), `-normal` or `-wide` (110 and up) for their layout.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (70, "-normal"), (110, "-wide")]
    #: Error panel titles per worker group.
    WORKER_TITLES: ClassVar[dict[str, str]] = {}
    #: Worker groups whose failures are not shown (a flaky NVML poll keeps the last values).
    QUIET_GROUPS: ClassVar[frozenset[str]] = frozenset({"poll"})

    def __init__(self, *, error_log: Path | None = None) -> None:
        super().__init__()
        self.error_log = error_log or error_log_path()

    def error_text(self, exc: BaseException) -> str:
        """What the panel says: a UserError's own message; otherwise one line, details in the log."""
        if isinstance(exc, UserError):
            return exc.render(label_of)
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        line = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        self.log.error(line)
        if log_exception(exc, self.error_log):
            return f"{line}\n(the details are in {self.error_log})"
        return line

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "help":
            return not isinstance(self.screen, ModalScreen)  # no help over a dialog
        return True

    def action_help(self) -> None:
        from tuiwiz.tui.screens.help import HelpScreen

        self.push_screen(HelpScreen(self.screen))

    def show_error(self, message: str, title: str = "Error") -> None:
        from tuiwiz.tui.screens.modals import ErrorScreen

        self.push_screen(ErrorScreen(title, message))

    def worker_failed(self, worker: Worker[object], exc: BaseException, text: str) -> None:
        """Bookkeeping for a failed worker before the panel (the wizard marks its profile failed).
        `text` is what the panel says ("" for a cancellation)."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR or event.worker.error is None:
            return
        exc, group = event.worker.error, event.worker.group
        quiet = isinstance(exc, CancelledError) or group in self.QUIET_GROUPS
        text = "" if quiet else self.error_text(exc)
        self.worker_failed(event.worker, exc, text)
        if not quiet:
            self.show_error(text, self.WORKER_TITLES.get(group, "Error"))
