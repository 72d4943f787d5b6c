"""Step 4: the plan: editable knobs, the live estimate against the budget, export and launch.

The knob panel is generated from the knob registry (`tuiwiz.planning.knobs.KNOBS`, every knob
with `tui=True`), so a knob added to `TrainingKnobs` shows up here with its label, widget and
parser. Every edit re-runs the planner in the UI thread: it is pure and takes about a
millisecond (the knob the user set is held; the advisor re-chooses the others).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widget import Widget
from textual.widgets import Input, Label, Select, Static
from textual.widgets.select import NoSelection

from tuiwiz.errors import BadValue, Clobber, UserError
from tuiwiz.exports import write_plan_export
from tuiwiz.planning.knobs import KNOB_BY_NAME, KNOBS, KnobInfo, format_knob, parse_knob
from tuiwiz.tui.render import breakdown_table, memory_legend, memory_stack
from tuiwiz.tui.screens.base import FITS_STYLE, NO_FIT_STYLE, PENDING_STYLE, WizardScreen
from tuiwiz.tui.screens.hardware import short_name
from tuiwiz.tui.screens.modals import ConfirmScreen, ExportChoice, ExportScreen, TextScreen
from tuiwiz.tui.state import label_of

if TYPE_CHECKING:
    from tuiwiz.planner import Plan

EFFECTIVE = "effective_batch"
#: The knob panel's rows: every TUI knob, with the effective batch (a request field) after accumulation.
ROWS: tuple[str, ...] = tuple(
    name for k in KNOBS if k.tui for name in ((k.name, EFFECTIVE) if k.name == "grad_accum" else (k.name,)))
#: Knobs the advisor sets from the dataset's token lengths: blank while those are still counted.
FROM_DATA = frozenset({"cutoff_len", "micro_batch_size", "grad_accum", EFFECTIVE, "grad_checkpointing"})
#: Where the Dataset step is, for words that send the user there.
DATASET_STEP = "the Dataset step (F4)"


def select_options(info: KnobInfo) -> list[tuple[str, Any]]:
    """A Select's options for a switch, a choice or the LoRA targets: shown as `format_knob` shows them."""
    return [(format_knob(info.name, c), c) for c in info.choices]


def knob_widget(name: str) -> Widget:
    """The editor for one row: a Select for switches, choices and targets, an Input for numbers."""
    info = KNOB_BY_NAME.get(name)
    if info is not None and info.kind in ("switch", "choice", "targets"):
        # blank ("…") only while a knob waits for the dataset's profile; the user cannot pick it
        return Select(select_options(info), id=f"k-{name}", allow_blank=True, prompt="…", compact=True)
    kind = "integer" if info is None or info.kind == "int" else "number"
    return Input(id=f"k-{name}", type="text" if info is not None and info.optional else kind, compact=True,
                 select_on_focus=False)


def tui_warnings(plan: Plan) -> list[str]:
    """The plan's warnings in the TUI's words. The verdict already says whether it fits, and an
    approximate count names the TUI field that fixes it instead of a CLI flag."""
    out: list[str] = []
    if plan.profile is not None and plan.profile.approximate:
        out.append(f"token counts are approximate ({plan.profile.tokenizer}): choose the model's tokenizer in "
                   f"{DATASET_STEP}, field Tokenizer, for exact counts")
    # `plan.warnings` leaves out the two the TUI says its own way (the verdict, the line above)
    out += [*plan.warnings, *plan.advice.warnings]
    return out


