"""bench/memory_grid.py and its parts in bench/grid/: the GPU calibration grid's plumbing, proven on CPU.

Unit tests (fast) cover the point list, the plan-check choice, the deadline logic and the
summary on synthetic records; one slow test runs the real CLI (`--device cpu --tiny`) on two
points, checks that a second run skips them and that `--summarise` rebuilds the outputs.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from grid import child, points, records, report, runner, session, slices, summary, timing  # bench/ (pythonpath)

from tuiwiz.planning.knobs import TrainingKnobs

REPO = Path(__file__).resolve().parents[1]
GB = 10**9


# ---- the point list ----------------------------------------------------------------------------

def test_point_ids_are_unique_and_name_kind_model_card_and_knobs() -> None:
    every = points.all_points()
    ids = [p.id for p in every]
    assert len(ids) == len(set(ids))
    assert ids[0] == ("grid:Qwen/Qwen2.5-0.5B:-:c512-b8-ga1-r16-a32-d0.05-all-linear-gc0-sdpa-paged_adamw_8bit-"
                      "chunked-q4-s3")
    plan = next(p for p in every if p.kind == "plan" and p.card_gb == 24)
    assert plan.id.startswith(f"plan:{plan.model}:24GB:c{plan.knobs.cutoff_len}-b{plan.knobs.micro_batch_size}-")
    assert all(p.id.startswith("tiny-") for p in points.all_points(tiny=True))


def test_grid_covers_the_ranges_the_issue_asks_for() -> None:
    from tuiwiz.model_catalog import lookup
    from tuiwiz.models import spec_from_config

    grid = [p for p in points.all_points() if p.kind == "grid"]
    sizes = {m: spec_from_config(lookup(m).config, m, "catalog").params_b for m, _ in points.GRID}
    assert any(s < 0.7 for s in sizes.values()) and any(0.9 < s < 1.7 for s in sizes.values())
    assert any(2.8 < s < 3.5 for s in sizes.values()) and any(6.5 < s < 8.5 for s in sizes.values())
    assert any(13 < s < 16 for s in sizes.values())
    knobs = [p.knobs for p in grid]
    assert {512, 8192} <= {k.cutoff_len for k in knobs}
    assert {1, 8} <= {k.micro_batch_size for k in knobs} and {8, 64} <= {k.lora_rank for k in knobs}
    assert {True, False} == {k.grad_checkpointing for k in knobs}
    assert {"sdpa", "eager"} == {k.attn for k in knobs}
    assert {"paged_adamw_8bit", "adamw_torch"} == {k.optim for k in knobs}


def test_every_grid_model_gets_a_memory_bound_plan_and_its_step_up_at_both_cards() -> None:
    from tuiwiz.hardware import catalog_gpu
    from tuiwiz.planning.advisor import budget_bytes

    for model, _ in points.GRID:
        for gb in points.CARDS:
            plan, up = points.plan_points(model, gb)
            budget = budget_bytes(catalog_gpu(points.CARDS[gb]).memory_gib)
            assert plan.held_back and plan.plan_cutoff in points.PLAN_CUTOFFS, (model, gb)
            assert plan.advisor_est_peak <= budget < up.advisor_est_peak, (model, gb)
            assert (up.knobs.micro_batch_size, up.knobs.grad_checkpointing) != (
                plan.knobs.micro_batch_size, plan.knobs.grad_checkpointing)
            assert plan.knobs.max_steps == points.PLAN_STEPS
            assert plan.knobs.grad_accum == min(plan.plan_grad_accum, points.PLAN_MAX_ACCUM)


def test_plan_is_the_one_the_planner_makes_at_that_cutoff() -> None:
    from tuiwiz.hardware import catalog_gpu
    from tuiwiz.planning.advisor import advise, budget_bytes

    plan, _ = points.plan_points("meta-llama/Llama-3.1-8B", 24)
    adv = advise(points.catalog_spec("meta-llama/Llama-3.1-8B"), TrainingKnobs(cutoff_len=plan.plan_cutoff),
                 budget_bytes(catalog_gpu("4090").memory_gib))
    assert plan.knobs == points.run_knobs(adv.knobs)
    assert plan.advisor_est_peak == adv.estimate.peak_bytes


def test_gemma2_plans_are_eager_as_the_advisor_made_them() -> None:
    plan_and_step_up = points.plan_points("google/gemma-2-2b", 80)
    assert plan_and_step_up and all(p.knobs.attn == "eager" for p in plan_and_step_up)


def test_full_grid_with_plan_check_is_predicted_under_20_minutes() -> None:
    every = points.all_points()
    total = (sum(timing.predict_point_s(p) for p in every) + sum(timing.predict_ckpt_s(m) for m, _ in points.GRID)
             + timing.PRIOR["parent_s"])
    assert 8 * 60 < total <= 20 * 60


def test_predicted_time_grows_with_tokens_and_model_size() -> None:
    small, longer, bigger = (_pt("Qwen/Qwen2.5-0.5B", 512), _pt("Qwen/Qwen2.5-0.5B", 8192), _pt("Qwen/Qwen2.5-14B", 512))
    assert timing.predict_point_s(small) < timing.predict_point_s(longer)
    assert timing.predict_point_s(small) < timing.predict_point_s(bigger)


def test_time_scale_is_the_median_measured_over_predicted_clamped() -> None:
    recs = [{"status": "ok", "wall_s": w, "pred_s": 10.0, "gpu": "H100"} for w in (20, 30, 40)]
    assert timing.time_scale(recs, "H100") == 3.0
    assert timing.time_scale(recs[:2], "H100") == 1.0  # too few to trust
    assert timing.time_scale(recs, "H200") == 1.0  # another GPU
    assert timing.time_scale([{**r, "wall_s": 100} for r in recs], "H100") == 4.0


def test_tiny_config_keeps_the_architecture_and_token_ids_inside_the_vocab() -> None:
    for model, _ in points.GRID:
        c = points.tiny_config(points.catalog_config(model))
        assert c["num_hidden_layers"] == 2 and c["vocab_size"] <= 1024
        assert c["model_type"] == points.catalog_config(model)["model_type"]
        assert all(c[k] is None or c[k] < c["vocab_size"] for k in ("bos_token_id", "eos_token_id", "pad_token_id"))


# ---- the slice loop ----------------------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _pt(model: str, cutoff: int) -> points.Point:
    return points.Point(model, "grid", points.grid_knobs((cutoff, 1, 16, True, "sdpa", "paged_adamw_8bit")))


def _slice(pts, deadline, *, ckpt_fails=(), interrupt=()):
    clock, log = FakeClock(), []
    cost = {p.id: p.knobs.cutoff_len / 100 for p in pts}  # predicted = actual = cutoff/100 s

    def ensure(model):
        log.append(("ckpt", model))
        clock.t += 5
        return "boom" if model in ckpt_fails else None

    def run(p):
        clock.t += cost[p.id]
        log.append(("run", p.id))
        return {"status": "interrupted" if p.id in interrupt else "ok"}

    recs = []
    res = slices.run_slice(pts, lambda p: cost[p.id], lambda m: 5.0, deadline, clock, ensure, run,
                           lambda m: log.append(("release", m)), lambda p, r: recs.append((p.id, r["status"])))
    return res, log, recs, clock.t


def test_slice_never_starts_a_point_predicted_past_the_deadline_but_runs_smaller_ones() -> None:
    a1, a2, a3 = _pt("A", 1000), _pt("A", 4000), _pt("A", 500)  # 10 s, 40 s, 5 s
    res, log, recs, t = _slice([a1, a2, a3], deadline=30.0)
    assert res.ran == [a1.id, a3.id] and res.left == [a2.id]
    assert t <= 30.0
    assert ("release", "A") not in log  # a point is left: the checkpoint stays for the next slice


def test_slice_counts_the_checkpoint_only_before_a_models_first_point() -> None:
    a, b = _pt("A", 1000), _pt("B", 1000)  # 10 s each + 5 s checkpoint each
    res, log, _, t = _slice([a, b], deadline=24.0)
    assert res.ran == [a.id] and res.left == [b.id] and ("ckpt", "B") not in log
    res, log, _, t = _slice([a, b], deadline=None)
    assert res.ran == [a.id, b.id] and log.count(("ckpt", "A")) == 1 and ("release", "B") in log and t == 30.0


def test_slice_records_a_checkpoint_failure_for_each_point_of_that_model_and_goes_on() -> None:
    a1, a2, b = _pt("A", 1000), _pt("A", 2000), _pt("B", 1000)
    res, log, recs, _ = _slice([a1, a2, b], deadline=None, ckpt_fails={"A"})
    assert recs == [(a1.id, "error"), (a2.id, "error"), (b.id, "ok")]
    assert log.count(("ckpt", "A")) == 1 and ("run", a1.id) not in log


def test_slice_keeps_an_interrupted_point_for_the_next_slice() -> None:
    a = _pt("A", 1000)
    res, log, recs, _ = _slice([a], deadline=None, interrupt={a.id})
    assert res.interrupted == [a.id] and res.ran == [] and ("release", "A") not in log


# ---- children: crash, timeout and deadline are recorded, not fatal -------------------------------

def _fake_child(behaviour: str):
    def fake(job, conn):
        if behaviour == "crash":
            os._exit(7)
        if behaviour == "hang":
            import time

            time.sleep(30)
        conn.send(("train", {}))
        conn.send(("result", {"status": "ok", "max_allocated": None}))
        conn.close()
        os._exit(0)

    return fake


@pytest.mark.parametrize("behaviour,deadline,status", [("ok", None, "ok"), ("crash", None, "crash"),
                                                       ("hang", None, "timeout"), ("hang", 0.0, "interrupted")])
def test_runner_records_what_happened_to_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   behaviour: str, deadline, status: str) -> None:
    import time

    monkeypatch.setattr(child, "child_main", _fake_child(behaviour))
    deadline_at = None if deadline is None else time.monotonic() + 0.3
    watcher = runner.Runner(tmp_path, "fork", None, deadline_at)
    t0 = time.monotonic()
    rec = watcher.child({"task": "point"}, timeout=1.0 if deadline is None else 10.0)
    assert rec["status"] == status and rec["wall_s"] < 5 and time.monotonic() - t0 < 5
    assert rec["nvml_peak"] is None and rec["nvml_source"] is None  # no NVML on this machine
    if status == "crash":
        assert "code 7" in rec["error"]


# ---- records -------------------------------------------------------------------------------------

def test_done_ids_skip_finished_points_and_retry_failures_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "memory_grid.jsonl"
    for rec in ({"id": "a", "status": "ok"}, {"id": "b", "status": "oom"}, {"id": "c", "status": "crash"},
                {"id": "d", "status": "interrupted"}, {"id": "e", "status": "ok"}):
        records.append_record(path, rec)
    with path.open("a") as f:
        f.write('{"id": "f", "stat')  # a run killed mid-write
    recs = records.read_records(path)
    assert [r["id"] for r in recs] == ["a", "b", "c", "d", "e"]
    assert records.done_ids(recs) == {"a", "b", "c", "e"}
    assert records.done_ids(recs, retry_errors=True) == {"a", "b", "e"}
    assert records.done_ids(recs + [{"id": "e", "status": "interrupted"}]) == {"a", "b", "c"}  # the latest wins


def test_session_records_each_point_at_once_and_stops_after_max_failures_in_a_row(tmp_path: Path) -> None:
    jsonl = tmp_path / "memory_grid.jsonl"
    no_runner: Any = None  # on_record starts no child
    s = session.Session(device="cpu", scratch=tmp_path, tiny=True, point_timeout=1.0, max_failures=2,
                        auto_mode=False, runner=no_runner, env={"gpu": "cpu"}, jsonl=jsonl, records=[], scale=1.0)
    a, b, c, d = points.all_points(tiny=True)[:4]
    s.on_record(a, {"status": "error", "error": "checkpoint: boom"})  # a checkpoint failure: no id yet
    s.on_record(b, {**records.base_record(b), "status": "ok"})  # a success ends the streak
    s.on_record(c, {**records.base_record(c), "status": "crash"})
    with pytest.raises(session.StopGrid, match="2 failures in a row"):
        s.on_record(d, {**records.base_record(d), "status": "timeout"})
    written = records.read_records(jsonl)
    assert [(r["id"], r["status"]) for r in written] == [(a.id, "error"), (b.id, "ok"), (c.id, "crash"),
                                                         (d.id, "timeout")]
    assert written[0]["gpu"] == "cpu" and written[0]["est_peak"] > 0 and s.records == written


# ---- summary and plan check on synthetic records ---------------------------------------------------

def _grid_rec(i: int, alloc: float, est_alloc: float, reserved: float, nvml: float, **kw) -> dict:
    return {"id": f"g{i}", "model": "M", "kind": "grid", "status": "ok", "gpu": "H100", "max_allocated": alloc * GB,
            "est_allocated": est_alloc * GB, "max_reserved": reserved * GB, "est_reserved": est_alloc * 1.06 * GB,
            "nvml_peak": nvml * GB, "est_peak": (est_alloc * 1.06 + 0.59) * GB, "nvml_source": "process",
            "versions": {"torch": "2.11.0"}, **kw}


def _plan_rec(kind: str, status: str, peak: float | None, est: float, card_gb: int = 24, model: str = "M") -> dict:
    card = 23.99 * 2**30
    return {"id": f"{kind}:{model}:{card_gb}", "model": model, "kind": kind, "group": f"{model}:{card_gb}GB",
            "card_gb": card_gb, "status": status, "budget_bytes": int(card * 0.9), "card_bytes": int(card),
            "nvml_peak_all": None if peak is None else peak * card * 0.9, "advisor_est_peak": est * card * 0.9,
            "advised": f"{kind} knobs", "max_allocated": 10 * GB if status == "ok" else None,
            "est_allocated": 10 * GB, "error": "CUDA out of memory" if status == "oom" else None}


def test_plan_that_fits_and_uses_90_percent_passes_and_an_oom_step_up_is_tight() -> None:
    (row,) = summary.plan_check_rows([_plan_rec("plan", "ok", 0.90, 0.95), _plan_rec("step_up", "oom", None, 1.4)])
    assert row["plan_fits"] is True and row["meets_85"] is True and row["plan_used_of_budget"] == 0.9
    assert row["tightness"] == "tight"


def test_plan_below_85_percent_is_reported_with_its_reason_and_a_fitting_step_up_is_too_conservative() -> None:
    (row,) = summary.plan_check_rows([_plan_rec("plan", "ok", 0.60, 0.58), _plan_rec("step_up", "ok", 1.05, 1.2)])
    assert row["plan_fits"] is True and row["meets_85"] is False
    assert "85% unreachable" in row["note"] and "58%" in row["note"]
    assert row["tightness"] == "too conservative" and "not the budget" in row["note"]


def test_plan_that_ooms_or_exceeds_the_card_fails_and_a_step_up_over_the_card_is_tight() -> None:
    (row,) = summary.plan_check_rows([_plan_rec("plan", "oom", None, 0.9)])
    assert row["plan_fits"] is False and row["tightness"] == "not run"
    (row,) = summary.plan_check_rows([_plan_rec("plan", "ok", 1.2, 0.9), _plan_rec("step_up", "ok", 1.3, 1.2)])
    assert row["plan_fits"] is False and "exceeded the card" in row["note"]
    assert row["tightness"] == "tight"


def test_plan_without_nvml_readings_is_not_judged() -> None:
    (row,) = summary.plan_check_rows([_plan_rec("plan", "ok", None, 0.9), _plan_rec("step_up", "ok", None, 1.2)])
    assert row["plan_fits"] is None and row["meets_85"] is None and row["tightness"] == "unknown"


def test_summary_errors_fitted_context_and_ratio_come_from_grid_points_only() -> None:
    recs = [_grid_rec(0, 10, 10.5, 11, 11.6), _grid_rec(1, 20, 19, 21, 21.8), _grid_rec(2, 30, 30, 31, 31.5),
            _plan_rec("plan", "ok", 0.9, 0.95)]
    s = summary.summarise(recs)
    al = s["error"]["allocated"]
    assert al["n"] == 3 and al["median_abs"] == 0.05 and al["max_abs"] == 0.05 and al["worst_under"] == -0.05
    assert al["meets_target"] is True
    assert s["fitted_cuda_context_bytes"] == int(0.6 * GB)  # median of 0.6, 0.8, 0.5
    with_ctx = s["error_nvml_with_fitted_context"]
    expected = sorted(abs((e * 1.06 + 0.6) / n - 1) for e, n in ((10.5, 11.6), (19, 21.8), (30, 31.5)))
    assert with_ctx["median_abs"] == round(expected[1], 4) and with_ctx["max_abs"] == round(expected[2], 4)
    assert s["reserved_over_allocated"]["median"] == round(21 / 20, 4)
    assert s["reserved_over_allocated"]["note"] == "measured, not fitted"
    assert s["error_capped_runs_allocated"]["n"] == 1
    assert s["versions"] == {"torch": "2.11.0"} and s["gpus"] == ["H100"]


def test_summary_flags_a_missed_target() -> None:
    s = summary.summarise([_grid_rec(0, 10, 11.5, 11, 12), _grid_rec(1, 10, 10.1, 11, 12)])
    assert s["error"]["allocated"]["max_abs"] == 0.15 and s["error"]["allocated"]["meets_target"] is False


def test_records_hold_enough_to_re_estimate_with_the_current_code() -> None:
    from tuiwiz.planning.memory import estimate_memory

    for p in [q for q in points.all_points() if q.model == "meta-llama/Llama-3.1-8B"][:6]:
        rec = records.base_record(p)
        rebuilt = TrainingKnobs(**{k: rec[k] for k in records.KNOB_FIELDS})
        ran = points.point_run_knobs(p)
        assert rebuilt.model_dump(include=records.KNOB_FIELDS) == ran.model_dump(include=records.KNOB_FIELDS)
        stale = {**rec, "est_allocated": 1, "est_reserved": 1, "est_peak": 1, "max_allocated": 123,
                 "advisor_est_peak": (1 if p.kind != "grid" else None)}
        fresh = records.re_estimate(stale)
        assert (fresh["est_allocated"], fresh["est_peak"]) == (rec["est_allocated"], rec["est_peak"])
        assert fresh["max_allocated"] == 123  # measurements are kept
        if p.kind != "grid":
            full = p.knobs.replace(grad_accum=p.plan_grad_accum, max_steps=None)
            assert fresh["advisor_est_peak"] == estimate_memory(points.catalog_spec(p.model), full).peak_bytes


def test_write_outputs_rebuilds_json_csv_and_md(tmp_path: Path) -> None:
    recs = [_grid_rec(0, 10, 10.5, 11, 11.6), _plan_rec("plan", "ok", 0.9, 0.95),
            _plan_rec("step_up", "oom", None, 1.3)]
    report.write_outputs(tmp_path, recs)
    data = json.loads((tmp_path / "memory_grid.json").read_text())
    assert len(data["records"]) == 3 and data["summary"]["plan_check"][0]["tightness"] == "tight"
    rows = list(csv.DictReader((tmp_path / "memory_grid.csv").open()))
    assert [r["id"] for r in rows] == ["g0", "plan:M:24", "step_up:M:24"] and rows[0]["err_allocated"] == "0.05"
    md = (tmp_path / "memory_grid.md").read_text()
    assert "| allocated | 1 | 5.0% |" in md and "Plan check" in md


# ---- the real CLI on CPU -------------------------------------------------------------------------

def _cli(*args: str, tmp: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "bench" / "memory_grid.py"), "--device", "cpu", "--tiny",
                           "--scratch", str(tmp / "scratch"), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


@pytest.mark.slow
def test_cli_runs_tiny_points_on_cpu_resumes_and_summarises(tmp_path: Path) -> None:
    results = tmp_path / "results"
    select = ["--results", str(results), "--only", "Qwen/Qwen2.5-0.5B", "--per-kind", "1", "--limit", "2"]
    p = _cli(*select, "--deadline", "1", tmp=tmp_path)  # nothing fits in 1 s: nothing runs, exit 0
    assert p.returncode == 0, p.stderr[-3000:]
    assert "REMAINING 2" in p.stdout and not (results / "memory_grid.jsonl").exists()

    p = _cli(*select, tmp=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "COMPLETE" in p.stdout
    recs = records.read_records(results / "memory_grid.jsonl")
    assert [r["kind"] for r in recs] == ["grid", "plan"]
    for r in recs:
        assert r["status"] == "ok" and r.get("error") is None and r["tiny"] is True, r.get("log_tail")
        assert r["est_allocated"] > 0 and r["est_reserved"] >= r["est_allocated"] and r["est_peak"] > r["est_reserved"]
        for key in ("max_allocated", "max_reserved", "nvml_peak"):
            assert key in r and r[key] is None  # CPU: no peaks
        assert r["versions"]["transformers"] and r["gpu"] == "cpu" and r["child_mode"] == "fork"
        assert r["wall_s"] > 0 and r["train_s"] > 0 and r["id"].startswith("tiny-")
    assert recs[1]["card_gb"] == 80 and recs[1]["budget_bytes"] < recs[1]["card_bytes"]
    before = (results / "memory_grid.jsonl").read_bytes()

    p = _cli(*select, tmp=tmp_path)
    assert p.returncode == 0 and "2 already in" in p.stdout and "0 to run" in p.stdout
    assert (results / "memory_grid.jsonl").read_bytes() == before

    for name in ("memory_grid.json", "memory_grid.csv", "memory_grid.md"):
        (results / name).unlink()
    p = _cli("--results", str(results), "--summarise", tmp=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((results / "memory_grid.json").read_text())
    assert [r["id"] for r in data["records"]] == [r["id"] for r in recs]
    assert data["summary"]["statuses"] == {"ok": 2}
    assert len(list(csv.DictReader((results / "memory_grid.csv").open()))) == 2
    assert "tiny Qwen/Qwen2.5-0.5B" in (results / "memory_grid.md").read_text()

    p = _cli("--results", str(results), "--summarise", "--re-estimate", tmp=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((results / "memory_grid.json").read_text())
    assert all(r["estimate"] == "re-estimated by the current code" for r in data["records"])
    assert (results / "memory_grid.jsonl").read_bytes() == before  # the measurements file is never rewritten
