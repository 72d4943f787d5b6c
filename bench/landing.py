"""Where the advisor lands on the card, and what happens if the driver sees more than torch allocates.

    .venv/bin/python bench/landing.py                      # today's constants against the candidates
    .venv/bin/python bench/landing.py --scenario slack20:0.20:0.55:0.10 --json

Issue 12 part 5 ("headroom until proven"). For every catalog model x catalog card x cutoff
(512, 2048, 8192; cutoffs beyond a model's positions are skipped), the planner plans exactly as
`tuiwiz --auto --gpu CARD --cutoff-len C --no-calibration` does (every other knob left to the
advisor, no dataset), once per scenario. A scenario sets the uncalibrated priors: allocator
slack (`tuiwiz.planning.memory.ALLOCATOR_SLACK`), CUDA context (`CUDA_CONTEXT_BYTES`) and the
headroom (`tuiwiz.planning.advisor.DEFAULT_HEADROOM`, a request field).

What the CPU cannot see is modelled as the issue states it: a driver-level (NVML) peak `g`
above torch's max allocated, `A x (1 + g)`, with g = 16% and 32% (the published range on long
packed or variable-length batches). A plan "lands" at max(its own estimated peak, A x (1 + g))
over the card's total; above 100% it would OOM.

Printed per scenario, over the plans that fit:
- how many land above 90% of the card, and above 100%, at g = 0, 16%, 32%;
- the median and 90th percentile of estimated peak / budget, over memory-bound plans (the
  advisor held something back), to compare with the issue's "93-98% of the budget";
- the speed it costs against today's constants: plans given a smaller micro-batch, plans that
  need checkpointing they did not need, plans that no longer fit;
- the published HF-stack whole-process figures (`bench/published.py`, level nvml): how many
  the estimate under-predicts, and by how much at worst.

Nothing is written; the lead decides which constant changes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from tuiwiz.hardware import GPU_CATALOG, HardwareInventory, HostInfo, gpus_from_catalog  # noqa: E402
from tuiwiz.planner import Plan, PlanRequest, catalog_specs, make_plan  # noqa: E402
from tuiwiz.planning import advisor, memory  # noqa: E402
from tuiwiz.planning.knobs import TrainingKnobs  # noqa: E402
from tuiwiz.planning.memory import GIB  # noqa: E402

CUTOFFS = (512, 2048, 8192)
GAPS = (0.0, 0.16, 0.32)
HOST = HostInfo(cpu_cores=16, ram_total_gib=128.0, ram_available_gib=120.0, disk_free_gib=500.0, disk_path="/")
PUBLISHED = ROOT.parent / "shared" / "data" / "memory_published.json"


@dataclass(frozen=True)
class Scenario:
    name: str
    slack: float
    context_gib: float
    headroom: float

    @classmethod
    def parse(cls, text: str) -> "Scenario":
        name, slack, ctx, headroom = text.split(":")
        return cls(name, float(slack), float(ctx), float(headroom))


TODAY = Scenario("today", memory.ALLOCATOR_SLACK, memory.CUDA_CONTEXT_BYTES / GIB, advisor.DEFAULT_HEADROOM)
CANDIDATES = (
    Scenario("slack 12%", 0.12, TODAY.context_gib, TODAY.headroom),
    Scenario("slack 15%", 0.15, TODAY.context_gib, TODAY.headroom),
    Scenario("slack 20%", 0.20, TODAY.context_gib, TODAY.headroom),
    Scenario("headroom 15%", TODAY.slack, TODAY.context_gib, 0.15),
    Scenario("headroom 20%", TODAY.slack, TODAY.context_gib, 0.20),
    Scenario("context 1 GiB", TODAY.slack, 1.0, TODAY.headroom),
)


@contextlib.contextmanager
def priors(s: Scenario) -> Iterator[None]:
    """The estimate's priors set to the scenario's for the duration (module globals, read per call)."""
    old = memory.ALLOCATOR_SLACK, memory.CUDA_CONTEXT_BYTES
    memory.ALLOCATOR_SLACK, memory.CUDA_CONTEXT_BYTES = s.slack, int(s.context_gib * GIB)
    try:
        yield
    finally:
        memory.ALLOCATOR_SLACK, memory.CUDA_CONTEXT_BYTES = old


def plans(s: Scenario) -> dict[tuple[str, str, int], Plan]:
    """Every catalog model x card x cutoff, planned as `tuiwiz --auto` plans it."""
    out = {}
    with priors(s):
        for spec in catalog_specs():
            for card in GPU_CATALOG:
                hw = HardwareInventory(gpus_from_catalog(card), HOST, "catalog")
                for cutoff in CUTOFFS:
                    if cutoff > spec.max_positions:
                        continue
                    req = PlanRequest(model=spec.id, gpu=card.name, knobs=TrainingKnobs(cutoff_len=cutoff),
                                      fixed=frozenset({"cutoff_len"}), headroom=s.headroom)
                    out[(spec.id, card.name, cutoff)] = make_plan(req, hw, spec, None, with_suggestions=False)
    return out


def landing(p: Plan, gap: float) -> float:
    """The plan's peak over the card if the driver sees `gap` above torch's max allocated."""
    est = p.advice.estimate
    return max(est.peak_bytes, est.allocated_bytes * (1 + gap)) / GIB / p.gpus[0].total_gib


def _share(n: int, of: int) -> str:
    return f"{n}/{of} ({n / of:.0%})" if of else "0/0"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def summarise(s: Scenario, mine: dict, base: dict) -> dict[str, Any]:
    fit = [k for k, p in mine.items() if p.advice.fits]
    bound = [k for k in fit if mine[k].advice.held_back]
    out: dict[str, Any] = {"scenario": s.__dict__, "plans": len(mine), "fit": len(fit), "memory_bound": len(bound)}
    for g in GAPS:
        out[f"above_90_at_{g:.0%}"] = sum(landing(mine[k], g) > 0.90 for k in fit)
        out[f"oom_at_{g:.0%}"] = sum(landing(mine[k], g) > 1.0 for k in fit)
    ratio = [mine[k].advice.estimate.peak_bytes / mine[k].advice.budget_bytes for k in bound]
    out["peak_over_budget_median"] = round(statistics.median(ratio), 3) if ratio else None
    out["peak_over_budget_p90"] = round(_pct(ratio, 0.9), 3) if ratio else None
    smaller = ckpt = lost = 0
    for k, p in mine.items():
        b = base[k]
        if b.advice.fits and not p.advice.fits:
            lost += 1
        elif p.advice.fits:
            smaller += p.knobs.micro_batch_size < b.knobs.micro_batch_size
            ckpt += p.knobs.grad_checkpointing and not b.knobs.grad_checkpointing
    out.update(smaller_micro_batch=smaller, checkpointing_added=ckpt, no_longer_fit=lost)
    out["published_nvml"] = published_check(s)
    return out


def published_check(s: Scenario) -> dict[str, Any] | None:
    """The HF-stack whole-process rows of bench/published.py under this scenario's priors."""
    if not PUBLISHED.is_file():
        return None
    import published

    with priors(s):
        rows = published.compare(json.loads(PUBLISHED.read_text(encoding="utf-8")))["rows"]
    mine = [r for r in rows if r.get("expressed") and r["level"] == "nvml" and r["our_stack"]]
    under = [r["error"] for r in mine if r["error"] < 0]
    return {"rows": len(mine), "under": len(under), "worst_under": round(min(under), 3) if under else 0.0,
            "median_error": round(statistics.median(r["error"] for r in mine), 3) if mine else None}


