"""Pilot tests of the wizard: keyboard navigation, live re-estimation, export, no-NVML, errors.

Hardware is injected (tuiwiz.tui.fixtures) and token counts use the heuristic tokenizer, so
every run sees the same numbers.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("textual")

from rich.console import Console  # noqa: E402
from textual.worker import WorkerCancelled, WorkerFailed  # noqa: E402
from textual.widgets import DataTable, Input, Select, Static  # noqa: E402

from tuiwiz.cli import build_parser, request_from_args  # noqa: E402
from tuiwiz.data import HeuristicTokenizer  # noqa: E402
from tuiwiz.data_ref import dataset_ref_from_args  # noqa: E402
from tuiwiz.planner import PlanRequest  # noqa: E402
from tuiwiz.preset import load_preset  # noqa: E402
from tuiwiz.runs.paths import RunPaths  # noqa: E402
from tuiwiz.tui import fixtures  # noqa: E402
from tuiwiz.tui.app import make_app  # noqa: E402
from tuiwiz.tui.screens.help import HelpScreen  # noqa: E402
from tuiwiz.tui.screens.modals import ConfirmScreen, ErrorScreen, ExportScreen, TextScreen  # noqa: E402
from waiting import wait_for  # noqa: E402

SIZE = (80, 24)
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def demo_request(**kw) -> PlanRequest:
    return PlanRequest(dataset=dataset_ref_from_args(None, None, None), **kw)


def build(request: PlanRequest | None = None, hardware=None, **kw):
    kw.setdefault("tokenizer_loader", lambda req: HeuristicTokenizer())
    kw.setdefault("cached_models", [])
    kw.setdefault("poll_s", 0)
    return make_app(request or demo_request(), hardware=hardware or fixtures.workstation(), **kw)


async def settle(pilot) -> None:
    try:
        await pilot.app.workers.wait_for_complete()
    except (WorkerFailed, WorkerCancelled):
        pass  # the app's own handler turned it into an error panel or a status line
    await pilot.pause()


def plain(widget: Static, width: int = 120) -> str:
    """What a Static shows, as plain text."""
    console = Console(width=width, file=io.StringIO(), record=True)
    console.print(widget.content)
    return console.export_text()


async def test_ctrl_n_and_ctrl_p_walk_all_four_steps_and_wrap():
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        seen = [app.current_mode]
        for _ in range(4):
            await pilot.press("ctrl+n")
            seen.append(app.current_mode)
        assert seen == ["hardware", "model", "dataset", "plan", "hardware"]
        await pilot.press("ctrl+p")
        assert app.current_mode == "plan"


async def test_number_keys_jump_to_a_step_when_no_text_field_has_focus():
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("3")
        assert app.current_mode == "dataset"
        app.set_focus(None)
        await pilot.press("1")
        assert app.current_mode == "hardware"


async def test_help_lists_the_current_steps_bindings():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("f1")
        assert isinstance(app.screen, HelpScreen)
        text = plain(app.screen.query_one("#help-table", Static))
        assert "^s" in text and "export" in text and "^n" in text and "F2-F5 / 1-4" in text
        assert "never types" in plain(app.screen.query_one("#key-rule", Static))
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)


async def test_typing_a_cutoff_re_estimates_and_holds_it():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        before = app.state.plan.advice.estimate.peak_bytes
        cutoff = app.screen.query_one("#k-cutoff_len", Input)
        cutoff.focus()
        cutoff.value = ""
        await pilot.press(*"8192")
        await pilot.pause()
        plan = app.state.plan
        assert plan.knobs.cutoff_len == 8192
        assert "cutoff_len" in plan.request.fixed
        assert plan.advice.estimate.peak_bytes != before
        assert plan.advice.estimate.term("activations").bytes > 0
        # the advisor re-chose the free knobs for the longer sequences
        assert plan.knobs.micro_batch_size * plan.knobs.grad_accum == 16


async def test_an_invalid_knob_shows_a_field_error_and_keeps_the_last_plan():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        rank = app.screen.query_one("#k-lora_rank", Input)
        rank.focus()
        rank.value = ""
        await pilot.press(*"2000")  # 2, 20 and 200 are valid ranks; 2000 is over the 1024 limit
        await pilot.pause()
        error = plain(app.screen.query_one("#knob-error", Static))
        assert "LoRA rank" in error and "2000" in error and "lora_rank" not in error  # named by its label
        assert app.state.plan.knobs.lora_rank == 200


async def test_choosing_checkpointing_off_from_the_keyboard_changes_the_estimate():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.state.plan.knobs.grad_checkpointing is True
        before = app.state.plan.advice.estimate.term("activations").bytes
        app.screen.query_one("#k-grad_checkpointing", Select).focus()
        await pilot.press("enter", "down", "enter")
        await pilot.pause()
        plan = app.state.plan
        assert plan.knobs.grad_checkpointing is False
        assert plan.advice.estimate.term("activations").bytes > before


async def test_choices_survive_moving_between_steps():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.state.set_knob("lora_rank", 64)
        app.changed()
        await pilot.press("ctrl+n", "ctrl+n", "ctrl+n")
        assert app.current_mode == "dataset"
        await pilot.press("ctrl+n")
        await pilot.pause()
        assert app.screen.query_one("#k-lora_rank", Input).value == "64"
        assert app.state.plan.knobs.lora_rank == 64


async def test_export_writes_a_preset_that_loads_back_and_asks_before_overwriting(tmp_path: Path):
    app = build(start_step="plan")
    target = tmp_path / "plan.yaml"
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.state.set_knob("cutoff_len", 1024)
        app.changed()
        await pilot.press("ctrl+s")
        assert isinstance(app.screen, ExportScreen)
        app.screen.query_one("#export-path", Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        loaded = load_preset(target)
        assert loaded.training.cutoff_len == 1024
        assert loaded.training == app.state.plan.knobs
        assert loaded.dataset is not None and loaded.dataset.path.endswith("demo.jsonl")

        first = target.read_text()
        app.state.set_knob("lora_rank", 8)
        app.changed()
        await pilot.press("ctrl+s")
        app.screen.query_one("#export-path", Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert target.read_text() == first
        await pilot.press("ctrl+s")
        app.screen.query_one("#export-path", Input).value = str(target)
        await pilot.press("enter")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert load_preset(target).training.lora_rank == 8


async def test_without_nvml_the_hardware_step_says_why_and_plans_for_a_chosen_card():
    app = build(hardware=fixtures.no_nvml())
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        note = plain(app.screen.query_one("#hw-note", Static))
        assert "No NVML" in note and "NVIDIA driver" in note
        budget_4090 = app.state.plan.advice.budget_bytes
        await pilot.press("g")  # opens the card picker
        select = app.screen.query_one("#card", Select)
        options = [v for _, v in select._options]
        steps = options.index("A100 80GB") - options.index(select.value)
        await pilot.press(*(["down"] * steps), "enter")
        await pilot.pause()
        assert app.state.plan.gpus[0].name == "A100 80GB"
        assert app.state.plan.advice.budget_bytes > 3 * budget_4090
        assert "--gpu 'A100 80GB'" in app.state.auto_command()


async def test_space_on_a_gpu_row_adds_it_to_the_plan():
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert len(app.state.plan.gpus) == 1
        table = app.screen.query_one("#gpus", DataTable)
        table.focus()
        await pilot.press("down", "space")
        await pilot.pause()
        assert [g.index for g in app.state.plan.gpus] == [0, 1]
        assert app.state.plan.advice.gpus == 2


async def test_a_gpu_poll_updates_free_memory_and_the_budget():
    busy = [g.__class__(**{**g.__dict__, "used_gib": 12.0, "free_gib": g.total_gib - 12.0})
            for g in fixtures.WORKSTATION_GPUS]
    app = build(gpu_reader=lambda: busy)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        before = app.state.plan.advice.budget_bytes
        app.poll_gpus()
        await settle(pilot)
        assert app.state.plan.advice.budget_bytes < before
        assert "12.0/24G" in str(app.screen.query_one("#gpus", DataTable).get_row_at(0)[3])


async def test_an_unknown_model_ends_in_the_error_panel_not_a_crash():
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "slash")  # arriving focuses the list; / goes to the text field
        inp = app.screen.query_one("#model-input", Input)
        assert app.focused is inp
        inp.value = "nobody/no-such-model-9000"
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)
        assert "no-such-model-9000" in app.screen.message
        await pilot.press("escape")
        assert app.state.spec.id == "Qwen/Qwen2.5-7B-Instruct"


async def test_picking_a_catalog_model_shows_its_architecture():
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("2", "slash")  # arriving focuses the list; / goes to the text field
        inp = app.screen.query_one("#model-input", Input)
        assert app.focused is inp
        inp.value = "meta-llama/Llama-3.2-1B"
        await pilot.press("enter")
        await settle(pilot)
        facts = plain(app.screen.query_one("#model-facts", Static))
        assert app.state.spec.layers == 16
        assert "16 x hidden 2048" in facts


async def test_the_dataset_step_profiles_the_demo_and_marks_counts_approximate():
    app = build(start_step="dataset")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        prof = app.state.profile
        assert prof is not None and prof.samples > 0
        status = plain(app.screen.query_one("#ds-status", Static))
        assert "APPROXIMATE" in status
        hist = plain(app.screen.query_one("#ds-hist", Static))
        assert "p95" in hist and "p99" in hist and f"cutoff {app.state.plan.knobs.cutoff_len}" in hist
        # the profile's suggestion became the plan's cutoff, as with --auto
        assert app.state.plan.knobs.cutoff_len == prof.suggested_cutoff


async def test_the_preview_highlights_only_assistant_tokens_as_trained():
    app = build(start_step="dataset")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await settle(pilot)
        pv = app.state.preview
        assert pv is not None and pv.index == 0
        trained = "".join(t for t, on in pv.pieces if on)
        masked = "".join(t for t, on in pv.pieces if not on)
        assert trained and masked
        assert "Can you explain" in masked  # the demo's first user turn is never trained


async def test_escape_cancels_profiling_and_says_so():
    release = threading.Event()

    def slow_tokenizer(req):
        release.wait(5)
        return HeuristicTokenizer()

    app = build(start_step="dataset", tokenizer_loader=slow_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.state.profile_status.busy
        await pilot.press("escape")
        release.set()
        await settle(pilot)
        assert not app.state.profile_status.busy
        assert app.state.profile_status.state == "cancelled"
        assert app.state.profile is None
        assert not isinstance(app.screen, ErrorScreen)


def _parsed(text: str) -> PlanRequest:
    """The shown command as a shell reads it: continuations joined, then the CLI's own parser."""
    argv = shlex.split(text.replace(" \\\n", " "))
    assert argv[:2] == ["tuiwiz", "--auto"]
    return request_from_args(build_parser().parse_args(argv[1:]))


