"""F1 (or ? outside a text field): the key rule, then every key of the current screen and the app,
generated from the bindings themselves so the help can never disagree with what the keys do."""

from __future__ import annotations

import re
from itertools import groupby

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Label, Static

from tuiwiz.tui.keybar import key_label

KEY_RULE = ("A key that moves you never types, and a key that types never moves you. F1-F5, ^n/^p and ^q "
            "work everywhere, even in a text field. The plain 1-4, ? and q work only when no text field "
            "has focus; in a text field they are text.")
#: Keys that belong to widgets, not bindings of ours: how to move and edit.
WIDGET_KEYS = (
    ("tab / shift+tab", "move between controls"),
    ("enter", "submit a field, open a menu, pick a row"),
    ("→ (in a field)", "accept the grey suggestion"),
)


def _bindings(bindings: list[BindingType]) -> list[Binding]:
    return list(Binding.make_bindings(bindings))


def _compress(keys: list[str]) -> str:
    """`F2 F3 F4 F5` -> `F2-F5`, `1 2 3 4` -> `1-4`: a run of numbered keys as a range."""
    out: list[str] = []
    for _, run in groupby(keys, key=lambda k: re.sub(r"\d+$", "#", k)):
        run = list(run)
        if len(run) > 2 and all(re.search(r"\d+$", k) for k in run):
            out.append(f"{run[0]}-{run[-1]}")
        else:
            out.extend(run)
    return " ".join(out)


def _what(b: Binding, named: bool) -> str:
    """What a key does: its tooltip, led by the key bar's word for it when `named` (`export: write...`)."""
    what = b.tooltip or b.description or b.action
    if named and b.tooltip and b.description and b.description.lower() not in b.tooltip.lower():
        what = f"{b.description}: {b.tooltip}"
    return what


def binding_rows(bindings: list[BindingType], hide: tuple[str, ...] = (), named: bool = False) -> list[tuple[str, str]]:
    """(keys, what they do) per thing done (bindings that say the same are one row), keys that
    never type first, then the plain ones."""
    rows: dict[str, tuple[list[str], list[str], str]] = {}
    for b in _bindings(bindings):
        base = b.action.split("(")[0]
        if base in hide or b.system:
            continue
        what = _what(b, named)
        any_key, plain, _ = rows.setdefault(what, ([], [], what))
        (plain if len(key_label(b.key)) == 1 else any_key).append(key_label(b.key))
    out = []
    for any_key, plain, what in rows.values():
        out.append((" / ".join(k for k in (_compress(any_key), _compress(plain)) if k), what))
    return out


def help_table(screen: Screen[object]) -> Table:
    t = Table(box=None, padding=(0, 1), show_header=False, expand=True)
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column(ratio=1)
    title = getattr(screen, "STEP", None) or getattr(screen, "HELP_TITLE", screen.__class__.__name__)
    t.add_row(Text(f"{title.title()}", style="bold underline"), "")
    for keys, what in binding_rows(list(getattr(screen, "BINDINGS", [])), named=True):
        t.add_row(keys, what)
    t.add_row("", "")
    t.add_row(Text("Everywhere", style="bold underline"), "")
    hide = tuple(getattr(screen, "HIDES_APP_ACTIONS", ()))
    for keys, what in binding_rows(list(type(screen.app).BINDINGS), hide):
        t.add_row(keys, what)
    for keys, what in WIDGET_KEYS:
        t.add_row(keys, what)
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark,f1,enter", "close", "close")]

    def __init__(self, under: Screen[object]) -> None:
        super().__init__(classes="dialog-screen")
        self.under = under

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog tall", id="help"):
            yield Label("Keys (esc closes)", classes="dialog-title")
            with VerticalScroll():
                yield Static(Text(KEY_RULE, style="italic"), id="key-rule")
                yield Static(help_table(self.under), id="help-table")

    def action_close(self) -> None:
        self.dismiss(None)
