"""Regenerate the shipped presets from the planner itself.

    python presets/make_presets.py          # rewrite presets/*.yaml
    python presets/make_presets.py --check  # exit 1 if any differs (tests/test_presets_shipped.py)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuiwiz.planner import PlanRequest, plan_request
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.preset import preset_to_yaml

HERE = Path(__file__).resolve().parent

#: (file name, model, GPU, cutoff, description)
SHIPPED = (
    ("llama3.1-8b-24gb", "meta-llama/Llama-3.1-8B-Instruct", "4090", 2048, "Llama 3.1 8B on a 24 GB card"),
    ("qwen2.5-7b-24gb", "Qwen/Qwen2.5-7B-Instruct", "4090", 2048, "Qwen2.5 7B on a 24 GB card"),
    ("qwen2.5-14b-48gb", "Qwen/Qwen2.5-14B-Instruct", "L40S", 4096, "Qwen2.5 14B on a 48 GB card"),
    ("llama3.1-70b-80gb", "meta-llama/Llama-3.1-70B-Instruct", "H100", 2048, "Llama 3.1 70B on an 80 GB card"),
    ("qwen2.5-0.5b-8gb", "Qwen/Qwen2.5-0.5B-Instruct", "8GB", 2048, "Qwen2.5 0.5B on an 8 GB card"),
    ("mistral-7b-16gb", "mistralai/Mistral-7B-Instruct-v0.3", "T4", 2048, "Mistral 7B v0.3 on a 16 GB T4"),
    ("qwen3-8b-24gb", "Qwen/Qwen3-8B", "L4", 4096, "Qwen3 8B on a 24 GB L4"),
)


def render(name: str, model: str, gpu: str, cutoff: int, description: str) -> str:
    req = PlanRequest(model=model, gpu=gpu, knobs=TrainingKnobs(cutoff_len=cutoff), fixed=frozenset({"cutoff_len"}))
    plan = plan_request(req)
    preset = plan.to_preset(name=name).model_copy(update={"description": description})
    return preset_to_yaml(preset)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    drift = []
    for row in SHIPPED:
        path = HERE / f"{row[0]}.yaml"
        text = render(*row)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                drift.append(path.name)
        else:
            path.write_text(text)
    if drift:
        print("presets drifted from the planner: " + ", ".join(drift) + "; run python presets/make_presets.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
