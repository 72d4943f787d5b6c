"""Text renderings sized for 80 columns: one-line bars, the memory stack, the histogram.

Pure functions from numbers to `rich.text.Text`, so screens stay thin and the pictures are
deterministic (snapshot tests compare them).
"""

from __future__ import annotations

from typing import Sequence

from rich.table import Table
from rich.text import Text

from tuiwiz.planning.memory import Term

GROUP_STYLE = {
    "weights": "dodger_blue2", "lora": "green3", "gradients": "yellow3", "optimizer": "magenta",
    "activations": "cyan", "logits": "red3", "overhead": "grey62",
}
GROUP_LABEL = {
    "weights": "weights", "lora": "LoRA", "gradients": "grads", "optimizer": "optim",
    "activations": "activ.", "logits": "logits", "overhead": "overhead",
}
EIGHTHS = " ▏▎▍▌▋▊▉█"
VBLOCKS = " ▁▂▃▄▅▆▇█"


def usage_bar(used: float, total: float, width: int = 12) -> Text:
    """`████░░░░ 12.1/24.0G`: used memory against total, red above 90%."""
    frac = 0.0 if total <= 0 else max(0.0, min(1.0, used / total))
    full = round(frac * width)
    style = "red" if frac > 0.9 else "yellow" if frac > 0.6 else "green"
    out = Text("█" * full, style=style)
    out.append("░" * (width - full), style="grey35")
    out.append(f" {used:4.1f}/{total:.0f}G")
    return out


def memory_stack(groups: dict[str, int], budget: int, width: int) -> Text:
    """One line: each memory group as a coloured run, `│` at the budget, scaled to the larger."""
    total = sum(groups.values())
    scale = max(total, budget, 1)
    cells: list[str] = []
    for name, size in groups.items():
        cells += [name] * round(size / scale * width)
    cells = cells[:width]
    budget_col = min(width - 1, round(budget / scale * width))
    out = Text()
    for col in range(width):
        if col == budget_col:
            out.append("│", style="bold white on red" if total > budget else "bold white")
        elif col < len(cells):
            out.append("█", style=GROUP_STYLE[cells[col]])
        else:
            out.append("·", style="grey35")
    return out


def memory_legend(groups: dict[str, int], width: int = 80, gib: float = 1024**3) -> Text:
    """`■ weights 4.10  ■ LoRA 0.20 ...` in GiB, skipping empty groups, wrapped to `width`
    between entries (never between a swatch and its name)."""
    out = Text()
    used = 0
    for name, size in groups.items():
        if size <= 0:
            continue
        entry = f"{GROUP_LABEL[name]} {size / gib:.2f}"
        cost = 2 + len(entry)
        if used and used + 2 + cost > width:
            out.append("\n")
            used = 0
        elif used:
            out.append("  ")
            used += 2
        out.append("■ ", style=GROUP_STYLE[name])
        out.append(entry)
        used += cost
    return out


def breakdown_table(terms: Sequence[Term], peak_gib: float, budget_gib: float) -> Table:
    """Every memory term with its size, coloured by group, then the peak against the budget."""
    t = Table(box=None, padding=(0, 1), show_header=False, expand=False)
    t.add_column(no_wrap=True, overflow="ellipsis")
    t.add_column(justify="right", no_wrap=True)
    for term in terms:
        if term.bytes <= 0:
            continue
        t.add_row(Text.assemble(("■ ", GROUP_STYLE[term.group]), term.label), f"{term.gib:.2f}")
    t.add_row(Text("peak", style="bold"), Text(f"{peak_gib:.2f}", style="bold"))
    t.add_row(Text("budget", style="dim"), Text(f"{budget_gib:.2f}", style="dim"))
    return t


def histogram(counts: Sequence[int], edges: Sequence[float], marks: dict[str, tuple[float, str]],
              width: int, height: int) -> Text:
    """A vertical-bar histogram of `counts`, rebinned to `width` columns, with marker columns.

    `marks` maps a label to (token length, style); each is drawn as a coloured column
    and named on the axis line below.
    """
    if not counts or len(edges) != len(counts) + 1:
        return Text("(no data)")
    lo, hi = float(edges[0]), float(edges[-1])
    for value, _ in marks.values():
        hi = max(hi, float(value) * 1.02)
    span = max(hi - lo, 1e-9)
    cols = [0.0] * width
    for i, c in enumerate(counts):
        mid = (edges[i] + edges[i + 1]) / 2
        cols[min(width - 1, int((mid - lo) / span * width))] += c
    top = max(cols) or 1.0
    mark_cols = {min(width - 1, int((v - lo) / span * width)): (label, style) for label, (v, style) in marks.items()}
    out = Text()
    for row in range(height, 0, -1):
        for x, c in enumerate(cols):
            level = c / top * height - (row - 1)
            ch = VBLOCKS[max(0, min(8, round(level * 8)))] if level > 0 else " "
            if x in mark_cols:
                style = mark_cols[x][1]
                out.append(ch if ch.strip() else "┊", style=style)
            else:
                out.append(ch, style="steel_blue1")
        out.append("\n")
    axis = [" "] * width
    left, right = f"{lo:.0f}", f"{hi:.0f}"
    axis[: len(left)] = list(left)
    axis[width - len(right):] = list(right)
    out.append("".join(axis), style="grey62")
    out.append("\n")
    legend = Text()
    for label, (value, style) in marks.items():
        legend.append("┊ ", style=style)
        legend.append(f"{label} {value:.0f}   ")
    out.append_text(legend)
    return out


def mask_text(pieces: Sequence[tuple[str, bool]], limit: int = 4000) -> Text:
    """Tokens of one sample, trained ones highlighted, masked ones dimmed; boundaries shown."""
    out = Text()
    shown = 0
    for i, (tok, trained) in enumerate(pieces):
        if shown > limit:
            out.append(f" … ({len(pieces) - i} more tokens)", style="italic")
            break
        base = "black on green3" if trained else "grey58"
        if i % 2:
            base = "black on green4" if trained else "grey46"
        out.append(tok, style=base)
        shown += len(tok)
    return out