def to_text(results: list[dict[str, Any]]) -> str:
    lines = [f"catalog: {results[0]['plans']} plans (models x cards x cutoffs {CUTOFFS}); "
             "land = max(estimated peak, allocated x (1+g)) / card total", ""]
    head = ("| scenario | slack | ctx GiB | headroom | fit | >90% card g=0/16/32% | OOM g=16/32% | "
            "peak/budget med, p90 | smaller mb | +ckpt | lost | published HF nvml: under, worst |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        sc, fit = r["scenario"], r["fit"]
        pub = r["published_nvml"]
        pub_text = f"{pub['under']}/{pub['rows']}, {pub['worst_under']:+.1%}" if pub else "-"
        lines.append(
            f"| {sc['name']} | {sc['slack']:.0%} | {sc['context_gib']:.2f} | {sc['headroom']:.0%} | {fit} | "
            f"{r['above_90_at_0%']}/{r['above_90_at_16%']}/{r['above_90_at_32%']} | "
            f"{r['oom_at_16%']}/{r['oom_at_32%']} ({r['oom_at_16%'] / fit:.0%}/{r['oom_at_32%'] / fit:.0%}) | "
            f"{r['peak_over_budget_median']}, {r['peak_over_budget_p90']} | {r['smaller_micro_batch']} | "
            f"{r['checkpointing_added']} | {r['no_longer_fit']} | {pub_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", type=Scenario.parse, metavar="NAME:SLACK:CONTEXT_GIB:HEADROOM",
                    help="a scenario to compare with today's constants (default: the built-in candidates)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    base = plans(TODAY)
    results = [summarise(TODAY, base, base)]
    for s in args.scenario or CANDIDATES:
        results.append(summarise(s, plans(s), base))
    print(json.dumps(results, indent=1) if args.json else to_text(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
