"""Shared test set-up: the path to ../shared/data and the full lane (`--full`).

Two lanes. The default run (the README's command) checks every behaviour, and the measured
agreements on a few representative setups and a sample of the real data. `pytest --full` adds
the rest of the sweep: every accounting setup in test_activations/test_kbit_params/
test_step_peak and every real sample in test_data_exact (tests marked `full`, and the
`full_lane` fixture; `tests/lanes.py` marks the parameters). `-m "not slow"` skips the tests
that build models or train on CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never download: not a model, not a tokenizer, and not the CPU kernels bitsandbytes and
# transformers would fetch through the `kernels` package when the Hub is reachable. Set before any
# test module imports huggingface_hub, which reads these once.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--full", action="store_true", default=False,
                     help="also run the full lane: every accounting setup and every real-data sample")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Without --full, tests marked `full` are deselected (counted as such, not reported as skips)."""
    if config.getoption("--full"):
        return
    kept = [item for item in items if item.get_closest_marker("full") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("full")])
        items[:] = kept


@pytest.fixture
def full_lane(request: pytest.FixtureRequest) -> bool:
    """True under `pytest --full`: sweep every sample instead of the default sample."""
    return bool(request.config.getoption("--full"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared test data at {SHARED_DATA} (not present in this checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _private_calibration_store(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans in tests never read the user's own calibration store (~/.local/share/tuiwiz)."""
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(tmp_path_factory.mktemp("calibration") / "calibration.jsonl"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny local Llama (with its tokenizer) and a small alpaca dataset, built once, read-only."""
    from tiny_model import build_model, write_dataset

    root = tmp_path_factory.mktemp("tiny")
    return build_model(root / "model"), write_dataset(root / "data.json")
