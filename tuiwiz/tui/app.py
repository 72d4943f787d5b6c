"""The wizard app: four steps over one `WizardState`, with every slow read in a worker.

`make_app` is the one way to build it, for the CLI and for tests alike: tests inject fake
hardware, a fixed GPU reader, a deterministic tokenizer and a fake launcher. Reading goes
through the planner's own I/O half (`read_model`, `tokenizer_for`, `profile_for`), planning
through its pure half (`make_plan`, in `WizardState.replan`), exactly as `tuiwiz --auto` does.

Keys follow one rule: a key that navigates never types, and a key that types never navigates.
F1-F5, ctrl+n/ctrl+p and ctrl+q work from any widget; the plain 1-4, ? and q only act when no
text field has focus (a text field takes them as text).
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Protocol

from textual import work
from textual.binding import Binding
from textual.worker import Worker, get_current_worker

from tuiwiz.errors import CancelledError
from tuiwiz.hardware import GpuInfo, HardwareInventory
from tuiwiz.planner import PlanRequest, profile_for, read_model, tokenizer_for
from tuiwiz.tui.base_app import BaseApp
from tuiwiz.tui.messages import (GpusPolled, HardwareDetected, LaunchNeedsDownload, ModelChoices, ModelResolved,
                                 PreviewReady, ProfileDone, ProfileProgress, RunLaunched, TokenizerChosen)
from tuiwiz.tui.screens.base import STEPS, WizardScreen
from tuiwiz.tui.screens.dataset import DatasetScreen
from tuiwiz.tui.screens.hardware import HardwareScreen
from tuiwiz.tui.screens.model import ModelScreen
from tuiwiz.tui.screens.plan import PlanScreen
from tuiwiz.tui.state import Preview, WizardState

if TYPE_CHECKING:
    from tuiwiz.data import CountingTokenizer
    from tuiwiz.preset import DatasetRef, Preset
    from tuiwiz.runs.launcher import LaunchedRun

#: Set to a file path: the app writes the wall-clock time of its first painted frame there
#: and exits (bench/bench_startup.py).
FIRST_PAINT_ENV = "TUIWIZ_FIRST_PAINT_FILE"
POLL_S = 1.5

GpuReader = Callable[[], list[GpuInfo]]
TokenizerLoader = Callable[[PlanRequest], "CountingTokenizer"]


class Launcher(Protocol):
    """Starts a detached run; `online` lets its worker download what is not on this machine."""

    def __call__(self, preset: Preset, *, online: bool = False) -> LaunchedRun: ...


def _default_gpu_reader() -> list[GpuInfo]:
    from tuiwiz.hardware import read_gpus

    return read_gpus()


def _default_launcher(preset: Preset, *, online: bool = False) -> LaunchedRun:
    from tuiwiz.runs.launcher import launch

    return launch(preset, online=online)


#: The wizard's keys. Navigation is on keys that never type (F-keys, ctrl); the plain keys
#: beside them are non-priority, so a focused text field takes them as text first.
GOTO_HELP = "go to step " + ", ".join(f"{i} {step}" for i, step in enumerate(STEPS, start=1))
WIZARD_BINDINGS = [
    Binding("f1", "help", "help", tooltip="this help", priority=True),
    Binding("question_mark", "help", "help", tooltip="this help", show=False),
    Binding("ctrl+q", "quit", "quit", tooltip="quit (a launched run goes on)", priority=True),
    Binding("q", "quit", "quit", tooltip="quit (a launched run goes on)", show=False),
    Binding("ctrl+n", "step(1)", "steps", key_display="^n/^p", tooltip="next step", priority=True),
    Binding("ctrl+p", "step(-1)", "previous step", show=False, priority=True),
    *(Binding(f"f{i + 2}", f"goto('{step}')", step, show=False, tooltip=GOTO_HELP, priority=True)
      for i, step in enumerate(STEPS)),
    *(Binding(str(i + 1), f"goto('{step}')", step, tooltip=GOTO_HELP, show=False) for i, step in enumerate(STEPS)),
]


class WizardApp(BaseApp):
    """tuiwiz: plan a QLoRA run step by step."""

    CSS_PATH = ["dialogs.tcss", "tuiwiz.tcss"]
    TITLE = "tuiwiz"
    MODES = {"hardware": HardwareScreen, "model": ModelScreen, "dataset": DatasetScreen, "plan": PlanScreen}
    DEFAULT_MODE = "hardware"
    BINDINGS = WIZARD_BINDINGS
    WORKER_TITLES = {"profile": "Profiling failed", "model": "Model not found", "hardware": "Hardware",
                     "preview": "Preview failed", "launch": "Launch failed", "scan": "Model cache",
                     "relaunch": "Relaunch failed", "control": "Stop failed", "follow": "Monitor"}

    def __init__(self, request: PlanRequest, *, hardware: HardwareInventory | None = None,
                 gpu_reader: GpuReader | None = None, tokenizer_loader: TokenizerLoader | None = None,
                 launcher: Launcher | None = None, cached_models: list[str] | None = None,
                 poll_s: float = POLL_S, start_step: str = "hardware", error_log: Path | None = None) -> None:
        super().__init__(error_log=error_log)
        self.state = WizardState(request=request, hardware=hardware)
        self.gpu_reader = gpu_reader or _default_gpu_reader
        self.tokenizer_loader = tokenizer_loader or tokenizer_for
        self.launcher = launcher or _default_launcher
        self.cached_models = cached_models
        self.poll_s = poll_s
        self.start_step = start_step
        self._cancel_profile = threading.Event()
        self._poll_started = False

    # ---- start-up: paint first, then read everything in workers -----------------------------
    def on_mount(self) -> None:
        if self.start_step != self.DEFAULT_MODE:
            self.switch_mode(self.start_step)

    def on_ready(self) -> None:
        """After the first frame: start the reads, so nothing competes with the first paint."""
        target = os.environ.get(FIRST_PAINT_ENV)
        if target:
            import json
            import sys

            heavy = {m: m in sys.modules for m in ("torch", "transformers")}
            Path(target).write_text(json.dumps({"painted_at": time.time(), **heavy}) + "\n")
            self.exit()
            return
        if self.state.hardware is None:
            self.detect_hardware()
        else:
            self._start_polling()
        self.resolve_model(self.state.request.model_path or self.state.request.model)
        if self.cached_models is None:
            self.scan_cached_models()
        if self.state.request.dataset is not None:
            self.start_profile()

    def _start_polling(self) -> None:
        if self.state.nvml and self.poll_s > 0 and not self._poll_started:
            self._poll_started = True
            self.set_interval(self.poll_s, self.poll_gpus)

    # ---- navigation ----------------------------------------------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Step keys act on the wizard's steps only: not under a dialog, nor in the monitor."""
        if action in ("step", "goto"):
            return isinstance(self.screen, WizardScreen)
        return super().check_action(action, parameters)

    def action_goto(self, step: str) -> None:
        if self.current_mode != step:
            self.switch_mode(step)

    def action_step(self, delta: int) -> None:
        i = STEPS.index(self.current_mode) if self.current_mode in STEPS else 0
        self.action_goto(STEPS[(i + delta) % len(STEPS)])

    # ---- state changes -----------------------------------------------------------------
    def changed(self, replan: bool = True) -> None:
        """Re-plan (about a millisecond) and redraw every wizard screen in the current stack."""
        if replan:
            self.state.replan()
        for screen in self.screen_stack:
            if isinstance(screen, WizardScreen):
                screen.sync()

    def worker_failed(self, worker: Worker[object], exc: BaseException, text: str) -> None:
        if worker.group == "profile" and worker.name == self._profile_name(self.state.profile_generation):
            self.state.profiling_failed(text, cancelled=isinstance(exc, CancelledError))
            self.changed()

    # ---- hardware ---------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="hardware", exit_on_error=False)
    def detect_hardware(self) -> None:
        from tuiwiz.hardware import detect_hardware

        self.post_message(HardwareDetected(detect_hardware()))

    def on_hardware_detected(self, msg: HardwareDetected) -> None:
        self.state.hardware = msg.inventory
        self._start_polling()
        self.changed()

    @work(thread=True, exclusive=True, group="poll", exit_on_error=False)
    def poll_gpus(self) -> None:
        gpus = self.gpu_reader()
        if gpus:
            self.post_message(GpusPolled(gpus))

    def on_gpus_polled(self, msg: GpusPolled) -> None:
        self.state.update_gpus(msg.gpus)
        self.changed()

    # ---- model ----------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="model", exit_on_error=False)
    def resolve_model(self, ref: str) -> None:
        from tuiwiz.models import resolve_model

        spec = resolve_model(ref)
        self.post_message(ModelResolved(ref, spec, Path(ref).expanduser().exists()))

    def on_model_resolved(self, msg: ModelResolved) -> None:
        before = self.state.request.model_path or self.state.request.model
        self.state.set_model(msg.ref, msg.spec, msg.is_path)
        self.changed()
        # a different model has a different tokenizer: recount unless the user chose one
        if msg.ref != before and self.state.request.dataset is not None and not self.state.request.tokenizer:
            self.start_profile()

    @work(thread=True, exclusive=True, group="scan", exit_on_error=False)
    def scan_cached_models(self) -> None:
        from tuiwiz.models import cached_model_ids

        self.post_message(ModelChoices(cached_model_ids()))

    def on_model_choices(self, msg: ModelChoices) -> None:
        self.cached_models = msg.ids
        self.changed(replan=False)

    # ---- tokenizer and dataset --------------------------------------------------------------
    @staticmethod
    def _profile_name(generation: int) -> str:
        return f"profile-{generation}"

    def start_profile(self) -> None:
        """(Re)count the dataset with the tokenizer the request names: the plan waits for it."""
        req = self.state.request
        if req.dataset is None:
            return
        self._cancel_profile.set()  # stop a count in progress; its late results are dropped
        self._cancel_profile = threading.Event()
        generation = self.state.profiling_started()
        self.changed()
        self.run_worker(partial(self._profile, req, generation, self._cancel_profile), name=self._profile_name(generation),
                        group="profile", exclusive=True, thread=True, exit_on_error=False)

    def cancel_profile(self) -> None:
        if self.state.profile_status.busy:
            self._cancel_profile.set()

    def _profile(self, req: PlanRequest, generation: int, cancel: threading.Event) -> None:
        """The profiling thread: the planner's tokenizer_for + profile_for, as the CLI runs them."""
        tok = self.tokenizer_loader(req)
        self.post_message(TokenizerChosen(tok, generation))
        spec = read_model(req)
        worker = get_current_worker()

        def progress(done: int, total: int | None) -> None:
            if not worker.is_cancelled:
                self.post_message(ProfileProgress(done, total, generation))

        profile = profile_for(req, spec, tok, progress=progress, cancel=cancel)
        if profile is not None and not cancel.is_set():
            self.post_message(ProfileDone(profile, tok, generation))

    def _current(self, generation: int) -> bool:
        return generation == self.state.profile_generation

    def on_tokenizer_chosen(self, msg: TokenizerChosen) -> None:
        if self._current(msg.generation):
            self.state.tokenizer_chosen(msg.tokenizer)
            self._show_progress()

    def on_profile_progress(self, msg: ProfileProgress) -> None:
        if self._current(msg.generation):
            self.state.profiling_progress(msg.done, msg.total)
            self._show_progress()

    def _show_progress(self) -> None:
        for screen in self.screen_stack:
            if isinstance(screen, DatasetScreen):
                screen.show_progress()

    def on_profile_done(self, msg: ProfileDone) -> None:
        if not self._current(msg.generation):
            return  # a result for a file, layout or tokenizer the user has since changed
        self.state.profiling_done(msg.profile, msg.tokenizer)
        self.changed()
        self.show_sample(0)

    def show_sample(self, index: int) -> None:
        """Load sample `index` for the masked-token preview, with the tokenizer that counted it."""
        ds, tok = self.state.request.dataset, self.state.tokenizer
        if ds is not None and tok is not None:
            self.load_preview(ds, tok, index, self.state.profile_generation)

    @work(thread=True, exclusive=True, group="preview", exit_on_error=False)
    def load_preview(self, ds: DatasetRef, tok: CountingTokenizer, index: int, generation: int) -> None:
        from tuiwiz.data import iter_conversations, mask_preview
        from tuiwiz.errors import BadValue

        last = -1
        for sample in iter_conversations(ds):
            if sample.index == index:
                preview = Preview(index, tuple(mask_preview(sample, tok)), sample.where(), tok.name)
                self.post_message(PreviewReady(preview, generation))
                return
            last = sample.index
        raise BadValue("sample", index, f"no such sample; this dataset's samples are numbered 0-{last}")

    def on_preview_ready(self, msg: PreviewReady) -> None:
        if self._current(msg.generation):
            self.state.preview = msg.preview
            self.changed(replan=False)

    # ---- launch ---------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="launch", exit_on_error=False)
    def launch_run(self, preset: Preset, online: bool = False) -> None:
        from tuiwiz.runs.preflight import ModelNotLocal

        try:
            launched = self.launcher(preset, online=online)
        except ModelNotLocal as e:  # not a failure yet: the user may allow the download
            self.post_message(LaunchNeedsDownload(preset, str(e)))
            return
        self.post_message(RunLaunched(launched))

    def on_launch_needs_download(self, msg: LaunchNeedsDownload) -> None:
        from tuiwiz.tui.screens.modals import ConfirmScreen

        def answered(yes: bool | None) -> None:
            if yes:
                self.launch_run(msg.preset, online=True)

        self.push_screen(ConfirmScreen(f"{msg.why}\n\nLet the run download it from the Hugging Face Hub? "
                                       "(A detached run otherwise never goes online.)", yes="Download"), answered)

    def on_run_launched(self, msg: RunLaunched) -> None:
        from tuiwiz.tui.monitor import MonitorScreen

        self.notify(f"launched run {msg.launched.run_id}")
        self.push_screen(MonitorScreen(msg.launched.paths, gpu_reader=self.gpu_reader))


def make_app(request: PlanRequest | None = None, *, hardware: HardwareInventory | None = None,
             gpu_reader: GpuReader | None = None, tokenizer_loader: TokenizerLoader | None = None,
             launcher: Launcher | None = None, cached_models: list[str] | None = None,
             poll_s: float = POLL_S, start_step: str = "hardware", error_log: Path | None = None) -> WizardApp:
    """Build the wizard. Everything after `request` is for injection (tests, screenshots)."""
    return WizardApp(request or PlanRequest(), hardware=hardware, gpu_reader=gpu_reader,
                     tokenizer_loader=tokenizer_loader, launcher=launcher, cached_models=cached_models,
                     poll_s=poll_s, start_step=start_step, error_log=error_log)


__all__ = ["WizardApp", "make_app", "FIRST_PAINT_ENV", "WIZARD_BINDINGS"]