async def test_show_command_round_trips_through_the_cli_parser():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.state.set_knob("lora_rank", 32)
        app.state.set_knob("target_modules", ["q_proj", "v_proj"])
        app.state.set_knob("learning_rate", 1e-4)
        app.state.set_knob("grad_checkpointing", False)
        app.state.set_knob("lora_dropout", 0.0)
        app.state.set_effective_batch(32)
        app.changed()
        await pilot.press("ctrl+g")
        assert isinstance(app.screen, TextScreen)
        text = app.screen.body
        state_req = app.state.request
    lines = text.splitlines()
    # one flag per line, every line but the last continued, so it pastes into a shell as it is
    assert all(line.endswith(" \\") for line in lines[:-1]) and not lines[-1].endswith("\\")
    assert all(len(shlex.split(line.rstrip(" \\"))) <= 2 for line in lines[1:])
    req = _parsed(text)
    assert req.knobs == state_req.knobs
    assert req.fixed == state_req.fixed
    assert req.effective_batch == 32
    assert req.dataset == state_req.dataset and req.model == state_req.model
    assert req.gpu_indices == state_req.gpu_indices and req.gpu == state_req.gpu


async def test_show_command_names_the_catalog_card_without_nvml():
    app = build(hardware=fixtures.no_nvml(), start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.state.use_card("A100 80GB")
        req = _parsed(app.state.auto_command())
    assert req.gpu == "A100 80GB" and req.knobs == app.state.request.knobs


async def test_plus_and_minus_plan_for_more_catalog_cards_and_the_command_says_so():
    app = build(hardware=fixtures.no_nvml(), start_step="hardware")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.set_focus(None)
        await pilot.press("plus", "plus")
        await wait_for(pilot, lambda: app.state.plan is not None and len(app.state.plan.gpus) == 3, "three cards")
        await pilot.press("minus")
        await wait_for(pilot, lambda: app.state.plan is not None and len(app.state.plan.gpus) == 2, "two cards")
        rows = app.screen.query_one("#gpus").row_count
        req, card = _parsed(app.state.auto_command()), app.state.catalog_card
    assert rows == 2
    assert req.gpu_count == 2 and req.gpu == card  # the command plans the same two cards


async def test_machines_are_planned_with_angle_brackets_and_exported_as_a_slurm_job(tmp_path: Path):
    """> and < plan for more or fewer machines of the catalog card's shape; the export dialog writes
    the same SLURM job `tuiwiz --auto ... --export slurm` writes, and bash accepts it."""
    import subprocess

    from tuiwiz.exports import plan_export_text

    app = build(hardware=fixtures.no_nvml(), start_step="hardware")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        app.set_focus(None)
        await pilot.press("plus", "greater_than_sign", "greater_than_sign")
        await wait_for(pilot, lambda: app.state.plan is not None and app.state.plan.world_size == 6, "3 x 2 GPUs")
        await pilot.press("less_than_sign")
        await wait_for(pilot, lambda: app.state.plan is not None and app.state.plan.world_size == 4, "2 x 2 GPUs")
        host = str(app.screen.query_one("#host", Static).render())
        req = _parsed(app.state.auto_command())
        await pilot.press("f5", "ctrl+s")
        assert isinstance(app.screen, ExportScreen)
        app.screen.query_one("#export-format", Select).value = "slurm"
        field = app.screen.query_one("#export-path", Input)
        field.value = str(tmp_path / "job.sbatch")
        await pilot.press("enter")
        await wait_for(pilot, lambda: (tmp_path / "job.sbatch").exists(), "the sbatch script")
        expected = plan_export_text(app.state.plan.to_preset(), "slurm")
    assert "2 machines like this: 4 GPUs in all" in host
    assert (req.nodes, req.gpu_count) == (2, 2)
    script = (tmp_path / "job.sbatch").read_text()
    assert script == expected and "#SBATCH --nodes=2" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0


@dataclass(frozen=True)
class _FakeRun:
    run_id: str
    paths: RunPaths


async def test_launch_asks_first_then_opens_the_monitor(tmp_path: Path):
    from tuiwiz.tui.monitor import MonitorScreen

    launched = []

    def launcher(preset, *, online=False):
        launched.append(preset)
        return _FakeRun("demo-run", RunPaths(tmp_path / "demo-run"))

    app = build(start_step="plan", launcher=launcher)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+l")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert launched == []
        await pilot.press("ctrl+l", "y")
        await pilot.pause()
        await pilot.pause()
        assert len(launched) == 1 and launched[0].training == app.state.plan.knobs
        assert isinstance(app.screen, MonitorScreen)


async def test_launch_of_a_model_not_on_this_machine_asks_to_download_it(tmp_path: Path):
    """Pre-flight's ModelNotLocal becomes a question; yes launches again with the worker online."""
    from tuiwiz.runs.preflight import ModelNotLocal
    from tuiwiz.tui.monitor import MonitorScreen

    calls: list[bool] = []

    def launcher(preset, *, online=False):
        calls.append(online)
        if not online:
            raise ModelNotLocal("model org/big: not in the HF cache.", model_id="org/big")
        return _FakeRun("demo-run", RunPaths(tmp_path / "demo-run"))

    app = build(start_step="plan", launcher=launcher)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+l", "y")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmScreen) and calls == [False],
                       "the download question")
        assert "org/big" in str(app.screen.query_one("#question", Static).render())
        await pilot.press("y")
        await wait_for(pilot, lambda: isinstance(app.screen, MonitorScreen), "the monitor")
        assert calls == [False, True]


