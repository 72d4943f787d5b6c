"""Human-readable plan output for `tuiwiz --auto`: fits in 80 columns, no colour codes needed."""

from __future__ import annotations

import shlex

from tuiwiz.planner import Plan
from tuiwiz.planning.knobs import KNOBS, format_knob
from tuiwiz.planning.memory import GIB


def _bar(frac: float, width: int = 24) -> str:
    n = max(0, min(width, round(frac * width)))
    return "#" * n + "." * (width - n)


def render_plan(plan: Plan, width: int = 80) -> str:
    a, k, est = plan.advice, plan.advice.knobs, plan.advice.estimate
    g = plan.gpus[0]
    lines = []
    src = "NVML" if plan.hardware.source == "nvml" else "catalog"
    n = plan.world_size
    nodes = f"{plan.nodes} nodes x " if plan.nodes > 1 else ""
    lines.append(f"GPU     {nodes}{len(plan.gpus)} x {g.name}  {g.free_gib:.1f}/{g.total_gib:.1f} GiB free  "
                 f"bf16 {'yes' if g.bf16 else 'no'}  ({src})")
    h = plan.hardware.host
    lines.append(f"Host    {h.cpu_cores} cores, RAM {h.ram_available_gib:.0f}/{h.ram_total_gib:.0f} GiB free")
    lines.extend(_spread_lines(plan, width))
    lines.extend(_wrap(plan.spec.summary(), width, "Model   ", " " * 8))
    if plan.profile is not None:
        p = plan.profile.to_json()
        approx = " (approximate)" if p.get("approximate") else ""
        trunc = plan.profile.at_cutoff(k.cutoff_len, k.micro_batch_size, k.batching).truncated
        lines.extend(_wrap(f"{p['samples']} samples ({p['layout']}), tokens p50 {p['p50']} p95 {p['p95']} "
                           f"p99 {p['p99']} max {p['max']}{approx}", width, "Data    ", " " * 8))
        if plan.profile.skipped_note():
            lines.extend(_wrap(f"! {plan.profile.skipped_note()}", width, " " * 8, " " * 10))
        lines.extend(_wrap(f"cutoff {k.cutoff_len} truncates {trunc} sample{'s' if trunc != 1 else ''}; "
                           f"tokenizer {p['tokenizer']}", width, " " * 8, " " * 8))
    lines.append("")
    lines.append("Plan")
    for info in KNOBS:
        value = getattr(k, info.name)
        if info.tui or value != info.default:
            lines.append(f"  {info.label:<19}{format_knob(info.name, value)}")
        if info.name == "grad_accum":
            lines.append(f"  {'effective batch':<19}{k.effective_batch(n)}")
    lines.append("")
    lines.append(f"Memory per GPU (GiB)      peak {est.peak_gib:6.2f} / budget {a.budget_gib:.2f}  "
                 + ("FITS" if a.fits else "DOES NOT FIT"))
    for t in est.terms:
        lines.append(_clip(f"  {t.label:<31}{t.bytes / GIB:7.2f}  {_bar(t.bytes / max(est.peak_bytes, 1), 12)}  "
                           f"{t.why}", width))
    lines.append(f"  {'allocated / reserved':<31}{est.allocated_gib:7.2f} / {est.reserved_gib:.2f}")
    if est.calibration is not None:
        runs = est.calibration.calibration.runs
        lines.append(f"  calibrated from {runs} run{'s' if runs != 1 else ''} on this GPU "
                     f"({est.calibration.adjust_bytes / GIB:+.2f} GiB)")
    lines.append("  peak moment: " + ("inside a decoder layer (recompute, gradients)" if est.peak_at == "layer"
                                      else "the output head's first backward tile"))
    if a.reasons:
        lines.append("")
        lines.append("Why")
        for r in a.reasons:
            lines.extend(_wrap(r, width, "  - ", "    "))
    if plan.suggestions:
        lines.append("")
        lines.append("What would fit (add the flags to the same command)")
        for s in plan.suggestions:
            lines.extend(_wrap(s.text, width, "  - ", "    "))
            lines.append("      " + shlex.join(s.flags))
    warns = plan.all_warnings()
    if warns:
        lines.append("")
        for w in warns:
            lines.extend(_wrap(w, width, "! ", "  "))
    return "\n".join(lines)


def _spread_lines(plan: Plan, width: int) -> list[str]:
    """How the run spreads over its GPUs, and the host RAM a node needs (sharded runs load the
    model into host RAM first; offloading keeps the shards there)."""
    from tuiwiz.planning.strategy import TITLES, is_sharded

    k = plan.knobs
    if plan.world_size < 2 and k.strategy == "ddp":
        return []
    lines = [f"Spread  {k.strategy}: {TITLES[k.strategy]}, {plan.world_size} GPUs"]
    if is_sharded(k.strategy):
        ram = plan.host_ram
        parts = ", ".join(f"{t.label} {t.gib:.0f}" for t in ram.terms if t.bytes)
        lines.extend(_wrap(f"host RAM per node about {ram.peak_gib:.0f} GiB ({parts})", width, " " * 8, " " * 8))
    return lines


def _clip(line: str, width: int) -> str:
    """Fit a line to `width` columns, cutting at a word boundary with '...' (`--json` has the full text)."""
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width - 2)
    return line[: cut if cut > 0 else width - 3].rstrip(" ,;:") + "..."


def _wrap(text: str, width: int, first: str, rest: str) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=first, subsequent_indent=rest) or [first]
