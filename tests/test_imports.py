"""What the planning core and the start-up path load, checked two ways.

Statically, `lint-imports` (CI runs it) enforces the contracts in pyproject.toml on every import
statement, lazy ones included; the test below proves those contracts name every module of
tuiwiz, so a new module cannot slip past them. At run time, each start-up module is imported in
a fresh interpreter and must leave Textual and the training stack out of `sys.modules`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("torch", "transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets")
#: Modules whose import must stay light: the `tuiwiz --auto` path and the runs commands.
CORE = ["tuiwiz.hardware", "tuiwiz.models", "tuiwiz.planning.memory", "tuiwiz.planning.advisor",
        "tuiwiz.preset", "tuiwiz.planner", "tuiwiz.data", "tuiwiz.cli", "tuiwiz.report", "tuiwiz.exports",
        "tuiwiz.runs.cli", "tuiwiz.runs.launcher"]
#: Front ends: they may load Textual (lazily, for the CLI), never the training stack.
FRONT_ENDS = {"tuiwiz.__main__", "tuiwiz.cli", "tuiwiz.tui"}


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_neither_textual_nor_the_training_stack(module):
    code = (f"import sys, {module}; bad = [m for m in {('textual',) + TRAINING_STACK!r} if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def _top_level_modules() -> set[str]:
    """Every module and package directly under tuiwiz/, from the file tree."""
    names = set()
    for path in (ROOT / "tuiwiz").iterdir():
        if path.suffix == ".py" and path.stem != "__init__":
            names.add(f"tuiwiz.{path.stem}")
        elif path.is_dir() and (path / "__init__.py").exists():
            names.add(f"tuiwiz.{path.name}")
    return names


def _contracts() -> dict[str, dict]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]
    by_forbidden = {}
    for c in config["contracts"]:
        if "torch" in c["forbidden_modules"]:
            by_forbidden["training"] = c
        if "textual" in c["forbidden_modules"]:
            by_forbidden["ui"] = c
    return by_forbidden


def test_the_training_stack_contract_names_every_module_but_the_worker():
    contract = _contracts()["training"]
    assert set(TRAINING_STACK) | {"tuiwiz.train"} <= set(contract["forbidden_modules"])
    assert set(contract["source_modules"]) == _top_level_modules() - {"tuiwiz.train"}


def test_the_no_ui_contract_names_every_core_module():
    contract = _contracts()["ui"]
    assert {"textual", "tuiwiz.tui", "tuiwiz.cli"} <= set(contract["forbidden_modules"])
    assert set(contract["source_modules"]) == _top_level_modules() - FRONT_ENDS - {"tuiwiz.train"}