async def test_a_refused_launch_shows_why_and_stays_on_the_plan(tmp_path: Path):
    from tuiwiz.errors import UserError

    def launcher(preset, *, online=False):
        raise UserError("runs dir /nowhere: not writable.", field="runs_dir")

    app = build(start_step="plan", launcher=launcher)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("ctrl+l", "y")
        await wait_for(pilot, lambda: isinstance(app.screen, ErrorScreen), "the error panel")
        assert "not writable" in app.screen.message and app.screen.title_text == "Launch failed"
        await pilot.press("escape")
        assert type(app.screen).__name__ == "PlanScreen"


# ---- issue 16: one key rule, arrival focus, provisional verdict, tokenizer field, key bar --------

STEP_KEYS = {"hardware": "f2", "model": "f3", "dataset": "f4", "plan": "f5"}
NAV_KEYS = ("ctrl+n", "ctrl+p", "f1", "f2", "f3", "f4", "f5")


async def _focus_field(pilot, step: str, field_id: str) -> Input:
    await pilot.press(STEP_KEYS[step])
    if field_id == "preview-index":
        pilot.app.screen.query_one("#ds-tabs").active = "tab-preview"
        await pilot.pause()
    field = pilot.app.screen.query_one(f"#{field_id}", Input)
    field.focus()
    await pilot.pause()
    assert pilot.app.focused is field
    return field


