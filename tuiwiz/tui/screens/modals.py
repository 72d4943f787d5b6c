"""Modals that return typed values (`ModalScreen[T]`): the caller gets a result, not widgets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DirectoryTree, Input, Label, Select, Static

from tuiwiz.exports import EXPORT_FORMATS

DEFAULT_NAMES = {f.key: f.filename for f in EXPORT_FORMATS}


class ErrorScreen(ModalScreen[None]):
    """The readable error panel every failed worker ends up in."""

    BINDINGS = [Binding("escape,enter,q", "dismiss_panel", "close")]

    def __init__(self, title: str, message: str) -> None:
        super().__init__(classes="dialog-screen")
        self.title_text = title
        self.message = message

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog error-dialog"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.message), id="error-message")
            yield Button("OK", id="ok", variant="error")

    def on_mount(self) -> None:
        self.query_one("#ok", Button).focus()

    def action_dismiss_panel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question (y/n or the buttons); the one confirmation dialog of the wizard and the monitor.
    `yes` / `no` name the buttons by what they do ("Stop", "Keep it running")."""

    BINDINGS = [Binding("y", "answer(True)", "yes"), Binding("n,escape", "answer(False)", "no")]

    def __init__(self, question: str, *, yes: str = "Yes", no: str = "No") -> None:
        super().__init__(classes="dialog-screen")
        self.question, self.yes, self.no = question, yes, no

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(self.question), id="question")
            with Horizontal(classes="buttons"):
                yield Button(f"{self.yes} (y)", id="yes", variant="warning")
                yield Button(f"{self.no} (n)", id="no", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")


@dataclass(frozen=True)
class ExportChoice:
    fmt: str  # "preset" | "llamafactory" | "axolotl"
    path: str


class ExportScreen(ModalScreen[ExportChoice | None]):
    """Where to write the plan, and in which format."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, fmt: str = "preset", directory: Path | None = None) -> None:
        super().__init__(classes="dialog-screen")
        self.fmt = fmt
        self.directory = directory  # None: a name relative to the folder tuiwiz was started in

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Export the plan", classes="dialog-title")
            yield Select([(f.label, f.key) for f in EXPORT_FORMATS], value=self.fmt, allow_blank=False,
                         id="export-format", compact=True)
            yield Label("Path (Enter writes; asks before replacing a file):")
            name = DEFAULT_NAMES[self.fmt]
            yield Input(str(self.directory / name) if self.directory else name, id="export-path", compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Write", id="write", variant="success")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one("#export-path", Input).focus()

    @on(Select.Changed, "#export-format")
    def _format(self, event: Select.Changed) -> None:
        inp = self.query_one("#export-path", Input)
        p = Path(inp.value)
        if p.name in DEFAULT_NAMES.values():
            inp.value = str(p.with_name(DEFAULT_NAMES[str(event.value)]))

    def _choice(self) -> ExportChoice | None:
        path = self.query_one("#export-path", Input).value.strip()
        if not path:
            self.notify("give a file path", severity="warning")
            return None
        return ExportChoice(str(self.query_one("#export-format", Select).value), path)

    @on(Input.Submitted, "#export-path")
    @on(Button.Pressed, "#write")
    def _write(self) -> None:
        choice = self._choice()
        if choice is not None:
            self.dismiss(choice)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class TextScreen(ModalScreen[None]):
    """Read-only text (the equivalent command line), selectable for copying."""

    BINDINGS = [Binding("escape,enter,q", "close", "close")]

    def __init__(self, title: str, body: str, hint: str = "") -> None:
        super().__init__(classes="dialog-screen")
        self.title_text, self.body, self.hint = title, body, hint

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Label(self.title_text, classes="dialog-title")
            yield Static(Text(self.body), id="text-body")
            if self.hint:
                yield Label(self.hint, classes="dim")
            yield Button("Close", id="close")

    def on_mount(self) -> None:
        self.query_one("#close", Button).focus()

    @on(Button.Pressed, "#close")
    def action_close(self) -> None:
        self.dismiss(None)


class DatasetTree(DirectoryTree):
    """A folder tree without hidden files and caches: nothing there is a dataset."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith((".", "__pycache__"))]


class FileBrowser(ModalScreen[str | None]):
    """A directory tree for picking a dataset file (folders load in the tree's own workers).
    `start` is shown as given (a relative folder stays relative)."""

    BINDINGS = [Binding("escape", "cancel", "cancel"), Binding("backspace", "up", "parent folder")]

    def __init__(self, start: Path) -> None:
        super().__init__(classes="dialog-screen")
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog tall"):
            yield Label("Choose a dataset file (Enter opens/picks, Backspace goes up)", classes="dialog-title")
            yield DatasetTree(self.start, id="browser")

    def on_mount(self) -> None:
        self.query_one(DirectoryTree).focus()

    @on(DirectoryTree.FileSelected)
    def _picked(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(str(event.path))

    def action_up(self) -> None:
        tree = self.query_one(DirectoryTree)
        tree.path = Path(tree.path).resolve().parent

    def action_cancel(self) -> None:
        self.dismiss(None)
