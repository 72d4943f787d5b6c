"""Step 2: which model: a hub id or a local path, with the architecture it implies."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.suggester import SuggestFromList
from textual.widgets import Input, OptionList, Static
from textual.widgets.option_list import Option

from tuiwiz.tui.screens.base import WizardScreen
from tuiwiz.tui.suggest import catalog_ids

PARTS = (("embedding", "embeddings"), ("attention", "attention"), ("mlp", "MLP"), ("experts", "experts"),
         ("router", "router"), ("norms", "norms"), ("head", "output head"))


def model_facts(spec) -> Table:  # noqa: ANN001 - a ModelSpec
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    t.add_row("model", Text(spec.id, overflow="fold"))
    t.add_row("source", Text(spec.source, overflow="fold"))
    t.add_row("type", spec.model_type + (f", MoE {spec.num_experts}x{spec.experts_per_token}" if spec.is_moe else ""))
    t.add_row("params", f"{spec.params_b:.2f} B ({spec.total_params:,})")
    t.add_row("layers", f"{spec.layers} x hidden {spec.hidden}")
    t.add_row("MLP", f"{spec.intermediate}")
    t.add_row("heads", f"{spec.heads} q / {spec.kv_heads} kv, dim {spec.head_dim}")
    t.add_row("vocab", f"{spec.vocab:,}" + (", tied embeddings" if spec.tied_embeddings else ""))
    t.add_row("context", f"{spec.max_positions:,} positions")
    counts = spec.param_counts()
    for key, label in PARTS:
        if counts.get(key):
            t.add_row(Text(f"  {label}", style="dim"), f"{counts[key] / 1e6:,.0f} M")
    return t


class ModelScreen(WizardScreen):
    STEP = "model"
    AUTO_FOCUS = "#model-choices"  # arriving picks from the list; / (or tab) goes to the text field
    BINDINGS = [Binding("slash", "focus_input", "type an id or path")]

    def compose_body(self) -> ComposeResult:
        yield Static("Hub id, model folder or config.json. Enter looks it up, → completes.", id="model-help")
        yield Input(id="model-input", placeholder="e.g. Qwen/Qwen2.5-7B-Instruct or ./my-model", compact=True)
        with Horizontal(id="model-row"):
            yield OptionList(id="model-choices")
            yield Static(id="model-facts")

    def on_mount(self) -> None:
        self._choices_key: tuple[str, ...] = ()
        self._suggest_key: tuple[str, ...] = ()
        self._filter = ""  # what the user typed to narrow the list (the initial value does not)
        inp = self.query_one("#model-input", Input)
        with self.prevent(Input.Changed):
            inp.value = self.state.request.model_path or self.state.request.model
        super().on_mount()

    def _all_ids(self) -> list[str]:
        cached = self.wizard.cached_models or []
        return list(dict.fromkeys([*cached, *catalog_ids()]))

    def sync_body(self) -> None:
        ids = self._all_ids()
        if tuple(ids) != self._suggest_key:
            self._suggest_key = tuple(ids)
            self.query_one("#model-input", Input).suggester = SuggestFromList(ids, case_sensitive=False)
        self._fill_choices(self._filter)
        spec = self.state.spec
        facts = self.query_one("#model-facts", Static)
        facts.update(model_facts(spec) if spec is not None else Text("Looking up the model…", style="italic"))

    def _fill_choices(self, typed: str) -> None:
        cached = set(self.wizard.cached_models or [])
        needle = typed.strip().casefold()
        ids = [i for i in self._all_ids() if needle in i.casefold()] or self._all_ids()
        if tuple(ids) == self._choices_key:
            return
        self._choices_key = tuple(ids)
        ol = self.query_one("#model-choices", OptionList)
        ol.clear_options()
        ol.add_options([Option(Text.assemble(i, (" (cache)", "green") if i in cached else ""), id=i) for i in ids])
        current = self.state.request.model
        if current in ids:
            ol.highlighted = ids.index(current)

    @on(Input.Changed, "#model-input")
    def _typed(self, event: Input.Changed) -> None:
        self._filter = event.value
        self._fill_choices(event.value)

    @on(Input.Submitted, "#model-input")
    def _submitted(self, event: Input.Submitted) -> None:
        ref = event.value.strip()
        if ref:
            self.query_one("#model-facts", Static).update(Text(f"Looking up {ref}…", style="italic"))
            self.wizard.resolve_model(ref)

    @on(OptionList.OptionSelected, "#model-choices")
    def _chosen(self, event: OptionList.OptionSelected) -> None:
        ref = str(event.option.id)
        self.query_one("#model-input", Input).value = ref
        self.wizard.resolve_model(ref)

    def action_focus_input(self) -> None:
        self.query_one("#model-input", Input).focus()