async def test_a_key_that_navigates_never_types_in_any_text_field(full_lane: bool):
    """Every navigation key in a text field of every step; under `pytest --full`, in every text field."""
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        fields = []
        for step, key in STEP_KEYS.items():
            await pilot.press(key)
            assert app.current_mode == step  # F2-F5 reach every step
            fields += [(step, inp.id) for inp in app.screen.query(Input)]
        assert len(fields) >= 12  # file, tokenizer, sample #, model id and every number knob
        if not full_lane:  # the first field of each step (the others share its widget class)
            fields = list({step: (step, fid) for step, fid in reversed(fields)}.values())
        steps = list(STEP_KEYS)
        for step, field_id in fields:
            here = steps.index(step)
            goes_to = {"ctrl+n": steps[(here + 1) % 4], "ctrl+p": steps[here - 1],
                       **{key: s for s, key in STEP_KEYS.items()}}
            for key in NAV_KEYS:
                field = await _focus_field(pilot, step, field_id)
                before, request = field.value, app.state.request
                await pilot.press(key)
                if key == "f1":
                    assert isinstance(app.screen, HelpScreen), (field_id, key)
                    await pilot.press("escape")
                else:
                    assert app.current_mode == goes_to[key], (field_id, key)  # it navigated...
                assert field.value == before, (field_id, key)  # ...and typed nothing
                assert app.state.request == request, (field_id, key)


