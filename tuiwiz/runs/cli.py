"""`tuiwiz launch | runs | attach | stop | resume`: the run-management subcommands.

The lead's `tuiwiz.cli` dispatches these names to `run_command`. Nothing here imports
torch; `attach` imports Textual only when it opens the monitor. Every line printed fits
80 columns (a path longer than that is printed alone on its line, never broken); a user
error is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import NoReturn

from tuiwiz.errors import CannotWrite, UserError
from tuiwiz.runs.control import stop_run
from tuiwiz.runs.launcher import LaunchedRun, absolute, launch, resume
from tuiwiz.runs.paths import RunPaths, default_runs_root, list_run_dirs, resolve_run
from tuiwiz.runs.events import EventFollower, MemoryEvent, ReplanEvent, iter_events, read_events
from tuiwiz.runs.preflight import ModelNotLocal
from tuiwiz.runs.replan import MAX_AUTO_REPLANS, relaunch_with_next_plan, wait_for_probe, wait_until_exited
from tuiwiz.runs.status import RunSummary, summarize
from tuiwiz.runs.view import memory_summary

COMMANDS = ("launch", "runs", "attach", "stop", "resume")
WIDTH = 80


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _runs_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="where runs live (default: $XDG_DATA_HOME/tuiwiz/runs or ~/.local/share/tuiwiz/runs)")


def _start_args(p: argparse.ArgumentParser, *, resuming: bool) -> None:
    again = " (default: as it was launched)" if resuming else ""
    p.add_argument("--cpu", action="store_true", default=None if resuming else False,
                   help="train on the CPU, GPUs hidden: for tiny test models" + again)
    p.add_argument("--online", action="store_true", default=None if resuming else False,
                   help="let the worker download the model from the Hugging Face Hub (default: offline)" + again)


def _parser(name: str) -> argparse.ArgumentParser:
    p = _Parser(prog=f"tuiwiz {name}")
    if name == "launch":
        p.description = "Check, then start a training run detached from this terminal and print its id."
        p.add_argument("preset", type=Path, help="preset YAML written by the wizard or `tuiwiz --auto`")
        p.add_argument("--run-id", default=None, help="name the run directory (default: NAME-DATE-TIME)")
        p.add_argument("--merge", action="store_true", help="also save a merged model (non-quantized bases only)")
        p.add_argument("--auto-replan", action="store_true",
                       help="wait until the first (worst-case) step has passed; if it runs out of GPU memory, "
                            f"relaunch with the next plan (same effective batch), at most {MAX_AUTO_REPLANS} times")
        _start_args(p, resuming=False)
    elif name == "runs":
        p.description = "List runs with state, progress, loss and age (and why a failed run failed)."
        p.add_argument("--json", action="store_true", help="machine-readable output")
    elif name == "attach":
        p.description = "Open the monitor on a live or finished run (d detaches, the run goes on)."
        p.add_argument("run", help="run id, unique prefix, directory, or 'last'")
    elif name == "stop":
        p.description = "Stop a run gracefully (checkpoint + adapter); a second stop kills it."
        p.add_argument("run", help="run id, unique prefix, directory, or 'last'")
        p.add_argument("--force", action="store_true", help="SIGKILL now, without saving")
        p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait for the worker to exit")
        p.add_argument("--kill-after", type=float, default=None, metavar="SECONDS",
                       help="SIGKILL if the graceful stop takes longer than this")
    elif name == "resume":
        p.description = "Continue a stopped or failed run from its last checkpoint (the step count continues)."
        p.add_argument("run", help="run id, unique prefix, directory, or 'last'")
        _start_args(p, resuming=True)
    _runs_dir_arg(p)
    return p


# ------------------------------------------------------------------ output


def fit(text: str, width: int = WIDTH, indent: str = "") -> str:
    """`text` wrapped to `width` at spaces only: a run id or a path is never cut in two."""
    return textwrap.fill(text, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def clip(text: str, width: int = WIDTH) -> str:
    """One line of at most `width` columns (runs of whitespace, newlines too, become one space)."""
    indent = text[: len(text) - len(text.lstrip(" "))]
    text = indent + " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _fmt_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def format_runs_table(rows: list[RunSummary], memory: dict[str, MemoryEvent] | None = None) -> str:
    """A table that fits 80 columns: id, state, progress, loss, age; below a row, a failed run's reason
    and the run's latest `memory` event (measured against the plan at the same level)."""
    if not rows:
        return "no runs yet; start one with `tuiwiz launch PRESET`."
    lines = [f"{'RUN':<36} {'STATE':<9} {'PROGRESS':>15} {'LOSS':>7} {'AGE':>6}"]
    for r in rows:
        prog = f"{r.step}/{r.total_steps} {r.progress * 100:3.0f}%" if r.total_steps else f"{r.step}"
        loss = f"{r.loss:.3f}" if r.loss is not None else "-"
        rid = r.run_id if len(r.run_id) <= 36 else r.run_id[:35] + "~"
        lines.append(f"{rid:<36} {r.state:<9} {prog:>15} {loss:>7} {_fmt_age(r.age_s):>6}")
        if r.state == "failed" and r.message:
            lines.append(clip(f"  {r.message}"))
        if memory and r.run_id in memory:
            head, body = memory_summary(memory[r.run_id])
            if memory[r.run_id].measured.allocated_gib is None:
                lines.append(clip(f"  memory at {head}: {body}"))
            else:
                lines += [clip(f"  memory at {head}, measured/plan:"), clip(f"    {body}")]
    return "\n".join(lines)


