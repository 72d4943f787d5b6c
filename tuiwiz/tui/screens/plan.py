"""Step 4: the plan: editable knobs, the live estimate against the budget, export and launch.

Every edit re-runs the planner in the UI thread: it is pure and takes about a millisecond
(the knob the user set is held; the advisor re-chooses the others).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, Select, Static
from textual.widgets.select import NoSelection

from tuiwiz.errors import Clobber, UserError
from tuiwiz.tui.render import memory_legend, memory_stack
from tuiwiz.tui.screens.base import WizardScreen
from tuiwiz.tui.screens.hardware import short_name
from tuiwiz.tui.screens.modals import ConfirmScreen, ExportChoice, ExportScreen, TextScreen

#: (id, label, knob field or "effective_batch", kind)
KNOBS: tuple[tuple[str, str, str, str], ...] = (
    ("cutoff", "cutoff", "cutoff_len", "int"),
    ("micro", "micro-batch", "micro_batch_size", "int"),
    ("accum", "accumulation", "grad_accum", "int"),
    ("effective", "eff. batch", "effective_batch", "int"),
    ("rank", "LoRA rank", "lora_rank", "int"),
    ("alpha", "LoRA alpha", "lora_alpha", "int"),
    ("targets", "targets", "target_modules", "select"),
    ("ckpt", "checkpointing", "grad_checkpointing", "select"),
    ("optim", "optimizer", "optim", "select"),
    ("epochs", "epochs", "epochs", "float"),
    ("lr", "learning rate", "learning_rate", "float"),
)
SELECT_OPTIONS: dict[str, list[tuple[str, Any]]] = {
    "targets": [("all-linear", "all-linear"), ("attn", "attn")],
    "ckpt": [("on", True), ("off", False)],
    "optim": [(o, o) for o in ("paged_adamw_8bit", "adamw_8bit", "adamw_torch_fused", "adamw_torch")],
}


def _shown(kind: str, value: Any) -> str:
    if kind == "float":
        return f"{value:g}"
    return str(value)


class PlanScreen(WizardScreen):
    STEP = "plan"
    BINDINGS = [
        Binding("ctrl+s", "export", "export"),
        Binding("ctrl+g", "command", "command"),
        Binding("ctrl+l", "launch", "launch"),
        Binding("ctrl+r", "release", "auto all"),
    ]

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="plan-body"):
            with Vertical(id="knobs"):
                for wid, label, _field, kind in KNOBS:
                    with Horizontal(classes="knob-row"):
                        yield Label(label, id=f"lbl-{wid}", classes="knob-label")
                        if kind == "select":
                            yield Select(SELECT_OPTIONS[wid], id=f"k-{wid}", allow_blank=False, compact=True)
                        else:
                            yield Input(id=f"k-{wid}", type="integer" if kind == "int" else "number",
                                        compact=True, select_on_focus=False)
                yield Static(Text("* set by you and held; the advisor picks the rest", style="dim"), id="knob-legend")
                yield Static(id="knob-error")
            with Vertical(id="estimate"):
                yield Static(id="verdict")
                yield Static(id="stack")
                yield Static(id="legend")
                with VerticalScroll(id="why"):
                    yield Static(id="reasons")

    def on_mount(self) -> None:
        self._editing: str | None = None  # the Input the user is typing in: never rewritten under them
        super().on_mount()
        self.query_one("#k-cutoff", Input).focus()

    # ---- drawing ---------------------------------------------------------------------------
    def sync_body(self) -> None:
        st = self.state
        plan = st.plan
        verdict = self.query_one("#verdict", Static)
        if plan is None:
            verdict.update(Text(st.plan_error or "Waiting for hardware and model…", style="italic"))
            return
        a, est = plan.advice, plan.advice.estimate
        self._fill_knobs(plan)
        g = plan.gpus[0]
        gpus = f"{len(plan.gpus)}x " if len(plan.gpus) > 1 else ""
        head = Text(" FITS " if a.fits else " DOES NOT FIT ", style="bold black on green3" if a.fits else "bold white on red3")
        head.append(f" peak {est.peak_gib:.1f} GiB of {a.budget_gib:.1f} GiB budget")
        head.append(f"\n {gpus}{short_name(g.name)}: {g.free_gib:.1f} GiB free, {plan.request.headroom:.0%} kept spare",
                    style="dim")
        verdict.update(head)
        width = max(10, self.query_one("#stack", Static).size.width or 40)
        groups = est.breakdown_bytes()
        self.query_one("#stack", Static).update(memory_stack(groups, a.budget_bytes, width))
        self.query_one("#legend", Static).update(memory_legend(groups))
        self.query_one("#reasons", Static).update(self._reasons(plan))

    def _reasons(self, plan: Any) -> Text:
        a = plan.advice
        k = plan.knobs
        out = Text()
        out.append(f"effective batch {k.effective_batch(len(plan.gpus))}, "
                   f"LoRA {a.estimate.lora_params / 1e6:.1f} M trainable params\n", style="dim")
        for s in a.suggestions:
            out.append("➜ ", style="bold yellow")
            out.append(s + "\n")
        for w in (*plan.warnings, *a.warnings):
            if w.startswith("does not fit"):
                continue
            out.append("! ", style="bold yellow")
            out.append(w + "\n", style="yellow")
        for r in a.reasons:
            out.append("• ", style="cyan")
            out.append(r + "\n")
        return out

    def _fill_knobs(self, plan: Any) -> None:
        k, req = plan.knobs, plan.request
        editing = self._editing if self.focused is not None and self.focused.id == self._editing else None
        with self.prevent(Input.Changed, Select.Changed):
            for wid, label, field, kind in KNOBS:
                value = k.effective_batch(len(plan.gpus)) if field == "effective_batch" else getattr(k, field)
                user = field in req.fixed
                self.query_one(f"#lbl-{wid}", Label).update(
                    Text("*" + label, style="bold yellow") if user else Text(" " + label))
                widget = self.query_one(f"#k-{wid}")
                if widget.id == editing:
                    continue  # never rewrite what the user is typing
                if isinstance(widget, Select):
                    if isinstance(value, list):
                        value = ",".join(value)
                        if (value, value) not in SELECT_OPTIONS[wid]:
                            widget.set_options([*SELECT_OPTIONS[wid], (value, value)])
                    if widget.value != value:
                        widget.value = value
                elif isinstance(widget, Input):
                    text = _shown(kind, value)
                    if widget.value != text:
                        widget.value = text

    # ---- editing ---------------------------------------------------------------------------
    def _apply(self, field: str, value: Any) -> None:
        err = self.query_one("#knob-error", Static)
        try:
            if field == "effective_batch":
                self.state.set_effective_batch(int(value))
            else:
                self.state.set_knob(field, value)
        except ValidationError as e:
            first = e.errors()[0]
            err.update(Text(f"{field}: {first['msg']} (got {value!r})", style="bold red"))
            return
        except UserError as e:
            err.update(Text(str(e), style="bold red"))
            return
        err.update("")
        self.wizard.changed()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        wid = (event.input.id or "").removeprefix("k-")
        spec = next((x for x in KNOBS if x[0] == wid), None)
        if spec is None:
            return
        self._editing = event.input.id
        text = event.value.strip()
        try:
            value: Any = int(text) if spec[3] == "int" else float(text)
        except ValueError:
            self.query_one("#knob-error", Static).update(Text(f"{spec[1]}: type a number", style="red"))
            return
        self._apply(spec[2], value)

    @on(Select.Changed)
    def _select_changed(self, event: Select.Changed) -> None:
        wid = (event.select.id or "").removeprefix("k-")
        spec = next((x for x in KNOBS if x[0] == wid), None)
        if spec is None or isinstance(event.value, NoSelection) or not event.select.has_focus_within:
            return
        value = event.value
        if spec[2] == "target_modules" and isinstance(value, str) and "," in value:
            value = value.split(",")
        if value == getattr(self.state.knobs, spec[2]):
            return  # the widget caught up with the plan; the user changed nothing
        self._apply(spec[2], value)

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
        if choice is None:
            return
        try:
            path = write_export(self.state.plan, choice, force=force)
        except Clobber:
            if not force:
                def confirm(yes: bool | None) -> None:
                    if yes:
                        self._export_chosen(choice, force=True)

                self.app.push_screen(ConfirmScreen(f"{choice.path} already exists. Overwrite it?"), confirm)
            return
        except UserError as e:
            self.wizard.show_error(str(e), "Export failed")
            return
        self.notify(f"wrote {path}")

    def action_launch(self) -> None:
        plan = self.state.plan
        if plan is None:
            self.notify("no plan yet", severity="warning")
            return
        if plan.request.dataset is None:
            self.wizard.show_error("choose a dataset first (step 3): a run needs data to train on.", "Launch")
            return
        warn = "" if plan.advice.fits else "\nThe estimate says it does NOT fit: it will likely run out of memory."
        question = (f"Launch training of {plan.spec.id} on {plan.request.dataset.path}?\n"
                    f"It runs detached (survives SSH drops); the monitor opens next.{warn}")

        def confirmed(yes: bool | None) -> None:
            if yes:
                self.wizard.launch_run(plan.to_preset())

        self.app.push_screen(ConfirmScreen(question), confirmed)


def write_export(plan: Any, choice: ExportChoice, *, force: bool = False) -> Any:
    """Write the plan as a preset or a trainer config. Raises UserError if the file exists."""
    from tuiwiz.preset import save_preset

    preset = plan.to_preset()
    if choice.fmt == "preset":
        return save_preset(preset, choice.path, force=force)
    from tuiwiz.atomic import write_text_atomic
    from tuiwiz.exports import export_text

    return write_text_atomic(choice.path, export_text(preset, choice.fmt), force=force)