async def test_a_key_that_types_never_navigates():
    app = build(start_step="model")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        field = await _focus_field(pilot, "model", "model-input")
        field.value = ""
        await pilot.press("1", "2", "3", "4", "question_mark", "q")
        assert field.value == "1234?q"
        assert app.current_mode == "model" and app.is_running and not isinstance(app.screen, HelpScreen)
        app.set_focus(None)  # outside a text field the same plain keys navigate
        await pilot.press("3")
        assert app.current_mode == "dataset"


async def test_arriving_on_a_step_leaves_the_cursor_out_of_text_fields():
    app = build()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        for key in STEP_KEYS.values():
            await pilot.press(key)
            assert app.focused is not None and not isinstance(app.focused, Input), app.current_mode
    # with no dataset yet, the Dataset step has nothing else to do: the file field gets the cursor
    app = build(PlanRequest(), start_step="dataset")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.focused is app.screen.query_one("#ds-path", Input)


async def test_the_verdict_says_estimating_until_the_profile_is_in():
    release = threading.Event()

    def slow_tokenizer(req):
        release.wait(10)
        return HeuristicTokenizer()

    app = build(start_step="plan", tokenizer_loader=slow_tokenizer)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.plan is not None, "a first plan")
        await pilot.pause()
        bar = plain(app.screen.query_one("#stepbar", Static))
        verdict = plain(app.screen.query_one("#verdict", Static))
        assert app.state.provisional
        assert "estimating" in bar and "fits" not in bar and "GiB" not in verdict and "ESTIMATING" in verdict
        assert app.screen.query_one("#k-cutoff_len", Input).value == ""  # no cutoff that will silently change
        release.set()
        await settle(pilot)
        assert not app.state.provisional
        bar = plain(app.screen.query_one("#stepbar", Static))
        peak = app.state.plan.advice.estimate.peak_gib
        assert f"fits {peak:.1f}/" in bar
        assert app.screen.query_one("#k-cutoff_len", Input).value == str(app.state.profile.suggested_cutoff)


