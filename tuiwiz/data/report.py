"""Human output for the CLI: a stats table, an ASCII histogram with the p95/p99/cutoff
marked, and the longest samples; plus a rate-limited stderr progress printer."""

from __future__ import annotations

import math
import sys
import time
import unicodedata
from typing import Callable, TextIO

from tuiwiz.data.profile import LengthProfile
from tuiwiz.data.tokenizer import APPROX_HINT


def clip(text: str, width: int) -> str:
    """Cut to `width` terminal columns (CJK characters take two)."""
    cols = 0
    for i, ch in enumerate(text):
        w = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else (0 if unicodedata.combining(ch) else 1)
        if cols + w > width:
            return text[:i]
        cols += w
    return text


def _fmt(n: float) -> str:
    return f"{n:,.0f}" if float(n).is_integer() or n >= 100 else f"{n:,.1f}"


def render_text_report(profile: LengthProfile, width: int = 80) -> str:
    width = max(width, 40)
    st = profile.stats
    lines: list[str] = []
    tok = profile.tokenizer + (" (APPROXIMATE)" if profile.approximate else "")
    lines.append(f"Dataset  {profile.path}")
    lines.append(f"Layout   {profile.layout}   Tokenizer {tok}")
    if profile.approximate:
        lines.append(f"  ! {APPROX_HINT}")
    sampled = f" (uniform sample of {profile.population:,})" if profile.population is not None else ""
    lines.append(f"Samples  {profile.samples:,}{sampled}   skipped {profile.skipped:,}")
    for row in profile.skipped_examples:
        lines.append(clip(f"  skipped {row.where()}: {row.reason}", width))
    if profile.skipped > len(profile.skipped_examples):
        lines.append(f"  ... and {profile.skipped - len(profile.skipped_examples):,} more")
    if not profile.samples:
        return "\n".join(lines)
    lines.append("")
    keys = ["min", "mean", "p50", "p90", "p95", "p98", "p99", "max"]
    lines.append("tokens" + "".join(f"{k:>9}" for k in keys))
    lines.append(" " * 6 + "".join(f"{_fmt(st[k]):>9}" for k in keys))
    lines.append(f"total {st['total_tokens']:,} tokens, trained {st['trained_tokens']:,} "
                 f"({st['trained_tokens'] / max(st['total_tokens'], 1):.0%})")
    lines.append("")
    cut = profile.cutoff_stats
    ci = ""
    if profile.percentile_ci:
        ci = f", 95% CI of p{profile.percentile:g}: {profile.percentile_ci[0]:,}-{profile.percentile_ci[1]:,}"
    cap = f", capped at {profile.max_positions:,}" if profile.max_positions else ""
    lines.append(f"Suggested cutoff_len {profile.suggested_cutoff:,} (p{profile.percentile:g} rounded up to 64{cap}{ci})")
    if cut is not None:
        lines.append(f"At cutoff {cut.cutoff:,}: {cut.truncated:,} samples truncated ({cut.truncated_frac:.2%}), "
                     f"{cut.trained_lost_frac:.2%} of trained tokens lost")
        if cut.batching == "packed":
            lines.append(f"Packed: {cut.sequences:,} rows {cut.fill:.1%} full, flattened: no slot is padding")
        elif cut.batching == "padding_free":
            lines.append(f"Padding-free, micro-batch {cut.micro_batch}: no slot is padding")
        else:
            lines.append(f"Padded, micro-batch {cut.micro_batch}: {cut.padding_waste:.1%} of token slots are padding")
    lines.append("")
    lines += _histogram_lines(profile, width, cut.cutoff if cut else profile.suggested_cutoff)
    if profile.longest:
        lines.append("")
        lines.append("Longest samples")
        for ls in profile.longest:
            where = f"line {ls.line}" if ls.line is not None else f"#{ls.index}"
            head = f"{ls.tokens:>8,}  {where:<11} "
            lines.append(clip(head + ls.preview, width))
    return "\n".join(lines)


def _histogram_lines(profile: LengthProfile, width: int, cutoff: int) -> list[str]:
    """Horizontal bars, one per length bin; the bins holding p95/p99/cutoff are marked."""
    rows = 12
    # Zoom on the range that matters for the choice (up to 1.25x the larger of p99 and the
    # cutoff); everything longer lands in the last, open-ended bin.
    top = max(int(profile.stats["p99"]), cutoff)
    top = min(int(profile.stats["max"]), top + top // 4) or 1
    edges, counts = profile.histogram(bins=rows, upto=top)
    marks = {"p95": int(profile.stats["p95"]), "p99": int(profile.stats["p99"]), "cut": cutoff}
    label_w = len(f"{edges[-1]:,}") * 2 + 2
    bar_w = max(10, width - label_w - 20)
    peak = max(counts) or 1
    out = [f"Token length histogram (samples per bin){'':>4}"]
    for i, c in enumerate(counts):
        lo, hi = edges[i], edges[i + 1]
        tags = [name for name, v in marks.items() if lo <= v < hi or (i == len(counts) - 1 and v >= hi)]
        bar = "#" * (round(c / peak * bar_w) if c else 0)
        if c and not bar:
            bar = "."
        open_end = i == len(counts) - 1 and profile.stats["max"] >= hi
        label = (f">={lo:,}" if open_end else f"{lo:,}-{hi:,}").rjust(label_w)
        tag = (" <" + ",".join(tags)) if tags else ""
        out.append(f"{label} |{bar:<{bar_w}} {c:>6,}{tag}")
    return out


def cli_progress_printer(stream: TextIO | None = None, every: float = 0.5) -> Callable[[int, int | None], None]:
    """A `progress` callback printing 'profiling: done/total (pct) rate/s' on stderr, at most
    every `every` seconds (and never when stderr is not a terminal... unless forced by stream)."""
    out = stream or sys.stderr
    start = time.monotonic()
    last = [-math.inf]  # the first call always prints (monotonic time can start near 0 after boot)

    def progress(done: int, total: int | None) -> None:
        now = time.monotonic()
        if now - last[0] < every and not (total and done >= total):
            return
        last[0] = now
        rate = done / max(now - start, 1e-9)
        if total:
            msg = f"profiling: {done:,}/{total:,} ({min(done / total, 1):.0%}) {rate:,.0f} samples/s"
        else:
            msg = f"profiling: {done:,} samples {rate:,.0f}/s"
        end = "\n" if total and done >= total else ""
        out.write("\r" + msg + end if getattr(out, "isatty", lambda: False)() else msg + "\n")
        out.flush()

    return progress
