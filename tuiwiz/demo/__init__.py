"""The bundled demo dataset, used when no dataset is given; `make_demo` regenerates it."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: The bundled demo dataset (OpenAI messages layout, ~300 samples with a long tail).
DEMO_DATASET: Path = Path(str(resources.files(__name__) / "demo.jsonl"))