async def test_a_cutoff_the_user_holds_is_not_provisional():
    release = threading.Event()
    app = build(start_step="plan", tokenizer_loader=lambda req: release.wait(10) and HeuristicTokenizer())
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.state.plan is not None, "a first plan")
        app.state.set_knob("cutoff_len", 1024)
        app.changed()
        await pilot.pause()
        assert not app.state.provisional
        assert "FITS" in plain(app.screen.query_one("#verdict", Static))
        release.set()
        await settle(pilot)


async def test_approximate_counts_name_the_tui_field_that_fixes_them_not_a_flag():
    app = build(start_step="plan")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.state.profile.approximate
        reasons = plain(app.screen.query_one("#reasons", Static), width=200)
        assert "approximate" in reasons and "Dataset step (F4)" in reasons and "Tokenizer" in reasons
        assert "--" not in reasons  # no CLI flag in the TUI
        await pilot.press("f4")
        status = plain(app.screen.query_one("#ds-status", Static), width=200)
        assert "APPROXIMATE" in status and "heuristic" in status and "not found" in status


async def test_the_tokenizer_field_counts_exactly_with_a_real_tokenizer(shared_data: Path):
    from tuiwiz.planner import tokenizer_for

    folder = shared_data / "tokenizers" / "qwen2.5"
    template = json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]
    assert "<|im_start|>" in template  # the model's own chat template, read independently
    app = build(start_step="dataset", tokenizer_loader=tokenizer_for)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        field = app.screen.query_one("#ds-tokenizer", Input)
        field.focus()
        field.value = str(folder)
        await pilot.press("enter")
        await wait_for(pilot, lambda: app.state.profile is not None and app.state.preview is not None,
                       "the exact profile and its preview")
        await pilot.pause()
        status = plain(app.screen.query_one("#ds-status", Static), width=200)
        assert app.state.profile_status.state == "done" and not app.state.profile.approximate
        assert str(folder) in status and "exact" in status and "APPROXIMATE" not in status
        preview = "".join(t for t, _ in app.state.preview.pieces)
        assert "<|im_start|>assistant" in preview and app.state.preview.tokenizer == str(folder)
        assert not any("approximate" in w for w in app.state.plan.warnings)
        assert _parsed(app.state.auto_command()).tokenizer == str(folder)