def start_lines(run: LaunchedRun, what: str) -> list[str]:
    """What `launch` and `resume` say on stderr after the run id: where it is, how to follow and stop it."""
    lines = [fit(f"warning: {w}", indent="  ") for w in run.warnings]
    where = ", on the CPU" if run.cpu else ""
    lines += [fit(f"{what} {run.run_id} (pid {run.pid}{where}); its files:"),
              f"  {run.paths.root}",
              "follow it:", f"  tuiwiz attach {run.run_id}",
              "stop it:", f"  tuiwiz stop {run.run_id}"]
    return lines


def _print_started(run: LaunchedRun, what: str) -> None:
    print(run.run_id)  # stdout holds the id alone, for scripts: RUN=$(tuiwiz launch p.yaml)
    print("\n".join(start_lines(run, what)), file=sys.stderr)


_NOT_RUNNING = {"finished": "has finished", "failed": "has failed", "stopped": "is already stopped"}


def _stop_message(paths: RunPaths, result: str, state: str) -> str:
    rid = paths.run_id
    return fit({
        "not-running": f"{rid} {_NOT_RUNNING.get(state, f'is not running ({state})')}; nothing to stop.",
        "requested": f"{rid}: stop requested; it saves a checkpoint and exits (stop again to kill).",
        "stopped": f"{rid}: stopped.",
        "killed": f"{rid}: killed without saving.",
    }[result])


def error_line(name: str, err: UserError) -> str:
    """The one line a user error prints: the core's message, then the flag that fixes it, if any."""
    hint = ""
    if isinstance(err, ModelNotLocal):
        hint = f" Or `tuiwiz {name} --online` lets the worker download it."
    elif err.field == "gpus":
        hint = f" `tuiwiz {name} --cpu` trains on the CPU instead (tiny test models only)."
    elif isinstance(err, CannotWrite) or err.field == "runs_dir":
        hint = " --runs-dir DIR keeps runs elsewhere."
    elif err.field == "run":
        hint = " --runs-dir DIR if they live elsewhere."
    return f"tuiwiz {name}: {err}{hint}"


# ------------------------------------------------------------------ commands


def _root(args: argparse.Namespace) -> Path:
    """The runs folder, absolute: the worker runs in its run directory, not here."""
    return absolute(args.runs_dir or default_runs_root())


