"""The records: one JSON line per finished point, appended at once so that a killed slice keeps
what it measured. The latest record of an id wins; the id is the resume key."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable

from grid.points import CARDS, GIB, Point, catalog_spec, estimate_fields, point_run_knobs
from tuiwiz.planning.knobs import TrainingKnobs

DONE = ("ok", "oom", "error", "crash", "timeout")  # statuses that count as recorded
FAILED = ("error", "crash", "timeout")
#: The knobs a record keeps: everything that shapes memory (the schedule's knobs do not).
KNOB_FIELDS = {"cutoff_len", "micro_batch_size", "grad_accum", "lora_rank", "lora_alpha", "lora_dropout",
               "target_modules", "grad_checkpointing", "attn", "optim", "loss", "quant_bits", "double_quant",
               "compute_dtype", "batching", "max_steps"}
#: (level, measured field, estimated field): the three levels the estimate is judged at.
LEVELS = (("allocated", "max_allocated", "est_allocated"), ("reserved", "max_reserved", "est_reserved"),
          ("nvml", "nvml_peak", "est_peak"))


def level_error(rec: dict[str, Any], got: str, est: str) -> float | None:
    """estimate / measured - 1 (positive: the estimate is above the measurement); None unmeasured."""
    return rec[est] / rec[got] - 1 if rec.get(got) and rec.get(est) else None


# ---- the jsonl ---------------------------------------------------------------------------------

def read_records(path: Path) -> list[dict[str, Any]]:
    """Every parseable line of a jsonl (a torn last line from a killed run is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"memory_grid: skipping an unreadable line in {path}", file=sys.stderr)
    return out


def latest_by_id(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if "id" in r:
            out[r["id"]] = r
    return out


def done_ids(records: Iterable[dict[str, Any]], retry_errors: bool = False) -> set[str]:
    keep = tuple(s for s in DONE if not (retry_errors and s in FAILED))
    return {i for i, r in latest_by_id(records).items() if r.get("status") in keep}


def append_record(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- one point's record ------------------------------------------------------------------------

def base_record(p: Point) -> dict[str, Any]:
    """What a record holds before the point runs: the point, its card, its knobs and the estimate."""
    k = point_run_knobs(p)
    card = _card_fields(p.card_gb)
    return {
        "id": p.id, "model": p.model, "kind": p.kind, "tiny": p.tiny, "group": p.group,
        "card_gb": p.card_gb, "card": CARDS.get(p.card_gb) if p.card_gb else None,
        "card_bytes": card["card_bytes"], "budget_bytes": card["budget_bytes"], "plan_cutoff": p.plan_cutoff,
        "plan_grad_accum": p.plan_grad_accum, "held_back": list(p.held_back) or None,
        "advisor_est_peak": p.advisor_est_peak, "advised": _advised(p),
        **k.model_dump(include=KNOB_FIELDS), **estimate_fields(p.model, k, p.tiny),
    }


def _card_fields(card_gb: int | None) -> dict[str, int | None]:
    """The simulated card's NVML total and the advisor's budget on it (plan check only)."""
    from tuiwiz.hardware import catalog_gpu
    from tuiwiz.planning.advisor import budget_bytes

    if not card_gb:
        return {"card_bytes": None, "budget_bytes": None}
    gib = catalog_gpu(CARDS[card_gb]).memory_gib
    return {"card_bytes": int(gib * GIB), "budget_bytes": budget_bytes(gib)}


def _advised(p: Point) -> str | None:
    """The advisor's plan in short (full scale, its own accumulation), for the plan-check table."""
    if p.kind == "grid":
        return None
    k = p.knobs
    return (f"c{k.cutoff_len} b{k.micro_batch_size} ga{p.plan_grad_accum} r{k.lora_rank} "
            f"gc{int(k.grad_checkpointing)} {k.attn}")


def re_estimate(rec: dict[str, Any]) -> dict[str, Any]:
    """The record with its estimate fields recomputed by the current estimate code (the
    measurements are kept): a GPU run's data re-checks a changed estimate without a GPU."""
    from tuiwiz.planning.memory import estimate_memory

    knobs = TrainingKnobs(**{k: rec[k] for k in KNOB_FIELDS if k in rec})
    out = {**rec, **estimate_fields(rec["model"], knobs, bool(rec.get("tiny"))),
           "estimate": "re-estimated by the current code"}
    if rec.get("advisor_est_peak") and rec.get("plan_grad_accum") and not rec.get("tiny"):
        # the advised knobs are the run's but for the accumulation (tiny runs shrank them: kept)
        full = knobs.replace(grad_accum=rec["plan_grad_accum"], max_steps=None)
        out["advisor_est_peak"] = estimate_memory(catalog_spec(rec["model"]), full).peak_bytes
    return out
