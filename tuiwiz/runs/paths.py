"""Where runs live and how a run directory is laid out."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from tuiwiz.errors import UserError

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def default_runs_root() -> Path:
    """$XDG_DATA_HOME/tuiwiz/runs, else ~/.local/share/tuiwiz/runs (TUIWIZ_RUNS_DIR overrides)."""
    env = os.environ.get("TUIWIZ_RUNS_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "tuiwiz" / "runs"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory (see docs/runs.md)."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def preset(self) -> Path:
        return self.root / "preset.yaml"

    @property
    def events(self) -> Path:
        return self.root / "events.jsonl"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def log(self) -> Path:
        return self.root / "train.log"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"


#: Longest name part of a generated run id: with its 16-character stamp the id is at most 64,
#: so "  tuiwiz attach ID" (the hint launch prints) fits 80 columns.
RUN_NAME_MAX = 48


def slugify(text: str, limit: int = 60) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return (slug or "run")[:limit].rstrip("-._") or "run"


def new_run_id(name: str | None, now: float | None = None) -> str:
    """`<name>-YYYYmmdd-HHMMSS`: sortable, readable in a narrow `tuiwiz runs` table."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now if now is not None else time.time()))
    return f"{slugify(name or 'run', RUN_NAME_MAX)}-{stamp}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_RE.match(run_id):
        raise UserError(f"run id {run_id!r}: use letters, digits, '.', '_' or '-' (at most 128).")
    return run_id


def list_run_dirs(runs_root: Path) -> list[Path]:
    if not runs_root.is_dir():
        return []
    return sorted(p for p in runs_root.iterdir() if p.is_dir() and (p / "preset.yaml").exists())


def resolve_run(ref: str, runs_root: Path) -> RunPaths:
    """A run by directory path, exact id, or unique id prefix (newest-first 'last' works too)."""
    p = Path(ref).expanduser()
    if (p / "preset.yaml").exists():
        return RunPaths(p.resolve())
    runs = list_run_dirs(runs_root)
    if ref == "last":
        if not runs:
            raise UserError(f"no runs under {runs_root}; start one with `tuiwiz launch PRESET`.")
        return RunPaths(max(runs, key=lambda d: d.stat().st_mtime))
    exact = [d for d in runs if d.name == ref]
    if exact:
        return RunPaths(exact[0])
    prefixed = [d for d in runs if d.name.startswith(ref)]
    if len(prefixed) == 1:
        return RunPaths(prefixed[0])
    if len(prefixed) > 1:
        names = ", ".join(d.name for d in prefixed[:4])
        raise UserError(f"run {ref!r} is ambiguous under {runs_root} ({names}...); give more of the id.")
    raise UserError(f"no run {ref!r} under {runs_root} (`tuiwiz runs` lists the runs there).", field="run")
