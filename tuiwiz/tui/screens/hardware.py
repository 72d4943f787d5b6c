"""Step 1: the GPUs (live through NVML, or a catalog card) and the host."""

from __future__ import annotations

from typing import Callable

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Label, Select, Static

from tuiwiz.errors import UserError
from tuiwiz.hardware import GPU_CATALOG
from tuiwiz.tui.render import usage_bar
from tuiwiz.tui.screens.base import WizardScreen

THIS_MACHINE = "__nvml__"


def short_name(name: str) -> str:
    """`NVIDIA GeForce RTX 4090` -> `RTX 4090`: the table has 80 columns to share."""
    for prefix in ("NVIDIA ", "GeForce ", "Tesla "):
        name = name.removeprefix(prefix)
    return name


def _fmt(v: float | None, unit: str) -> str:
    return "–" if v is None else f"{v:.0f}{unit}"


class HardwareScreen(WizardScreen):
    STEP = "hardware"
    AUTO_FOCUS = "#gpus"
    BINDINGS = [Binding("space", "toggle", "use GPU", tooltip="use the GPU under the cursor, or not"),
                Binding("g", "pick_card", "card", tooltip="plan for a catalog card instead of this machine"),
                Binding("plus,equals_sign", "more_cards", "more", key_display="+",
                        tooltip="plan for one more of the catalog card"),
                Binding("minus", "fewer_cards", "fewer", key_display="-",
                        tooltip="plan for one fewer of the catalog card"),
                Binding("greater_than_sign", "more_nodes", "nodes", key_display=">",
                        tooltip="plan for one more machine (node) like this one: a multi-node run is exported "
                                "as a SLURM job or torchrun script"),
                Binding("less_than_sign", "fewer_nodes", "fewer nodes", key_display="<", show=False,
                        tooltip="plan for one machine (node) fewer")]

    def compose_body(self) -> ComposeResult:
        yield Static(id="hw-note")
        yield DataTable(id="gpus", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="card-row"):
            yield Label("Plan for ", id="card-label")
            yield Select([(f"{g.name} ({g.published_gb} GB)", g.name) for g in GPU_CATALOG], id="card",
                         allow_blank=False, compact=True)
        yield Static(id="host")

    def on_mount(self) -> None:
        table = self.query_one("#gpus", DataTable)
        table.add_columns("use", "#", "GPU", "memory used", "util", "temp", "bf16")
        self._options_key: tuple = ()
        super().on_mount()

    def _card_options(self) -> list[tuple[str, str]]:
        opts = [("this machine's GPUs (NVML)", THIS_MACHINE)] if self.state.nvml else []
        return opts + [(f"{g.name} ({g.published_gb} GB)", g.name) for g in GPU_CATALOG]

    def sync_body(self) -> None:
        st = self.state
        hw = st.hardware
        note = self.query_one("#hw-note", Static)
        if hw is None:
            note.update(Text("Reading GPUs through NVML…", style="italic"))
            return
        if hw.source == "nvml":
            extra = f"driver {hw.driver_version}" + (f", CUDA {hw.cuda_version}" if hw.cuda_version else "")
            live = f"live every {self.wizard.poll_s:g}s" if self.wizard.poll_s > 0 else "not refreshed"
            note.update(Text.assemble(("NVML ", "bold green"), f"{len(hw.gpus)} GPU(s), {extra}; {live}.\n",
                                      "Space/Enter: use a GPU or not. g: plan for a catalog card instead."))
        else:
            note.update(Text.assemble(("No NVML: ", "bold yellow"), hw.nvml_problem or "planning for a catalog GPU.",
                                      " Choose the card to plan for below (g), how many (+/-) and on how "
                                      "many machines (</>)."))
        plan_hw = st.plan_hardware()
        chosen = set(st.selected_indices())
        table = self.query_one("#gpus", DataTable)
        cursor = table.cursor_row
        table.clear()
        for g in plan_hw.gpus:
            use = Text("[x]" if (g.index in chosen or plan_hw.source == "catalog") else "[ ]")
            table.add_row(use, str(g.index), short_name(g.name)[:18], usage_bar(g.used_gib, g.total_gib),
                          _fmt(g.util_pct, "%"), _fmt(g.temp_c, "°C"), "yes" if g.bf16 else "no", key=str(g.index))
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        h = hw.host
        disk = "" if h.disk_free_gib is None else f", disk {h.disk_free_gib:.0f} GiB free"
        nodes = st.request.nodes
        across = (f"\nPlanning for {nodes} machines like this: {nodes * len(plan_hw.gpus)} GPUs in all "
                  "(export it as a SLURM job or torchrun script)") if nodes > 1 else ""
        self.query_one("#host", Static).update(
            f"Host: {h.cpu_cores} cores, RAM {h.ram_available_gib:.1f} of {h.ram_total_gib:.1f} GiB free{disk}{across}")
        select = self.query_one("#card", Select)
        options = self._card_options()
        key = tuple(v for _, v in options)
        if key != self._options_key:
            self._options_key = key
            select.set_options(options)
        value = st.request.gpu or (THIS_MACHINE if st.nvml else st.catalog_card)
        if value in key and select.value != value:
            with self.prevent(Select.Changed):
                select.value = value

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        catalog = not self.state.nvml or bool(self.state.request.gpu)
        if action == "toggle":  # choosing GPUs is for this machine's own, seen through NVML
            return not catalog
        if action in ("more_cards", "fewer_cards", "more_nodes", "fewer_nodes"):
            return catalog  # counts are for catalog cards; this machine's GPUs are chosen one by one
        return True

    def action_more_cards(self) -> None:
        self._shape(self.state.set_card_count, self.state.request.gpu_count + 1)

    def action_fewer_cards(self) -> None:
        self._shape(self.state.set_card_count, self.state.request.gpu_count - 1)

    def action_more_nodes(self) -> None:
        self._shape(self.state.set_node_count, self.state.request.nodes + 1)

    def action_fewer_nodes(self) -> None:
        self._shape(self.state.set_node_count, self.state.request.nodes - 1)

    def _shape(self, setter: Callable[[int], None], value: int) -> None:
        """Set the card or node count; a count out of range is a warning, not an error panel."""
        try:
            setter(value)
        except UserError as e:
            self.notify(str(e), severity="warning")
            return
        self.wizard.changed()

    def action_toggle(self) -> None:
        st = self.state
        table = self.query_one("#gpus", DataTable)
        if not st.nvml or st.request.gpu or not table.row_count:
            self.notify("Planning for a catalog card: choose it with g.", severity="warning")
            return
        index = int(table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value)
        try:
            st.toggle_gpu(index)
        except UserError as e:
            self.notify(str(e), severity="warning")
            return
        self.wizard.changed()

    @on(DataTable.RowSelected, "#gpus")
    def _row_selected(self) -> None:
        self.action_toggle()

    def action_pick_card(self) -> None:
        select = self.query_one("#card", Select)
        select.focus()
        select.action_show_overlay()

    @on(Select.Changed, "#card")
    def _card_changed(self, event: Select.Changed) -> None:
        value = event.value
        if not event.select.has_focus_within:
            return  # the widget initialising itself, not the user choosing
        self.state.use_card(None if value == THIS_MACHINE else str(value))
        self.wizard.changed()