def _dispatch(name: str, args: argparse.Namespace) -> int:
    root = _root(args)
    if name == "launch":
        run = launch(args.preset, root, run_id=args.run_id, merge=args.merge, online=args.online, cpu=args.cpu)
        _print_started(run, "started")
        return _auto_replan(run) if args.auto_replan else 0
    if name == "runs":
        dirs = list_run_dirs(root)
        rows = sorted((summarize(RunPaths(d)) for d in dirs), key=lambda r: r.started_at or 0.0)
        memory = {d.name: ev for d in dirs if (ev := last_memory(RunPaths(d))) is not None}
        if args.json:
            print(json.dumps([{**r.model_dump(), "progress": r.progress,
                               "memory": memory[r.run_id].model_dump(mode="json") if r.run_id in memory else None}
                              for r in rows], indent=1))
        else:
            print(format_runs_table(rows, memory))
        return 0
    paths = resolve_run(args.run, root)
    if name == "stop":
        state = summarize(paths).state
        result = "not-running" if state != "running" else stop_run(
            paths, force=args.force, wait=args.wait, kill_after=args.kill_after)
        print(_stop_message(paths, result, summarize(paths).state if result == "not-running" else state))
        return 0
    if name == "resume":
        run = resume(paths, online=args.online, cpu=args.cpu)
        _print_started(run, "resumed")
        return 0
    if name == "attach":
        from tuiwiz.tui.monitor import MonitorApp  # Textual only here

        MonitorApp(paths).run()
        return 0
    raise UserError(f"unknown command {name!r}; one of {', '.join(COMMANDS)}.")


def last_memory(paths: RunPaths) -> MemoryEvent | None:
    """The run's latest `memory` event (the probe's, or the end's)."""
    out = None
    for ev in iter_events(paths.events):
        if isinstance(ev, MemoryEvent):
            out = ev
    return out


def _say(text: str) -> None:
    print(fit(text, indent="  "), file=sys.stderr, flush=True)


def _changes(ev: ReplanEvent) -> str:
    return ", ".join(f"{k} {a}->{b}" for k, (a, b) in ev.changed.items()) or "no knob changed"


def _auto_replan(run: LaunchedRun, poll_s: float = 0.5) -> int:
    """`launch --auto-replan`: follow the run until its first step passes; after an OOM there,
    relaunch with the next plan (at most MAX_AUTO_REPLANS times). 0 once a step has passed (the
    run goes on detached) or the run finished; 1 when it failed or stopped first."""
    paths, relaunches = run.paths, 0
    follower = EventFollower(paths.events)
    _say(f"auto re-plan: waiting for the first step of {run.run_id} (the longest samples)...")
    try:
        while True:
            result = wait_for_probe(paths, follower, poll_s=poll_s)
            if result.outcome == "passed" and result.memory is not None:
                head, body = memory_summary(result.memory)
                _say(f"the first step fits: {head}: {body}. The run goes on.")
                return 0
            if result.outcome == "oom" and result.error is not None:
                over = f" (over by {result.error.overshoot_gib:.2f} GiB)" if result.error.overshoot_gib else ""
                if relaunches >= MAX_AUTO_REPLANS:
                    _say(f"out of memory at the first step again{over} after {relaunches} re-plans; not relaunching. "
                         f"`tuiwiz attach {run.run_id}` shows the next plan.")
                    return 1
                if not wait_until_exited(paths):
                    _say(f"the failed worker of {run.run_id} does not exit; not relaunching.")
                    return 1
                relaunch_with_next_plan(paths, auto=True)
                relaunches += 1
                replan = [e for e in read_events(paths.events) if isinstance(e, ReplanEvent)][-1]
                _say(f"out of memory at the first step{over}: relaunched as attempt {replan.attempt} with "
                     f"{_changes(replan)} (same effective batch).")
                continue
            _say({"finished": f"{run.run_id} finished.", "stopped": f"{run.run_id} was stopped.",
                  "stale": f"the worker of {run.run_id} is gone without a last event; see its train.log.",
                  }.get(result.outcome, f"{run.run_id} failed: {result.error.message if result.error else '?'}"))
            return 0 if result.outcome == "finished" else 1
    except KeyboardInterrupt:
        _say(f"stopped waiting; the run goes on (`tuiwiz attach {run.run_id}`), without automatic re-plans.")
        return 130


def run_command(name: str, argv: list[str]) -> int:
    """Run `tuiwiz NAME ARGV...`; user mistakes print one line on stderr and return 2."""
    if name not in COMMANDS:
        print(f"tuiwiz: unknown command {name!r}; one of {', '.join(COMMANDS)}.", file=sys.stderr)
        return 2
    args = _parser(name).parse_args(argv)
    try:
        return _dispatch(name, args)
    except UserError as err:
        print(error_line(name, err), file=sys.stderr)
        return err.exit_code