class PlanScreen(WizardScreen):
    STEP = "plan"
    AUTO_FOCUS = "#why"
    BINDINGS = [
        Binding("ctrl+s", "export", "export", tooltip="write the plan as a preset or a trainer's config"),
        Binding("ctrl+g", "command", "command", tooltip="the same plan as a tuiwiz --auto command"),
        Binding("ctrl+l", "launch", "launch", tooltip="start the run (asks first); the monitor follows it"),
        Binding("ctrl+r", "release", "auto all", tooltip="let the advisor choose every knob again"),
    ]

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="plan-body"):
            with Vertical(id="knobs"):
                for name in ROWS:
                    with Horizontal(classes="knob-row"):
                        yield Label(label_of(name), id=f"lbl-{name}", classes="knob-label")
                        yield knob_widget(name)
                yield Static(Text("* set by you and held; the advisor picks the rest", style="dim"), id="knob-legend")
                yield Static(id="knob-error")
            with Vertical(id="estimate"):
                yield Static(id="verdict")
                yield Static(id="stack")
                yield Static(id="legend")
                with Horizontal(id="why-row"):
                    with VerticalScroll(id="why"):
                        yield Static(id="reasons")
                    yield Static(id="breakdown")

    def on_mount(self) -> None:
        self._editing: str | None = None  # the Input the user is typing in: never rewritten under them
        super().on_mount()

    # ---- drawing ---------------------------------------------------------------------------
    def sync_body(self) -> None:
        st = self.state
        plan = st.plan
        verdict = self.query_one("#verdict", Static)
        if plan is None:
            verdict.update(Text(st.plan_error or "Waiting for hardware and model…",
                                style="bold red" if st.plan_error else "italic"))
            return
        self._fill_knobs(plan)
        if st.provisional:
            self._draw_provisional()
            return
        a, est = plan.advice, plan.advice.estimate
        g = plan.gpus[0]
        gpus = f"{len(plan.gpus)}x " if len(plan.gpus) > 1 else ""
        head = Text(" FITS " if a.fits else " DOES NOT FIT ", style=FITS_STYLE if a.fits else NO_FIT_STYLE)
        head.append(f" peak {est.peak_gib:.1f} / budget {a.budget_gib:.1f} GiB")
        head.append(f"\n{gpus}{short_name(g.name)}: {g.free_gib:.1f} GiB free, {plan.request.headroom:.0%} kept spare",
                    style="dim")
        verdict.update(head)
        width = max(10, self.query_one("#stack", Static).size.width or 40)
        groups = est.breakdown_bytes()
        self.query_one("#stack", Static).update(memory_stack(groups, a.budget_bytes, width))
        self.query_one("#legend", Static).update(memory_legend(groups, width))
        self.query_one("#reasons", Static).update(self._reasons(plan))
        self.query_one("#breakdown", Static).update(breakdown_table(est.terms, est.peak_gib, a.budget_gib))

    def _draw_provisional(self) -> None:
        """No numbers until the dataset's token lengths are in: they set the cutoff, and the rest follows."""
        status = self.state.profile_status
        done = f" ({status.done:,} samples so far)" if status.done else ""
        self.query_one("#verdict", Static).update(Text.assemble(
            (" ESTIMATING… ", PENDING_STYLE), f" counting the dataset's tokens{done}",
            ("\nthe cutoff and the estimate follow from them", "dim")))
        for wid in ("#stack", "#legend", "#breakdown"):
            self.query_one(wid, Static).update("")
        self.query_one("#reasons", Static).update(Text(
            f"The plan appears when the profile is in ({DATASET_STEP}; esc there cancels it and keeps the "
            "cutoff you set).", style="italic"))

    def _reasons(self, plan: Plan) -> Text:
        a, k = plan.advice, plan.knobs
        out = Text()
        if self.state.plan_error:
            out.append(f"✗ {self.state.plan_error}\n", style="bold red")
        out.append(f"effective batch {k.effective_batch(len(plan.gpus))}, "
                   f"LoRA {a.estimate.lora_params / 1e6:.1f} M trainable params\n", style="dim")
        for s in plan.suggestions:
            out.append("➜ ", style="bold yellow")
            out.append(s.text + "\n")
        for w in tui_warnings(plan):
            out.append("! ", style="bold yellow")
            out.append(w + "\n", style="yellow")
        for r in a.reasons:
            out.append("• ", style="cyan")
            out.append(r + "\n")
        return out

    def _fill_knobs(self, plan: Plan) -> None:
        """Show the plan's knobs; while it is provisional, the ones the data decides stay blank."""
        k, req = plan.knobs, plan.request
        provisional = self.state.provisional
        editing = self._editing if self.focused is not None and self.focused.id == self._editing else None
        with self.prevent(Input.Changed, Select.Changed):
            for name in ROWS:
                value = k.effective_batch(len(plan.gpus)) if name == EFFECTIVE else getattr(k, name)
                held = name in req.fixed
                label = label_of(name)
                self.query_one(f"#lbl-{name}", Label).update(
                    Text("*" + label, style="bold yellow") if held else Text(" " + label))
                widget = self.query_one(f"#k-{name}")
                if widget.id == editing:
                    continue  # never rewrite what the user is typing
                waiting = provisional and not held and name in FROM_DATA
                if isinstance(widget, Select):
                    if waiting:
                        widget.clear()
                    else:
                        self._show_choice(widget, name, value)
                elif isinstance(widget, Input):
                    text = "" if waiting else format_knob(name, value)
                    widget.placeholder = "…" if waiting else ""
                    if widget.value != text:
                        widget.value = text

    @staticmethod
    def _show_choice(widget: Select[Any], name: str, value: Any) -> None:
        if isinstance(value, list):  # LoRA targets given as module names: offered as they are
            value = format_knob(name, value)
            if value not in [v for _, v in widget._options]:
                widget.set_options([*select_options(KNOB_BY_NAME[name]), (value, value)])
        if widget.value != value:
            widget.value = value

    # ---- editing ---------------------------------------------------------------------------
    def _apply(self, name: str, value: Any) -> None:
        err = self.query_one("#knob-error", Static)
        try:
            if name == EFFECTIVE:
                self.state.set_effective_batch(value)
            else:
                self.state.set_knob(name, value)
        except BadValue as e:
            err.update(Text(e.render(label_of), style="bold red"))
            return
        err.update("")
        self.wizard.changed()

    def _parse(self, name: str, text: str) -> Any:
        if name == EFFECTIVE:
            try:
                return int(text)
            except ValueError:
                raise BadValue(name, text, "expected a whole number") from None
        return parse_knob(name, text)

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        name = (event.input.id or "").removeprefix("k-")
        if name not in ROWS:
            return
        self._editing = event.input.id
        try:
            value = self._parse(name, event.value)
        except BadValue as e:
            self.query_one("#knob-error", Static).update(Text(e.render(label_of), style="red"))
            return
        self._apply(name, value)

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        name = (event.select.id or "").removeprefix("k-")
        if name not in ROWS or not event.select.has_focus_within:
            return
        if isinstance(event.value, NoSelection):  # "…" is not a choice: show the plan's value again
            self.sync_body()
            return
        value = event.value
        if isinstance(value, str) and KNOB_BY_NAME[name].kind == "targets":
            value = parse_knob(name, value)
        if value == getattr(self.state.knobs, name):
            return  # the widget caught up with the plan; the user changed nothing
        self._apply(name, value)

    # ---- actions -----------------------------------------------------------------------------
    def action_release(self) -> None:
        self.state.release_knobs()
        self.query_one("#knob-error", Static).update("")
        self._editing = None
        self.wizard.changed()
        self.notify("the advisor chooses every knob again")

    def action_command(self) -> None:
        self.app.push_screen(TextScreen("Equivalent command", self.state.auto_command(),
                                        "Only the knobs you set are flags; the advisor chooses the rest again."))

    def action_export(self) -> None:
        if self.state.plan is None:
            self.notify("no plan yet", severity="warning")
            return
        self.app.push_screen(ExportScreen(), self._export_chosen)

    def _export_chosen(self, choice: ExportChoice | None, force: bool = False) -> None:
        plan = self.state.plan
        if choice is None or plan is None:
            return
        try:
            path = write_plan_export(plan.to_preset(), choice.fmt, choice.path, force=force)
        except Clobber as e:
            if not force:
                def confirm(yes: bool | None) -> None:
                    if yes:
                        self._export_chosen(choice, force=True)

                self.app.push_screen(ConfirmScreen(f"{e.path} already exists. Overwrite it?", yes="Overwrite"),
                                     confirm)
            return
        except UserError as e:
            self.wizard.show_error(e.render(label_of), "Export failed")
            return
        self.notify(f"wrote {path}")

    def action_launch(self) -> None:
        plan = self.state.plan
        if plan is None:
            self.notify("no plan yet", severity="warning")
            return
        if plan.request.dataset is None:
            self.wizard.show_error(f"choose a dataset first ({DATASET_STEP}): a run needs data to train on.", "Launch")
            return
        if self.state.provisional:
            self.notify("the dataset is still being counted: launch when the estimate is in", severity="warning")
            return
        warn = "" if plan.advice.fits else "\nThe estimate says it does NOT fit: it will likely run out of memory."
        question = (f"Launch training of {plan.spec.id} on {plan.request.dataset.path}?\n"
                    f"It runs detached (survives SSH drops); the monitor opens next.{warn}")

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.wizard.launch_run(plan.to_preset())

        self.app.push_screen(ConfirmScreen(question, yes="Launch"), confirmed)
