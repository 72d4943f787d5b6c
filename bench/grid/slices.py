"""The slice loop: run what fits before the deadline, leave the rest for the next slice. Pure:
the clock, the point runner and the checkpoint builder are injected, so tests drive it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from grid.points import Point


@dataclass
class SliceResult:
    ran: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)  # not started: predicted past the deadline
    interrupted: list[str] = field(default_factory=list)


def run_slice(points: list[Point], predict: Callable[[Point], float], predict_ckpt: Callable[[str], float],
              deadline_s: float | None, elapsed: Callable[[], float],
              ensure_ckpt: Callable[[str], str | None], run_point: Callable[[Point], dict[str, Any]],
              release_ckpt: Callable[[str], None], on_record: Callable[[Point, dict[str, Any]], None]) -> SliceResult:
    """Run `points` (grouped by model) in order, never starting one whose predicted time (plus its
    model's checkpoint, when not built yet) would end past `deadline_s`, with `elapsed()` the seconds
    since the deadline's origin. Points that do not fit are left for the next slice; smaller ones
    after them still run if they fit.

    `ensure_ckpt(model)` builds the checkpoint (returns an error string or None), `run_point`
    returns the record (status "interrupted" when the deadline killed it), `release_ckpt` runs
    after the last point of a model when none of its points was left over.
    """
    res = SliceResult()
    for model, pts in _by_model(points).items():
        ready, ckpt_error, all_done = False, None, True
        for p in pts:
            need = predict(p) + (0.0 if ready else predict_ckpt(model))
            if deadline_s is not None and elapsed() + need > deadline_s:
                res.left.append(p.id)
                all_done = False
                continue
            if not ready and ckpt_error is None:
                ckpt_error = ensure_ckpt(model)
                ready = ckpt_error is None
            rec = run_point(p) if ready else {"status": "error", "error": f"checkpoint: {ckpt_error}"}
            if rec.get("status") == "interrupted":
                res.interrupted.append(p.id)
                all_done = False
            else:
                res.ran.append(p.id)
            on_record(p, rec)
        if ready and all_done:
            release_ckpt(model)
    return res


def _by_model(points: list[Point]) -> dict[str, list[Point]]:
    out: dict[str, list[Point]] = {}
    for p in points:
        out.setdefault(p.model, []).append(p)
    return out
