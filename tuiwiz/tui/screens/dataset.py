"""Step 3: the dataset: file, layout, the tokenizer that counts it, a token-length profile and the
masked-token preview (rendered with that tokenizer's own chat template)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich.table import Table
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Input, Label, ProgressBar, Select, Static, TabbedContent, TabPane, Tabs

from tuiwiz.preset import DatasetRef
from tuiwiz.tui.render import histogram, mask_text
from tuiwiz.tui.screens.base import WizardScreen
from tuiwiz.tui.suggest import PathSuggester

if TYPE_CHECKING:
    from tuiwiz.data import LengthProfile
    from tuiwiz.tui.state import ProfileStatus

AUTO = "__auto__"
LAYOUT_CHOICES = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")  # tuiwiz.data.LAYOUTS
STAT_ROWS = (("samples", "count"), ("min", "min"), ("mean", "mean"), ("p50", "p50"), ("p90", "p90"),
             ("p95", "p95"), ("p99", "p99"), ("max", "max"), ("total tokens", "total_tokens"),
             ("trained tokens", "trained_tokens"))
#: How each profile state is coloured.
STATUS_STYLE = {"idle": "italic", "running": "", "done": "green", "approximate": "yellow", "failed": "bold red",
                "cancelled": "yellow"}
TOKENIZER_AUTO_HINT = "auto (the model's own), or a folder with tokenizer.json"


def stats_table(profile: LengthProfile, cutoff: int, micro_batch: int, batching: str) -> Table:
    """Length statistics beside what the chosen cutoff does to this data."""
    t = Table(box=None, padding=(0, 1), show_header=True, header_style="bold")
    t.add_column("tokens per sample", no_wrap=True)
    t.add_column("", justify="right", no_wrap=True)
    t.add_column(f"at cutoff {cutoff}", no_wrap=True)
    t.add_column("", justify="right", no_wrap=True)
    at = profile.at_cutoff(cutoff, micro_batch, batching)
    right = [
        ("truncated samples", f"{at.truncated} ({at.truncated_frac:.1%})"),
        ("trained tokens lost", f"{at.trained_tokens_lost} ({at.trained_lost_frac:.1%})"),
        ("tokens kept", f"{at.tokens_kept:,}"),
        ("sequences", f"{at.sequences:,}" + (" packed" if batching == "packed" else "")),
        ("efficiency", f"{at.efficiency:.0%} (micro-batch {micro_batch})"),
        ("padding waste", f"{at.padding_waste:.0%}"),
        ("suggested cutoff", f"{profile.suggested_cutoff} (p{profile.percentile:g})"),
        ("skipped rows", f"{profile.skipped}"),
    ]
    st = profile.stats
    for i, (label, key) in enumerate(STAT_ROWS):
        v = st.get(key, 0)
        left = (label, f"{v:,.1f}" if key == "mean" else f"{int(v):,}")
        r = right[i] if i < len(right) else ("", "")
        t.add_row(*left, *r)
    return t


def check_tokenizer_path(text: str) -> str | None:
    """Why `text` cannot be a tokenizer (None when it can): caught here, before a worker tries it."""
    p = Path(text).expanduser()
    if not p.exists():
        return f"{text}: no such file or folder."
    if p.is_dir() and not (p / "tokenizer.json").is_file():
        return (f"{text}: no tokenizer.json in this folder. Give the folder of the model's tokenizer "
                "(it holds tokenizer.json), or leave the field empty for auto.")
    if p.is_file() and p.suffix != ".json":
        return f"{text}: not a tokenizer.json file."
    return None


class DatasetScreen(WizardScreen):
    STEP = "dataset"
    AUTO_FOCUS = ""  # on_mount decides: the tabs, or the file field when there is no dataset yet
    BINDINGS = [
        Binding("ctrl+o", "browse", "browse", tooltip="pick the dataset file from a folder tree"),
        Binding("escape", "cancel", "cancel profiling", tooltip="stop counting (the plan keeps the cutoff you set)"),
        Binding("ctrl+r", "reprofile", "re-profile", tooltip="count the dataset again"),
    ]

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="ds-row", classes="field-row"):
            yield Label("File ", classes="row-label")
            yield Input(id="ds-path", placeholder="path to .jsonl/.json/.csv/.parquet (→ completes, ^o browse)",
                        suggester=PathSuggester(), compact=True)
            yield Select([("layout: detect", AUTO), *((f"layout: {x}", x) for x in LAYOUT_CHOICES)],
                         id="ds-layout", allow_blank=False, compact=True)
        with Horizontal(id="tok-row", classes="field-row"):
            yield Label("Tokenizer ", classes="row-label")
            yield Input(id="ds-tokenizer", placeholder=TOKENIZER_AUTO_HINT, suggester=PathSuggester(), compact=True)
        with Horizontal(id="ds-status-row"):
            yield Static(id="ds-status")
            yield ProgressBar(id="ds-progress", show_eta=False)
        with TabbedContent(id="ds-tabs"):
            with TabPane("Histogram", id="tab-hist"):
                yield Static(id="ds-hist")
            with TabPane("Stats", id="tab-stats"):
                yield Static(id="ds-stats")
            with TabPane("Longest", id="tab-longest"):
                yield DataTable(id="ds-longest", cursor_type="row")
            with TabPane("Preview", id="tab-preview"):
                with Horizontal(id="preview-row"):
                    yield Label("sample # ", classes="row-label")
                    yield Input(id="preview-index", value="0", type="integer", compact=True)
                    yield Static(id="preview-info")
                with VerticalScroll(id="preview-scroll"):
                    yield Static(id="preview-text")

    def on_mount(self) -> None:
        self._longest_key: object = None
        self.query_one("#ds-longest", DataTable).add_columns("#", "line", "tokens", "trained", "starts with")
        req = self.state.request
        ds = req.dataset
        self.query_one("#ds-path", Input).value = ds.path if ds else ""
        self.query_one("#ds-tokenizer", Input).value = req.tokenizer or ""
        if ds and ds.layout in LAYOUT_CHOICES:
            with self.prevent(Select.Changed):
                self.query_one("#ds-layout", Select).value = ds.layout
        super().on_mount()
        # arriving does not put the cursor in a text field, unless there is nothing else to do
        if ds is None:
            self.query_one("#ds-path", Input).focus()
        else:
            self.query_one("#ds-tabs", TabbedContent).query_one(Tabs).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return self.state.profile_status.busy  # esc is only a key while there is something to cancel
        return True

    # ---- drawing ---------------------------------------------------------------------------
    def show_progress(self) -> None:
        status = self.state.profile_status
        bar = self.query_one("#ds-progress", ProgressBar)
        bar.display = status.busy
        if not status.busy:
            return
        bar.update(total=status.total, progress=status.done)
        of = f" of {status.total:,}" if status.total else ""
        counted = f"{status.done:,}{of} samples" if status.done else status.text
        self.query_one("#ds-status", Static).update(
            Text.assemble(("profiling ", "bold"), counted, "  ", ("esc", "bold"), " cancels"))
        self.refresh_bindings()

    def sync_body(self) -> None:
        st = self.state
        self.query_one("#ds-progress", ProgressBar).display = st.profile_status.busy
        if st.profile_status.busy:
            self.show_progress()
        else:
            self.query_one("#ds-status", Static).update(self._status_text(st.profile_status))
        self._draw_profile()
        self._draw_preview()

    def _status_text(self, status: ProfileStatus) -> Text:
        """The layout and sample count, then the tokenizer by name, exact or approximate and why."""
        prof, tok = self.state.profile, self.state.tokenizer
        style = STATUS_STYLE[status.state]
        if prof is None or tok is None:
            return Text(status.text, style=style)
        ds = self.state.request.dataset
        detected = "" if ds and ds.layout else " (detected)"
        line = Text.assemble(("layout ", "dim"), (prof.layout + detected, "bold"), ("  samples ", "dim"),
                             f"{prof.samples:,}", ("\ntokenizer ", "dim"), (tok.name, "bold"), " ")
        if status.state == "approximate":
            line.append(" APPROXIMATE ", style="bold black on yellow")
            line.append(" " + status.text.removeprefix("approximate: ") + "; give its folder in Tokenizer above",
                        style="yellow")
        else:
            line.append(status.text, style=style)
        return line

    def _draw_profile(self) -> None:
        prof = self.state.profile
        hist = self.query_one("#ds-hist", Static)
        stats = self.query_one("#ds-stats", Static)
        table = self.query_one("#ds-longest", DataTable)
        if prof is None or not prof.samples:
            msg = Text("profile the dataset to see token lengths" if prof is None else "no usable samples",
                       style="italic")
            hist.update(msg)
            stats.update(msg)
            table.clear()
            self._longest_key = None
            return
        k = self.state.knobs
        width = max(20, self.size.width - 4)
        height = max(3, self.size.height - 14)
        top = int(max(prof.stats.get("max", 1), k.cutoff_len * 1.02))
        edges, counts = prof.histogram(bins=min(width, 120), upto=top)
        marks = {"p95": (prof.value_at(95), "yellow"), "p99": (prof.value_at(99), "magenta"),
                 "cutoff": (k.cutoff_len, "bold red")}
        hist.update(histogram(counts, edges, marks, width=width, height=height))
        stats.update(stats_table(prof, k.cutoff_len, k.micro_batch_size, k.batching))
        key = (id(prof), k.cutoff_len)
        if key != self._longest_key:
            self._longest_key = key
            table.clear()
            for ls in prof.longest:
                flag = Text(f"{ls.tokens:,}", style="bold red" if ls.tokens > k.cutoff_len else "")
                table.add_row(str(ls.index), str(ls.line or "–"), flag, f"{ls.trained:,}",
                              ls.preview.replace("\n", " ")[:40], key=str(ls.index))

    def _draw_preview(self) -> None:
        pv = self.state.preview
        info = self.query_one("#preview-info", Static)
        text = self.query_one("#preview-text", Static)
        if pv is None:
            info.update("")
            text.update(Text("no sample loaded", style="italic"))
            return
        trained = sum(1 for _, t in pv.pieces if t)
        info.update(Text.assemble(f"  {pv.where}: {len(pv.pieces)} tokens, ", (f"{trained} trained", "black on green3"),
                                  ", ", ("masked", "grey58"), (f" ({pv.tokenizer})", "dim")))
        text.update(mask_text(pv.pieces))

    # ---- actions ---------------------------------------------------------------------------
    def _set_path(self, path: str) -> None:
        path = path.strip()
        if not path:
            self.state.set_dataset(None)
            self.wizard.changed()
            return
        if not Path(path).expanduser().exists():
            self.wizard.show_error(f"{path}: no such file or folder.", "Dataset")
            return
        layout = self.query_one("#ds-layout", Select).value
        self.state.set_dataset(DatasetRef(path=path, layout=None if layout == AUTO else str(layout)))
        self.wizard.start_profile()

    @on(Input.Submitted, "#ds-path")
    def _path_submitted(self, event: Input.Submitted) -> None:
        self._set_path(event.value)

    @on(Input.Submitted, "#ds-tokenizer")
    def _tokenizer_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if text and text.lower() != "auto":
            problem = check_tokenizer_path(text)
            if problem is not None:
                self.wizard.show_error(problem, "Tokenizer")
                return
        before = self.state.request.tokenizer
        self.state.set_tokenizer(text)
        if self.state.request.tokenizer != before or self.state.profile_status.state in ("failed", "cancelled"):
            self.wizard.start_profile()

    @on(Select.Changed, "#ds-layout")
    def _layout_changed(self, event: Select.Changed) -> None:
        ds = self.state.request.dataset
        if ds is None or not event.select.has_focus_within:
            return
        layout = None if event.value == AUTO else str(event.value)
        if layout == ds.layout:
            return  # the widget caught up with the state; nothing changed
        self.state.set_dataset(ds.model_copy(update={"layout": layout}))
        self.wizard.start_profile()

    @on(Input.Submitted, "#preview-index")
    def _preview_submitted(self, event: Input.Submitted) -> None:
        try:
            index = int(event.value)
        except ValueError:
            return
        self.wizard.show_sample(index)

    @on(DataTable.RowSelected, "#ds-longest")
    def _longest_selected(self, event: DataTable.RowSelected) -> None:
        index = int(str(event.row_key.value))
        self.query_one("#preview-index", Input).value = str(index)
        self.query_one("#ds-tabs", TabbedContent).active = "tab-preview"
        self.wizard.show_sample(index)

    def action_cancel(self) -> None:
        self.wizard.cancel_profile()

    def action_reprofile(self) -> None:
        self._set_path(self.query_one("#ds-path", Input).value)

    def action_browse(self) -> None:
        from tuiwiz.tui.screens.modals import FileBrowser

        current = self.query_one("#ds-path", Input).value
        start = Path(current).expanduser().parent if current else Path.cwd()

        def chosen(path: str | None) -> None:
            if path:
                self.query_one("#ds-path", Input).value = path
                self._set_path(path)

        self.app.push_screen(FileBrowser(start if start.is_dir() else Path.cwd()), chosen)
