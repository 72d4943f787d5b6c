"""Shipped presets are exactly what the planner produces today, and each one fits."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tuiwiz.preset import load_preset

PRESETS = Path(__file__).resolve().parents[1] / "presets"
spec = importlib.util.spec_from_file_location("make_presets", PRESETS / "make_presets.py")
make_presets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_presets)


@pytest.mark.parametrize("row", make_presets.SHIPPED, ids=[r[0] for r in make_presets.SHIPPED])
def test_shipped_preset_matches_planner(row):
    path = PRESETS / f"{row[0]}.yaml"
    assert path.read_text() == make_presets.render(*row), f"{path.name} drifted: run python presets/make_presets.py"
    preset = load_preset(path)
    assert preset.estimate is not None and preset.estimate.fits


def test_at_least_six_presets_ship():
    assert len(list(PRESETS.glob("*.yaml"))) >= 6


def test_gpu_names_win_over_sizes():
    from tuiwiz.hardware import catalog_gpu

    assert catalog_gpu("4090").name == "GeForce RTX 4090"
    assert catalog_gpu("24GB").memory_gib == 24
    assert catalog_gpu("A100-40GB").published_gb == 40


@pytest.mark.parametrize("row", make_presets.SHIPPED[:2], ids=[r[0] for r in make_presets.SHIPPED[:2]])
def test_replanning_a_preset_keeps_its_card_and_its_plan(row):
    from tuiwiz.planner import plan_request, request_from_preset

    preset = load_preset(PRESETS / f"{row[0]}.yaml")
    plan = plan_request(request_from_preset(preset))
    assert plan.gpus[0].name == preset.hardware.gpu  # not "generic 23.99GB GPU"
    assert plan.knobs == preset.training


def test_a_preset_for_an_unknown_card_replans_for_its_size(tmp_path):
    from tuiwiz.planner import plan_request, request_from_preset

    text = (PRESETS / f"{make_presets.SHIPPED[0][0]}.yaml").read_text()
    preset = load_preset(PRESETS / f"{make_presets.SHIPPED[0][0]}.yaml")
    edited = tmp_path / "p.yaml"
    edited.write_text(text.replace(f"gpu: {preset.hardware.gpu}", "gpu: NVIDIA RTX A5000"))
    plan = plan_request(request_from_preset(load_preset(edited)))
    assert plan.gpus[0].name.startswith("generic") and abs(plan.gpus[0].total_gib - preset.hardware.memory_gib) < 0.01