async def test_a_folder_without_tokenizer_json_is_refused_before_profiling(tmp_path: Path):
    app = build(start_step="dataset")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        generation = app.state.profile_generation
        field = app.screen.query_one("#ds-tokenizer", Input)
        field.focus()
        field.value = str(tmp_path)
        await pilot.press("enter")
        assert isinstance(app.screen, ErrorScreen) and "no tokenizer.json" in app.screen.message
        assert app.state.request.tokenizer is None and app.state.profile_generation == generation


async def test_an_unexpected_worker_failure_is_one_line_with_the_traceback_in_the_log(tmp_path: Path):
    def broken(req):
        raise RuntimeError("boom\nsecond line of the message")

    log = tmp_path / "tui.log"
    app = build(start_step="dataset", tokenizer_loader=broken, error_log=log)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorScreen)
        message = app.screen.message
        assert message.splitlines()[0] == "RuntimeError: boom" and str(log) in message
        assert "second line" not in message
        assert "Traceback" in log.read_text() and "second line of the message" in log.read_text()
        assert app.state.profile_status.state == "failed"
        await pilot.press("escape")
        status = app.screen.query_one("#ds-status", Static)
        assert "failed" in plain(status) and status.content.style == "bold red"  # coloured by the typed state


@pytest.mark.parametrize("width", [80, 60])
async def test_the_key_bar_keeps_help_and_quit_and_cuts_no_entry(width: int):
    from tuiwiz.tui.keybar import KeyBar, bar_entries

    app = build()
    async with app.run_test(size=(width, 24)) as pilot:
        await settle(pilot)
        for key in STEP_KEYS.values():
            await pilot.press(key)
            await pilot.pause()
            shown = plain(app.screen.query_one(KeyBar), width=200).rstrip()
            assert len(shown) <= width
            assert shown.startswith(" F1 help  ^q quit")
            entries = [f"{k} {d}" for k, d, _ in bar_entries(app.screen)]
            visible = [e for e in entries if e in shown]
            assert visible == entries[: len(visible)]  # whole entries, most needed first
            if width == 80:
                assert visible == entries, app.current_mode  # at the design size, every key fits


def test_the_help_names_every_key_of_every_screen():
    from tuiwiz.tui.app import WIZARD_BINDINGS
    from tuiwiz.tui.keybar import key_label
    from tuiwiz.tui.monitor import MonitorApp, MonitorScreen
    from tuiwiz.tui.screens.dataset import DatasetScreen
    from tuiwiz.tui.screens.hardware import HardwareScreen
    from tuiwiz.tui.screens.help import binding_rows
    from tuiwiz.tui.screens.model import ModelScreen
    from tuiwiz.tui.screens.plan import PlanScreen
    from textual.binding import Binding

    for bindings in (WIZARD_BINDINGS, MonitorApp.BINDINGS, *(s.BINDINGS for s in (
            HardwareScreen, ModelScreen, DatasetScreen, PlanScreen, MonitorScreen))):
        rows = binding_rows(bindings, named=True)
        assert all(keys and what for keys, what in rows)
        shown = set()
        for keys, _ in rows:
            for key in keys.replace(" / ", " ").split():
                if m := re.fullmatch(r"(F?)(\d+)-F?(\d+)", key):  # a range: F2-F5, 1-4
                    shown |= {f"{m[1]}{i}" for i in range(int(m[2]), int(m[3]) + 1)}
                else:
                    shown.add(key)
        assert {key_label(b.key) for b in Binding.make_bindings(bindings)} <= shown, rows
