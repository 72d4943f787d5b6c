"""memory_grid.{json,csv,md}, rebuilt from the records alone: what `--summarise` writes, and
what every slice writes at its end."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from grid.points import GIB
from grid.records import LEVELS, latest_by_id, level_error
from grid.summary import TARGET_MAX, TARGET_MEDIAN, summarise

CSV_COLUMNS = ["id", "model", "kind", "tiny", "card_gb", "cutoff_len", "micro_batch_size", "grad_accum",
               "plan_grad_accum", "lora_rank", "grad_checkpointing", "attn", "optim", "status", "error",
               "max_allocated", "est_allocated", "err_allocated", "max_reserved", "est_reserved", "err_reserved",
               "nvml_peak", "nvml_peak_all", "est_peak", "err_nvml", "nvml_source", "ctx_at_init", "cap_bytes",
               "budget_bytes", "card_bytes", "advisor_est_peak", "train_s", "s_per_step", "load_s", "wall_s", "pred_s",
               "gpu", "child_mode"]


def write_outputs(results: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """memory_grid.json (summary + records), .csv and .md, rebuilt from `records`."""
    recs = [_with_errors(r) for r in latest_by_id(records).values()]
    summary = summarise(recs)
    results.mkdir(parents=True, exist_ok=True)
    (results / "memory_grid.json").write_text(json.dumps({"summary": summary, "records": recs}, indent=1,
                                                         default=str) + "\n", encoding="utf-8")
    with (results / "memory_grid.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(recs)
    (results / "memory_grid.md").write_text(markdown(summary, recs), encoding="utf-8")
    return summary


def _with_errors(r: dict[str, Any]) -> dict[str, Any]:
    row = dict(r)
    for level, got, est in LEVELS:
        err = level_error(r, got, est)
        row[f"err_{level}"] = None if err is None else round(err, 4)
    return row


# ---- markdown ----------------------------------------------------------------------------------

def markdown(summary: dict[str, Any], recs: list[dict[str, Any]]) -> str:
    """The tables for people: errors by level, every point, and the plan check."""
    lines = ["# Memory grid", "",
             f"GPU: {', '.join(summary['gpus']) or 'none'}; records: {summary['records']} {summary['statuses']}; "
             f"versions: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()), ""]
    lines += _md_errors(summary) + _md_points(recs) + _md_plan_check(summary)
    return "\n".join(lines)


def _md_errors(summary: dict[str, Any]) -> list[str]:
    levels = [(lv, st) for lv, st in list(summary["error"].items())
              + [("nvml, fitted context", summary.get("error_nvml_with_fitted_context"))] if st]
    lines = ([f"Error of the estimate over {summary['grid_points_measured']} grid points (target: median "
              f"<= {TARGET_MEDIAN:.0%}, max <= {TARGET_MAX:.0%}):", "",
              "| level | n | median abs | max abs | median signed | worst under | target met |",
              "|---|---|---|---|---|---|---|"] if levels
             else ["No GPU measurements in these records (a CPU --tiny run records no peaks)."])
    for level, st in levels:
        met = "yes" if st["meets_target"] else "no"
        lines.append(f"| {level} | {st['n']} | {st['median_abs']:.1%} | {st['max_abs']:.1%} | "
                     f"{st['median_signed']:+.1%} | {st['worst_under']:+.1%} | {met} |")
    if "fitted_cuda_context_gib" in summary:
        prior = summary["cuda_context_prior_bytes"] / GIB
        lines += ["", f"Fitted CUDA context: {summary['fitted_cuda_context_gib']} GiB "
                      f"({summary['fitted_cuda_context_source']}); prior {prior:.2f} GiB."]
    if "reserved_over_allocated" in summary:
        ro = summary["reserved_over_allocated"]
        lines.append(f"Reserved/allocated: median {ro['median']} (min {ro['min']}, max {ro['max']}); "
                     f"prior {ro['prior']} (measured, not fitted).")
    return lines


def _md_points(recs: list[dict[str, Any]]) -> list[str]:
    lines = ["", "## Points (GiB; error = estimate / measured - 1)", "",
             "| kind | model | card | c | b | ga | r | gc | attn | optim | status | alloc | est | err "
             "| reserved | est | err | NVML | est | err |", "|---" * 20 + "|"]
    for r in sorted(recs, key=lambda r: (r.get("tiny", False), r["model"], r["kind"], r.get("card_gb") or 0)):
        lines.append(
            f"| {'tiny-' if r.get('tiny') else ''}{r['kind']} | {r['model']} | {r.get('card_gb') or '-'} | "
            f"{r.get('cutoff_len')} | {r.get('micro_batch_size')} | {r.get('grad_accum')} | {r.get('lora_rank')} | "
            f"{int(bool(r.get('grad_checkpointing')))} | {r.get('attn')} | {r.get('optim')} | {r.get('status')} | "
            f"{_gib(r.get('max_allocated'))} | {_gib(r.get('est_allocated'))} | {_pct(r.get('err_allocated'))} | "
            f"{_gib(r.get('max_reserved'))} | {_gib(r.get('est_reserved'))} | {_pct(r.get('err_reserved'))} | "
            f"{_gib(r.get('nvml_peak'))} | {_gib(r.get('est_peak'))} | {_pct(r.get('err_nvml'))} |")
    return lines


def _md_plan_check(summary: dict[str, Any]) -> list[str]:
    lines = ["", "## Plan check (NVML peak over the whole run / the advisor's budget)", "",
             "| model | card | plan | status | used of budget | est. | fits | >=85% | step-up | status "
             "| used of card | tightness | note |", "|---" * 13 + "|"]
    yn = {True: "yes", False: "NO", None: "-"}
    for row in summary["plan_check"]:
        lines.append(
            f"| {'tiny ' if row['tiny'] else ''}{row['model']} | {row['card_gb']} GB | {row['plan_knobs']} | "
            f"{row['plan_status']} | {_ratio(row['plan_used_of_budget'])} | {_ratio(row['plan_est_used_of_budget'])} | "
            f"{yn[row['plan_fits']]} | {yn[row['meets_85']]} | {row['step_up_knobs']} | {row['step_up_status']} | "
            f"{_ratio(row['step_up_used_of_card'])} | {row['tightness']} | {row['note']} |")
    t = summary["plan_check_totals"]
    return lines + ["", f"Plans that fit: {t['plans_fit']}/{t['plans_judged']}; >= 85% of budget: "
                        f"{t['meet_85']}/{t['meet_85_judged']} (rows: {t['rows']}); "
                        f"step-up verdicts: {t['tight']} tight, {t['too_conservative']} too conservative.", ""]


def _gib(v: Any) -> str:
    return "-" if not v else f"{v / GIB:.2f}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{v:+.1%}"


def _ratio(v: Any) -> str:
    return "-" if v is None else f"{v:.0%}"
