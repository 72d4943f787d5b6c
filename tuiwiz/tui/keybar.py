"""The key line at the bottom of every screen: help and quit first, then the screen's own keys.

Textual's Footer lists the screen's keys before the app's, so at 80 columns quit and help were
the ones cut off. This bar is generated from the same bindings (the help screen reads them
too), orders them by what a user needs most, and drops whole entries from the end when the
terminal is narrow: never half a word.
"""

from __future__ import annotations

from textual.binding import ActiveBinding
from textual.content import Content
from textual.dom import DOMNode
from textual.screen import Screen
from textual.widgets import Static

#: Actions that must stay visible at any width, in this order (a screen's own quit, which may
#: ask first, before the app's).
ESSENTIAL = ("help", "quit_monitor", "quit")


def key_label(binding_key: str, display: str | None = None) -> str:
    """`f1` -> `F1`, `ctrl+s` -> `^s`: how a key is written in the bar and the help."""
    if display:
        return display
    parts = binding_key.split("+")
    key = parts[-1]
    if len(key) > 1 and key[0] == "f" and key[1:].isdigit():
        key = key.upper()
    key = {"question_mark": "?", "escape": "esc", "space": "space", "slash": "/"}.get(key, key)
    return ("^" if "ctrl" in parts[:-1] else "") + key


def _namespace(node: DOMNode, screen: Screen[object]) -> str | None:
    if node is screen.app:
        return "app"
    if node is screen:
        return "screen"
    return None


def _rank(active: ActiveBinding, screen: Screen[object]) -> int:
    action = active.binding.action.split("(")[0]
    if action in ESSENTIAL:
        return ESSENTIAL.index(action)
    return 10 if active.node is screen else 20


def bar_entries(screen: Screen[object]) -> list[tuple[str, str, str | None]]:
    """(key, description, click action) for every shown binding, most needed first; of two
    bindings that say the same (`q quit` on a screen, `^q quit` on the app) the first one stays."""
    ranked: list[tuple[int, int, tuple[str, str, str | None]]] = []
    for order, active in enumerate(screen.active_bindings.values()):
        b = active.binding
        if not b.show or not b.description:
            continue
        ns = _namespace(active.node, screen)
        ranked.append((_rank(active, screen), order,
                       (key_label(b.key, b.key_display), b.description, f"{ns}.{b.action}" if ns else None)))
    seen: set[str] = set()
    out = []
    for _, _, entry in sorted(ranked):
        if entry[1] not in seen:
            seen.add(entry[1])
            out.append(entry)
    return out


def fit(entries: list[tuple[str, str, str | None]], width: int) -> list[tuple[str, str, str | None]]:
    """The leading entries that fit in `width` columns (an entry is `key desc`, two spaces apart)."""
    out, used = [], 0
    for entry in entries:
        cost = len(entry[0]) + 1 + len(entry[1]) + (2 if out else 1)
        if used + cost > width:
            break
        out.append(entry)
        used += cost
    return out


class KeyBar(Static):
    """One line of keys; click a key to run it."""

    DEFAULT_CSS = """
    KeyBar {
        dock: bottom;
        height: 1;
        background: $footer-background;
        color: $footer-description-foreground;
    }
    """

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._bindings_changed)
        self.call_after_refresh(self.redraw)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def on_resize(self) -> None:
        self.redraw()

    def _bindings_changed(self, screen: Screen[object]) -> None:
        if self.is_attached and screen is self.screen:
            self.redraw()

    def redraw(self) -> None:
        width = self.size.width or self.app.size.width
        parts: list[Content] = []
        for key, desc, action in fit(bar_entries(self.screen), width):
            click = f" @click={action}" if action else ""
            parts.append(Content.from_markup(f"[b $footer-key-foreground{click}]$key[/] $desc", key=key, desc=desc))
        self.update(Content("  ").join(parts).pad_left(1) if parts else "")
