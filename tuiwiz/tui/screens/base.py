"""What every wizard step shares: the step bar on top, the key bar below, `sync()` from state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.screen import Screen
from textual.widgets import Static

from tuiwiz.tui.keybar import KeyBar

if TYPE_CHECKING:
    from tuiwiz.tui.app import WizardApp
    from tuiwiz.tui.state import WizardState

STEPS = ("hardware", "model", "dataset", "plan")
TITLES = {"hardware": "Hardware", "model": "Model", "dataset": "Dataset", "plan": "Plan"}
FITS_STYLE, NO_FIT_STYLE, PENDING_STYLE = "bold black on green3", "bold white on red3", "bold black on grey70"


def verdict_badge(state: WizardState) -> Text:
    """The plan in one badge: `fits 17.2/21.6G`, or `estimating…` while the dataset is still counted."""
    plan = state.plan
    if plan is None:
        return Text(" no plan yet ", style=PENDING_STYLE)
    if state.provisional:
        return Text(" estimating… ", style=PENDING_STYLE)
    a = plan.advice
    return Text(f" {'fits' if a.fits else 'does not fit'} {a.estimate.peak_gib:.1f}/{a.budget_gib:.1f}G ",
                style=FITS_STYLE if a.fits else NO_FIT_STYLE)


def step_bar(current: str, state: WizardState, width: int) -> Text:
    """`tuiwiz  1 Hardware  2 Model  3 Dataset  4 Plan ... fits 17.2/21.6G`, shortened to `width`:
    first the other steps lose their names, then the brand goes; the current step and the
    verdict always stay. Steps are clickable."""
    verdict = verdict_badge(state)
    for brand, names in ((True, True), (True, False), (False, False)):
        t = Text()
        if brand:
            t.append(" tuiwiz ", style="bold reverse")
        for i, step in enumerate(STEPS, start=1):
            label = f" {i} {TITLES[step]} " if names or step == current else f" {i} "
            t.append(" ")
            t.append(label, style="bold black on dark_orange" if step == current else "")
            t.apply_meta({"@click": f"app.goto('{step}')"}, len(t) - len(label), len(t))
        if t.cell_len + 1 + verdict.cell_len <= width:
            break
    t.append(" " * max(1, width - t.cell_len - verdict.cell_len))
    t.append_text(verdict)
    return t


class StepBar(Static):
    def show(self, current: str, state: WizardState) -> None:
        self.update(step_bar(current, state, self.size.width or self.app.size.width))


class WizardScreen(Screen[None]):
    """A step of the wizard. Subclasses compose their body and redraw it in `sync()`."""

    STEP = "hardware"

    @property
    def wizard(self) -> WizardApp:
        return self.app  # type: ignore[return-value]

    @property
    def state(self) -> WizardState:
        return self.wizard.state

    def compose(self) -> ComposeResult:
        yield StepBar(id="stepbar")
        yield from self.compose_body()
        yield KeyBar()

    def compose_body(self) -> ComposeResult:
        yield from ()

    _ready = False

    def on_mount(self) -> None:
        self._ready = True
        self.sync()

    def on_screen_resume(self) -> None:
        self.sync()

    def on_resize(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Redraw from the shared state (cheap; called on every change)."""
        if not self._ready:
            return  # not composed yet: on_mount draws it
        self.query_one(StepBar).show(self.STEP, self.state)
        self.sync_body()
        self.refresh_bindings()  # keys that depend on the state (esc while profiling, space with NVML)

    def sync_body(self) -> None:
        pass
