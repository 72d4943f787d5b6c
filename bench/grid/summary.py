"""The summary of memory_grid.json, from the records alone (no GPU needed): the estimate's error
at each level, the fitted CUDA context, the reserved/allocated ratio and the plan check."""

from __future__ import annotations

import statistics
from typing import Any, Iterable

from grid.points import GIB
from grid.records import LEVELS, latest_by_id
from grid.timing import time_scale

TARGET_MEDIAN, TARGET_MAX = 0.05, 0.12  # docs/memory.md: the estimate's accuracy target
UTILISATION_TARGET = 0.85


def err_stats(pairs: list[tuple[float, float]]) -> dict[str, Any] | None:
    """Signed error est/measured - 1 (positive: the estimate is above the measurement)."""
    errs = [est / got - 1 for got, est in pairs if got]
    if not errs:
        return None
    abs_errs = [abs(e) for e in errs]
    med, worst = round(statistics.median(abs_errs), 4), round(max(abs_errs), 4)
    return {"n": len(errs), "median_abs": med, "max_abs": worst, "median_signed": round(statistics.median(errs), 4),
            "worst_under": round(min(errs), 4), "meets_target": med <= TARGET_MEDIAN and worst <= TARGET_MAX}


def measured(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok" and bool(r.get("max_allocated"))


# ---- the summary -------------------------------------------------------------------------------

def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of memory_grid.json, from the records alone (no GPU needed)."""
    from tuiwiz.planning.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES

    recs = list(latest_by_id(records).values())
    statuses: dict[str, int] = {}
    for r in recs:
        statuses[r.get("status", "?")] = statuses.get(r.get("status", "?"), 0) + 1
    out: dict[str, Any] = {
        "gpus": sorted({r["gpu"] for r in recs if r.get("gpu")}),
        "versions": _versions_seen(recs), "records": len(recs), "statuses": statuses,
        "cuda_context_prior_bytes": CUDA_CONTEXT_BYTES, "allocator_slack_prior": ALLOCATOR_SLACK,
        "target": {"median_abs": TARGET_MEDIAN, "max_abs": TARGET_MAX},
    }
    grid = [r for r in recs if r.get("kind") == "grid" and measured(r)]
    out.update(_errors(grid, [r for r in recs if r.get("kind") in ("plan", "step_up") and measured(r)]))
    out.update(_fitted_context(grid))
    inits = [r["ctx_at_init"] for r in recs if r.get("ctx_at_init")]
    if inits:
        out["cuda_context_at_init_median_bytes"] = int(statistics.median(inits))
    ratios = [r["max_reserved"] / r["max_allocated"] for r in grid if r.get("max_reserved")]
    if ratios:
        out["reserved_over_allocated"] = {"median": round(statistics.median(ratios), 4),
                                          "min": round(min(ratios), 4), "max": round(max(ratios), 4),
                                          "prior": 1 + ALLOCATOR_SLACK, "note": "measured, not fitted"}
    rows = plan_check_rows(recs)
    out["plan_check"] = rows
    out["plan_check_totals"] = _plan_totals(rows)
    out["wall_s_total"] = round(sum(r["wall_s"] for r in recs if r.get("wall_s")), 1)
    out["measured_over_predicted_time"] = round(time_scale(recs, None), 3)
    return out


def _errors(grid: list[dict[str, Any]], capped: list[dict[str, Any]]) -> dict[str, Any]:
    """The error at each level over grid points. Plan-check runs are capped (the allocator frees
    its cache near the cap), so only their allocated level is comparable; reported apart."""
    return {"grid_points_measured": len(grid),
            "error": {level: err_stats([(r.get(got), r.get(est)) for r in grid if r.get(got)])
                      for level, got, est in LEVELS},
            "error_capped_runs_allocated": err_stats([(r["max_allocated"], r["est_allocated"]) for r in capped])}


def _fitted_context(grid: list[dict[str, Any]]) -> dict[str, Any]:
    """The CUDA context, the only physically fixed term that may be fitted: median(NVML peak -
    torch max reserved), from process-level readings when there are any."""
    ctx_pts = [r for r in grid if r.get("nvml_peak") and r.get("max_reserved")]
    process_level = [r for r in ctx_pts if str(r.get("nvml_source", "")).startswith("process")]
    use = process_level or ctx_pts
    if not use:
        return {}
    ctx = int(statistics.median(r["nvml_peak"] - r["max_reserved"] for r in use))
    return {"fitted_cuda_context_bytes": ctx, "fitted_cuda_context_gib": round(ctx / GIB, 3),
            "fitted_cuda_context_source": ("process" if process_level
                                           else "device-minus-baseline (pids not visible to NVML)"),
            "error_nvml_with_fitted_context": err_stats([(r["nvml_peak"], r["est_reserved"] + ctx) for r in use])}


def _versions_seen(recs: list[dict[str, Any]]) -> dict[str, Any]:
    seen: dict[str, set[str]] = {}
    for r in recs:
        for k, v in (r.get("versions") or {}).items():
            seen.setdefault(k, set()).add(str(v))
    return {k: (sorted(v)[0] if len(v) == 1 else sorted(v)) for k, v in sorted(seen.items())}


# ---- the plan check ----------------------------------------------------------------------------

def plan_check_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (model, card): did the advisor's plan run within the card, how much of the
    budget it used at the NVML level, and whether the step-up it refused would have run."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in latest_by_id(records).values():
        if r.get("kind") in ("plan", "step_up") and r.get("group"):
            groups.setdefault(r["group"], {})[r["kind"]] = r
    rows = [_plan_row(group, g) for group, g in groups.items()]
    rows.sort(key=lambda r: (r["tiny"], r["card_gb"] or 0, r["model"]))
    return rows


def _plan_row(group: str, g: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`g`: the group's records by kind ("plan", "step_up"); one of them may be missing."""
    plan, up = g.get("plan"), g.get("step_up")
    any_r = plan or g["step_up"]
    budget, card = any_r.get("budget_bytes"), any_r.get("card_bytes")
    row: dict[str, Any] = {"group": group, "model": any_r["model"], "card_gb": any_r.get("card_gb"),
                           "tiny": bool(any_r.get("tiny")), "budget_bytes": budget, "card_bytes": card,
                           "cutoff": any_r.get("plan_cutoff")}
    row.update(_plan_side("plan", plan, budget, card))
    row.update(_plan_side("step_up", up, budget, card))
    # The two criteria, reported separately so that neither hides the other:
    # fits (no OOM under the cap and the NVML peak within the card) and >= 85% of the budget.
    row["plan_fits"] = _plan_fits(row["plan_status"], row["plan_within_card"])
    row["meets_85"] = (None if row["plan_used_of_budget"] is None
                       else row["plan_used_of_budget"] >= UTILISATION_TARGET)
    row["tightness"] = _tightness(row)
    row["note"] = _plan_note(row)
    return row


def _plan_fits(status: str | None, within: bool | None) -> bool | None:
    """False on an OOM or a peak past the card; None when not judged (no NVML reading, error, not run)."""
    if status == "oom" or (status == "ok" and within is False):
        return False
    return True if status == "ok" and within else None


def _plan_side(name: str, r: dict[str, Any] | None, budget: int | None, card: int | None) -> dict[str, Any]:
    if r is None:
        return {f"{name}_{k}": None for k in ("knobs", "status", "nvml_peak", "used_of_budget", "used_of_card",
                                              "est_used_of_budget", "within_card", "error")}
    peak = r.get("nvml_peak_all") or r.get("nvml_peak")
    knobs = r.get("advised") or (f"c{r.get('cutoff_len')} b{r.get('micro_batch_size')} "
                                 f"ga{r.get('plan_grad_accum')} r{r.get('lora_rank')}")
    return {
        f"{name}_knobs": knobs, f"{name}_status": r.get("status"), f"{name}_nvml_peak": peak,
        f"{name}_used_of_budget": round(peak / budget, 3) if peak and budget else None,
        f"{name}_used_of_card": round(peak / card, 3) if peak and card else None,
        f"{name}_est_used_of_budget": (round(r["advisor_est_peak"] / budget, 3)
                                       if r.get("advisor_est_peak") and budget else None),
        f"{name}_within_card": (None if not (peak and card) else peak <= card),
        f"{name}_error": r.get("error"),
    }


def _tightness(row: dict[str, Any]) -> str:
    st = row["step_up_status"]
    if st is None:
        return "not run"
    if st == "oom" or (st == "ok" and row["step_up_within_card"] is False):
        return "tight"
    if st == "ok" and row["step_up_within_card"]:
        return "too conservative"
    return "unknown"  # error, crash, timeout, or no NVML reading (CPU)


def _plan_note(row: dict[str, Any]) -> str:
    notes = []
    if row["plan_status"] not in (None, "ok"):
        notes.append(f"plan {row['plan_status']}: {(row['plan_error'] or '')[:120]}")
    if row["plan_within_card"] is False:
        notes.append("plan exceeded the card at the NVML level")
    if row["meets_85"] is False and row["plan_est_used_of_budget"] is not None:
        if row["plan_est_used_of_budget"] < UTILISATION_TARGET:
            notes.append(f"85% unreachable at this notch: the estimate itself gives "
                         f"{row['plan_est_used_of_budget']:.0%} and the next one "
                         f"{row['step_up_est_used_of_budget'] or 0:.0%}")
        else:
            notes.append("uses less than the estimate said")
    if row["plan_used_of_budget"] and row["plan_used_of_budget"] > 1:
        notes.append("over the budget (ate the 10% headroom)")
    if row["tightness"] == "too conservative":
        within = row["step_up_used_of_budget"] is not None and row["step_up_used_of_budget"] <= 1
        notes.append("step-up ran within the card" + (" and within the budget" if within else " (not the budget)"))
    return "; ".join(notes)


def _plan_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    judged = [r for r in rows if r["plan_fits"] is not None]
    return {"rows": len(rows), "plans_fit": sum(bool(r["plan_fits"]) for r in judged),
            "plans_judged": len(judged), "meet_85": sum(bool(r["meets_85"]) for r in rows),
            "meet_85_judged": sum(r["meets_85"] is not None for r in rows),
            "too_conservative": sum(r["tightness"] == "too conservative" for r in rows),
            "tight": sum(r["tightness"] == "tight" for r in rows)}
