"""Regenerate screenshots/*.svg from the real app on the bundled demo (README pictures).

Run from the repository root:  python screenshots/make_screenshots.py
Hardware is the fixed two-GPU workstation from tuiwiz.tui.fixtures (and the no-NVML case), so
the pictures do not depend on the machine that makes them. Counts use the offline heuristic
tokenizer, as on a machine without the model's tokenizer, except the `dataset-exact*` shots:
they count with Qwen2.5's own tokenizer from ../shared/data (skipped when it is absent). The
monitor follows a fixed synthetic run (tuiwiz.tui.fixtures.demo_run).
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuiwiz.data import HeuristicTokenizer
from tuiwiz.planner import PlanRequest, tokenizer_for
from tuiwiz.preset import DatasetRef
from tuiwiz.tui import fixtures
from tuiwiz.tui.app import make_app
from tuiwiz.tui.monitor import MonitorApp, MonitorScreen

HERE = Path(__file__).resolve().parent
SIZE = (80, 24)
#: A real tokenizer, named relative to the repository (the path is shown on screen).
QWEN_TOKENIZER = Path("..") / "shared" / "data" / "tokenizers" / "qwen2.5"


@dataclass(frozen=True)
class Shot:
    name: str
    step: str
    keys: tuple[str, ...] = ()
    no_nvml: bool = False
    tab: str | None = None
    tokenizer: Path | None = None


SHOTS = (
    Shot("hardware", "hardware"),
    Shot("hardware-no-nvml", "hardware", no_nvml=True),
    Shot("model", "model"),
    Shot("dataset", "dataset"),
    Shot("dataset-stats", "dataset", tab="tab-stats"),
    Shot("dataset-preview", "dataset", tab="tab-preview"),
    Shot("dataset-exact", "dataset", tokenizer=QWEN_TOKENIZER),
    Shot("dataset-exact-preview", "dataset", tab="tab-preview", tokenizer=QWEN_TOKENIZER),
    Shot("plan", "plan"),
    Shot("plan-export", "plan", ("ctrl+s",)),
    Shot("help", "plan", ("f1",)),
)
MONITOR_SHOTS = (("monitor", "live"), ("monitor-oom", "failed"))


async def _settle(pilot: Any) -> None:
    for _ in range(2):  # profiling, then the preview it triggers
        try:
            await pilot.app.workers.wait_for_complete()
        except Exception:  # noqa: BLE001 - a failed worker is already an error panel on screen
            pass
        await pilot.pause()


async def shoot(shot: Shot) -> Path:
    req = PlanRequest(dataset=DatasetRef(path="tuiwiz/demo/demo.jsonl"),
                      tokenizer=str(shot.tokenizer) if shot.tokenizer else None)
    loader = tokenizer_for if shot.tokenizer else (lambda r: HeuristicTokenizer())
    app = make_app(req, hardware=fixtures.no_nvml() if shot.no_nvml else fixtures.workstation(),
                   gpu_reader=lambda: [], tokenizer_loader=loader, cached_models=[], poll_s=0, start_step=shot.step)
    async with app.run_test(size=SIZE) as pilot:
        await _settle(pilot)
        if shot.tab:
            app.screen.query_one("#ds-tabs").active = shot.tab
            await _settle(pilot)
        for key in shot.keys:
            await pilot.press(key)
            await pilot.pause()
        return Path(app.save_screenshot(f"{shot.name}.svg", path=str(HERE)))


async def shoot_monitor(name: str, kind: fixtures.RunKind) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        paths, lock = fixtures.demo_run(Path(tmp), kind)
        try:
            app = MonitorApp(paths, gpu_reader=lambda: [], poll_s=0.02)
            async with app.run_test(size=SIZE) as pilot:
                events = len(fixtures.demo_run_events(kind))
                deadline = time.monotonic() + 10
                while not (isinstance(app.screen, MonitorScreen) and app.screen.events_seen >= events
                           and app.screen.log_lines and app.screen.live is not None):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the {kind} run did not reach the screen")
                    await pilot.pause(0.05)
                app.screen.redraw()
                await pilot.pause()
                return Path(app.save_screenshot(f"{name}.svg", path=str(HERE)))
        finally:
            if lock is not None:
                os.close(lock)


def main() -> None:
    os.chdir(HERE.parent)  # the dataset path is shown relative to the repository
    for shot in SHOTS:
        if shot.tokenizer is not None and not shot.tokenizer.is_dir():
            print(f"skipped {shot.name}: no {shot.tokenizer}", file=sys.stderr)
            continue
        print(asyncio.run(shoot(shot)).relative_to(HERE.parent))
    for name, kind in MONITOR_SHOTS:
        print(asyncio.run(shoot_monitor(name, kind)).relative_to(HERE.parent))


if __name__ == "__main__":
    main()
