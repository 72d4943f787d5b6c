"""Calibration from the user's measured runs: the store, the bounded fit, the plan, the CLI.

Records here are synthetic: each says what a run of a given plan measured. The truth the tests
hold the planner to is those measurements (and the documented bounds), never the fit's own sums.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tuiwiz.cli import main
from tuiwiz.hardware import HardwareInventory, HostInfo, catalog_gpu, gpus_from_catalog
from tuiwiz.models import resolve_model
from tuiwiz.planner import PlanRequest, make_plan
from tuiwiz.planning import calibration as cal
from tuiwiz.planning.advisor import advise, budget_bytes
from tuiwiz.planning.calibration import (
    CalibrationRecord,
    MeasuredLevels,
    append_record,
    fit_calibration,
    read_records,
    record_for,
    same_gpu,
)
from tuiwiz.planning.knobs import TrainingKnobs
from tuiwiz.planning.memory import estimate_memory

ROOT = Path(__file__).resolve().parents[1]
NVML_4090 = "NVIDIA GeForce RTX 4090"
CARD_4090 = gpus_from_catalog(catalog_gpu("4090"))
TOTAL_4090 = CARD_4090[0].total_gib
LLAMA = resolve_model("meta-llama/Llama-3.1-8B")
KNOBS = TrainingKnobs(cutoff_len=2048, micro_batch_size=2, grad_checkpointing=True)
HOST = HostInfo(cpu_cores=2, ram_total_gib=16.0, ram_available_gib=8.0, disk_free_gib=100.0, disk_path="/")
#: the flags that plan exactly KNOBS for LLAMA on a 4090 (every memory knob held)
PLAN_ARGS = ["--auto", "--json", "--gpu", "4090", "--model", LLAMA.id, "--cutoff-len", "2048", "--micro-batch", "2",
             "--grad-checkpointing", "on"]


def measured_run(knobs: TrainingKnobs = KNOBS, factor: float = 1.15, *, spec=LLAMA, gpu: str = NVML_4090,
                 total_gib: float = TOTAL_4090, t: float = 0.0) -> CalibrationRecord:
    """A run of `knobs` that measured `factor` x the uncalibrated estimate at every level."""
    e = estimate_memory(spec, knobs)
    return record_for(gpu=gpu, total_gib=total_gib, model=spec.id, knobs=knobs, estimate=e, t=t, versions={},
                      measured=MeasuredLevels(allocated_gib=e.allocated_gib * factor,
                                              reserved_gib=e.reserved_gib * factor, nvml_gib=e.peak_gib * factor))


def write_store(path: Path, records: list[CalibrationRecord]) -> Path:
    for r in records:
        append_record(r, path)
    return path


# ---- the fit and the estimate -----------------------------------------------------------

def test_records_15_percent_above_the_estimate_raise_the_planned_peak():
    runs = [measured_run(t=i) for i in range(9)]
    before = estimate_memory(LLAMA, KNOBS)
    after = estimate_memory(LLAMA, KNOBS, calibration=fit_calibration(runs, CARD_4090))
    measured = runs[0].measured.nvml_gib
    assert after.peak_gib > before.peak_gib
    # nine runs carry 9/10 of the weight against the prior: the plan moves 90% of the way to what they measured
    assert after.peak_gib == pytest.approx(before.peak_gib + 0.9 * (measured - before.peak_gib), rel=0.005)
    # parameter bytes are exact: calibration never touches them
    for key in ("quantized_weights", "unquantized_weights", "lora_weights", "lora_gradients", "optimizer_states"):
        assert after.term(key).bytes == before.term(key).bytes
    assert after.calibration is not None and after.calibration.calibration.runs == 9


def test_the_advisor_chooses_its_micro_batch_with_the_calibrated_estimate():
    budget = budget_bytes(CARD_4090[0].free_gib)
    # the memory-bound plan (micro-batch above 1, capped by memory) that sits closest to the budget
    plans = [advise(LLAMA, TrainingKnobs(cutoff_len=n), budget) for n in (256, 512, 1024, 2048, 4096)]
    plain = max((a for a in plans if a.held_back and a.knobs.micro_batch_size > 1),
                key=lambda a: a.estimate.peak_bytes)
    k = TrainingKnobs(cutoff_len=plain.knobs.cutoff_len)
    runs = [measured_run(plain.knobs, factor=1.5, t=i) for i in range(3)]
    c = fit_calibration(runs, CARD_4090)
    calibrated = advise(LLAMA, k, budget, calibration=c)
    # the runs say the uncalibrated choice overshoots the budget; the calibrated advisor steps down
    assert estimate_memory(LLAMA, plain.knobs, calibration=c).peak_bytes > budget
    assert calibrated.fits and calibrated.knobs.micro_batch_size < plain.knobs.micro_batch_size
    assert calibrated.estimate.calibration is not None


@pytest.mark.parametrize("other,total", [("NVIDIA A100-SXM4-80GB", 80.0), ("NVIDIA L40S", 44.99),
                                         ("NVIDIA L4", 22.49), ("NVIDIA GeForce RTX 3090", 24.0)])
def test_records_from_another_gpu_change_nothing(other, total):
    runs = [measured_run(gpu=other, total_gib=total, t=i) for i in range(5)]
    assert fit_calibration(runs, CARD_4090) is None
    hw = HardwareInventory(CARD_4090, HOST, "catalog")
    req = PlanRequest(model=LLAMA.id, gpu="4090", knobs=KNOBS, fixed=frozenset({"cutoff_len"}))
    mine = fit_calibration([measured_run(t=0)], CARD_4090)
    # a calibration of this card handed to a plan for another card is not applied either
    a100 = HardwareInventory(gpus_from_catalog(catalog_gpu("A100-80GB")), HOST, "catalog")
    assert make_plan(req, a100, LLAMA, None, calibration=mine).to_json() == make_plan(req, a100, LLAMA, None).to_json()
    assert make_plan(req, hw, LLAMA, None).advice.estimate.calibration is None


@pytest.mark.parametrize("factor", [100.0, 8.0, 0.01])
@pytest.mark.parametrize("model,knobs", [
    ("meta-llama/Llama-3.1-8B", KNOBS),
    ("Qwen/Qwen2.5-0.5B", TrainingKnobs(cutoff_len=512, micro_batch_size=1)),  # context-dominated
    ("Qwen/Qwen2.5-7B", TrainingKnobs(cutoff_len=8192, micro_batch_size=4, grad_checkpointing=False)),
])
def test_a_single_absurd_record_cannot_move_the_plan_beyond_the_bound(factor, model, knobs):
    spec = resolve_model(model)
    absurd = measured_run(knobs, factor, spec=spec)
    before = estimate_memory(spec, knobs).peak_bytes
    after = estimate_memory(spec, knobs, calibration=fit_calibration([absurd], CARD_4090)).peak_bytes
    # docs/runs.md "Calibration store": at most +25% and -15% of the uncalibrated peak
    assert (1 - cal.MAX_LOWER) * before <= after <= (1 + cal.MAX_RAISE) * before


def test_many_runs_far_above_the_estimate_stop_at_the_bound_and_say_so():
    e = estimate_memory(LLAMA, KNOBS)
    alloc = 1.9 * e.allocated_gib  # still "the same plan" (within 2x), far from the estimate
    far = MeasuredLevels(allocated_gib=alloc, reserved_gib=1.5 * alloc, nvml_gib=1.5 * alloc + 3)
    runs = [measured_run(t=i).model_copy(update={"measured": far}) for i in range(12)]
    est = estimate_memory(LLAMA, KNOBS, calibration=fit_calibration(runs, CARD_4090))
    assert est.calibration.bounded
    assert est.peak_bytes == pytest.approx((1 + cal.MAX_RAISE) * e.peak_bytes, rel=1e-6)
    assert est.calibration.to_json()["adjust_gib"] == pytest.approx(est.peak_gib - e.peak_gib, abs=0.002)


def test_odd_runs_are_outvoted_by_the_median():
    runs = [measured_run(factor=1.05, t=i) for i in range(6)] + [measured_run(factor=1.9, t=10 + i) for i in range(2)]
    with_odd = estimate_memory(LLAMA, KNOBS, calibration=fit_calibration(runs, CARD_4090)).peak_gib
    without = estimate_memory(LLAMA, KNOBS, calibration=fit_calibration(runs[:6], CARD_4090)).peak_gib
    assert with_odd == pytest.approx(without, rel=0.01)


@pytest.mark.parametrize("a,ta,b,tb,same", [
    ("NVIDIA GeForce RTX 4090", 23.99, "GeForce RTX 4090", 23.99, True),
    ("NVIDIA H100 80GB HBM3", 79.65, "H100 80GB", 79.65, True),
    ("Tesla T4", 15.0, "Tesla T4", 15.0, True),
    ("NVIDIA L40S", 44.99, "NVIDIA L4", 22.49, False),  # names extend each other, memory does not agree
    ("NVIDIA GeForce RTX 4090", 23.99, "GeForce RTX 3090", 24.0, False),
    ("NVIDIA", 24.0, "NVIDIA GeForce RTX 4090", 23.99, False),  # an empty key matches nothing
])
def test_nvml_names_match_catalog_names(a, ta, b, tb, same):
    assert same_gpu(a, ta, b, tb) is same


def test_only_the_uncalibrated_estimate_can_be_recorded():
    c = fit_calibration([measured_run()], CARD_4090)
    with pytest.raises(ValueError):
        record_for(gpu=NVML_4090, total_gib=TOTAL_4090, model=LLAMA.id, knobs=KNOBS, versions={},
                   estimate=estimate_memory(LLAMA, KNOBS, calibration=c),
                   measured=MeasuredLevels(allocated_gib=1, reserved_gib=1, nvml_gib=1))


# ---- the store ---------------------------------------------------------------------------

def test_store_round_trips_and_counts_malformed_lines(tmp_path):
    path = tmp_path / "calibration.jsonl"
    write_store(path, [measured_run(t=1), measured_run(t=2)])
    with path.open("a") as fh:
        fh.write("not json\n\n" + json.dumps({"gpu": "x"}) + "\n")
    append_record(measured_run(t=3), path)
    got = read_records(path)
    assert [r.t for r in got.records] == [1, 2, 3] and got.skipped == 2
    assert got.records[0] == measured_run(t=1)


def test_a_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "calibration.jsonl"
    write_store(path, [measured_run(t=1)])
    with path.open("a") as fh:
        fh.write('{"t": 2, "gpu": "NVIDIA Ge')  # a writer killed mid-line
    append_record(measured_run(t=3), path)
    got = read_records(path)
    assert [r.t for r in got.records] == [1, 3] and got.skipped == 1


def test_concurrent_appends_keep_every_line_whole(tmp_path):
    path = tmp_path / "calibration.jsonl"
    record = measured_run()

    def writer(n: int) -> None:
        for i in range(25):
            append_record(record.model_copy(update={"t": n * 100 + i}), path)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    got = read_records(path)
    assert got.skipped == 0 and sorted(r.t for r in got.records) == sorted(n * 100 + i for n in range(4)
                                                                          for i in range(25))


def test_missing_store_is_empty_and_default_path_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.delenv("TUIWIZ_CALIBRATION", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert cal.default_path() == tmp_path / "tuiwiz" / "calibration.jsonl"
    assert read_records().records == ()
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(tmp_path / "mine.jsonl"))
    assert cal.default_path() == tmp_path / "mine.jsonl"


def test_the_store_module_imports_without_torch():
    code = ("import sys, tuiwiz.planning.calibration; "
            "bad = [m for m in ('torch', 'transformers', 'textual') if m in sys.modules]; "
            "print(bad); sys.exit(bool(bad))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- tuiwiz --auto -----------------------------------------------------------------------

def _auto_json(args, capsys):
    code = main(args)
    out = capsys.readouterr().out
    assert code in (0, 3)
    return json.loads(out)["memory"]


def test_auto_json_uses_this_gpus_runs_and_no_calibration_ignores_them(tmp_path, monkeypatch, capsys):
    store = write_store(tmp_path / "cal.jsonl", [measured_run(t=i) for i in range(3)])
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(tmp_path / "empty.jsonl"))
    plain = _auto_json(PLAN_ARGS, capsys)
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(store))
    calibrated = _auto_json(PLAN_ARGS, capsys)
    ignored = _auto_json(PLAN_ARGS + ["--no-calibration"], capsys)

    assert plain["calibration"] is None and ignored["calibration"] is None
    assert ignored == plain
    c = calibrated["calibration"]
    assert c["runs"] >= 1 and c["gpu"] == NVML_4090
    assert {"activation_residual", "allocator_slack", "cuda_context"} <= set(c["terms"])
    # the runs measured 15% above the estimate: the calibrated peak is nearer what they measured
    measured = read_records(store).records[0].measured.nvml_gib
    assert abs(calibrated["peak_gib"] - measured) < abs(plain["peak_gib"] - measured)
    assert calibrated["peak_gib"] == pytest.approx(plain["peak_gib"] + c["adjust_gib"], abs=0.002)
    moved = {t["key"]: t["why"] for t in calibrated["terms"]}
    assert moved["cuda_context"] == "calibrated from 3 runs"


def test_auto_table_says_it_is_calibrated(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(write_store(tmp_path / "c.jsonl", [measured_run(t=i)
                                                                                     for i in range(2)])))
    main([a for a in PLAN_ARGS if a != "--json"])
    out = capsys.readouterr().out
    assert "calibrated from 2 runs on this GPU" in out
    assert max(len(line) for line in out.splitlines()) <= 80


# ---- tuiwiz calibration --------------------------------------------------------------------

class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_calibration_lists_one_line_per_run_in_80_columns(tmp_path, monkeypatch, capsys):
    qwen = resolve_model("Qwen/Qwen2.5-7B")
    records = [measured_run(t=1_700_000_000), measured_run(spec=qwen, t=1_700_000_100),
               measured_run(gpu="NVIDIA H100 80GB HBM3", total_gib=79.65, t=1_700_000_200)]
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(write_store(tmp_path / "c.jsonl", records)))
    assert main(["calibration"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    rows = [line for line in lines if "+15.0%" in line]
    assert len(rows) == 3
    assert any("Llama-3.1-8B" in r for r in rows) and any("Qwen2.5-7B" in r for r in rows)
    assert any("H100 80GB HBM3" in r for r in rows)
    assert main(["calibration", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["records"]) == 3 and {f["gpu"] for f in data["fits"]} == {NVML_4090, "NVIDIA H100 80GB HBM3"}


def test_calibration_clear_yes_removes_the_store(tmp_path, monkeypatch, capsys):
    path = write_store(tmp_path / "c.jsonl", [measured_run()])
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(path))
    assert main(["calibration", "--clear", "--yes"]) == 0
    assert not path.exists()
    assert "removed 1 record" in capsys.readouterr().out


def test_calibration_clear_without_a_terminal_refuses(tmp_path, monkeypatch, capsys):
    path = write_store(tmp_path / "c.jsonl", [measured_run()])
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(path))
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))  # piped input is not a confirmation
    assert main(["calibration", "--clear"]) == 2
    assert path.exists() and "--yes" in capsys.readouterr().err


@pytest.mark.parametrize("answer,code,kept", [("n\n", 1, True), ("y\n", 0, False)])
def test_calibration_clear_asks_on_a_terminal(answer, code, kept, tmp_path, monkeypatch, capsys):
    path = write_store(tmp_path / "c.jsonl", [measured_run()])
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(path))
    monkeypatch.setattr(sys, "stdin", _Tty(answer))
    assert main(["calibration", "--clear"]) == code
    assert path.exists() is kept
    assert "[y/N]" in capsys.readouterr().out


def test_calibration_on_an_unreadable_store_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TUIWIZ_CALIBRATION", str(tmp_path))  # a folder
    assert main(["calibration"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and len(err.strip().splitlines()) == 1
