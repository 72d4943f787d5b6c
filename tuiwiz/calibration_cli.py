"""`tuiwiz calibration`: list the measured runs that calibrate the memory estimate, or clear them.

    tuiwiz calibration            one line per run: estimate against measured (80 columns)
    tuiwiz calibration --json     the records and each GPU's fit, as JSON
    tuiwiz calibration --clear    remove the store after a confirmation (--yes: without asking)

The store is `$XDG_DATA_HOME/tuiwiz/calibration.jsonl` (`TUIWIZ_CALIBRATION=FILE` overrides).
Without a terminal to confirm on, `--clear` refuses unless `--yes` is given. No torch here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import NoReturn, Sequence

from tuiwiz.atomic import why_not_writable
from tuiwiz.errors import CannotWrite, UserError
from tuiwiz.hardware import GpuInfo
from tuiwiz.planning.calibration import (
    Calibration,
    CalibrationRecord,
    StoreContents,
    default_path,
    fit_calibration,
    read_records,
    same_gpu,
)

PROG = "tuiwiz calibration"
WIDTH = 80
EXIT_USAGE, EXIT_DECLINED = 2, 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="List the measured runs that calibrate the memory estimate on this "
                "machine's GPUs, or clear them. Store: $XDG_DATA_HOME/tuiwiz/calibration.jsonl "
                "(TUIWIZ_CALIBRATION=FILE overrides).")
    p.add_argument("--json", action="store_true", help="the records and each GPU's fit as JSON")
    p.add_argument("--clear", action="store_true", help="remove every record (asks first)")
    p.add_argument("--yes", action="store_true", help="with --clear: do not ask")
    return p


# ---- listing ---------------------------------------------------------------------------

def short_gpu(name: str) -> str:
    """'NVIDIA GeForce RTX 4090' -> 'RTX 4090': the vendor words every NVML name repeats."""
    for word in ("NVIDIA ", "GeForce ", "Tesla "):
        name = name.replace(word, "")
    return name


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1].rstrip() + "~"


def record_line(r: CalibrationRecord) -> str:
    """One record in 80 columns: date, GPU, model, allocated and NVML peak (estimate/measured), error."""
    e, m = r.estimate, r.measured
    when = time.strftime("%Y-%m-%d", time.localtime(r.t))
    diff = f"{m.nvml_gib / e.peak_gib - 1:+.1%}" if e.peak_gib > 0 else "-"
    model = r.model.rsplit("/", 1)[-1]
    return (f"{when:<10}  {_cut(short_gpu(r.gpu), 14):<14}  {_cut(model, 18):<18}  "
            f"{_cut(f'{e.allocated_gib:.2f}/{m.allocated_gib:.2f}', 11):>11}  "
            f"{_cut(f'{e.peak_gib:.2f}/{m.nvml_gib:.2f}', 11):>11}  {diff:>6}")


HEADER = (f"{'date':<10}  {'GPU':<14}  {'model':<18}  {'alloc GiB':>11}  {'peak GiB':>11}  {'diff':>6}\n"
          f"{'':<10}  {'':<14}  {'':<18}  {'est/meas':>11}  {'est/nvml':>11}").rstrip()


def fits_by_gpu(records: Sequence[CalibrationRecord]) -> list[Calibration]:
    """The calibration each card in the store gets, newest card last."""
    out: list[Calibration] = []
    for r in sorted(records, key=lambda x: x.t):
        if any(same_gpu(c.gpu, c.total_gib, r.gpu, r.total_gib) for c in out):
            continue
        card = GpuInfo(index=0, name=r.gpu, total_gib=r.total_gib, used_gib=0.0, free_gib=r.total_gib, bf16=True)
        fit = fit_calibration(records, [card])
        if fit is not None:
            out.append(fit)
    return out


def fit_line(c: Calibration) -> str:
    parts = [f"{short_gpu(c.gpu)}: {c.runs} run{'s' if c.runs != 1 else ''} ->"]
    if c.activation_ratio is not None:
        parts.append(f"activations x{c.activation_ratio:.2f},")
    if c.slack_fraction is not None:
        parts.append(f"slack {c.slack_fraction:.1%},")
    if c.context_bytes is not None:
        parts.append(f"context {c.context_bytes / 1024**3:.2f} GiB")
    return " ".join(parts).rstrip(",")


def format_store(store: StoreContents) -> str:
    """The `tuiwiz calibration` listing; every line fits 80 columns (a long path stands alone)."""
    lines = [f"store: {store.path}" if len(str(store.path)) <= WIDTH - 7 else str(store.path)]
    if not store.records:
        lines.append("no calibration records yet: each run that fits its plan adds one.")
    else:
        lines += [HEADER] + [record_line(r) for r in sorted(store.records, key=lambda x: x.t)]
        lines.append("")
        lines.append("planning uses (median of the newest runs, bounded; docs/runs.md):")
        lines += ["  " + fit_line(c) for c in fits_by_gpu(store.records)]
    if store.skipped:
        lines.append(f"{store.skipped} malformed line{'s' if store.skipped != 1 else ''} skipped.")
    return "\n".join(lines)


def store_json(store: StoreContents) -> dict:
    return {"path": str(store.path), "skipped": store.skipped,
            "records": [r.model_dump(mode="json") for r in store.records],
            "fits": [{"gpu": c.gpu, "runs": c.runs, **c.to_json()} for c in fits_by_gpu(store.records)]}


# ---- clearing --------------------------------------------------------------------------

def _confirmed(question: str) -> bool | None:
    """True/False from the terminal; None when there is no terminal to ask on."""
    stdin = sys.stdin
    if stdin is None or not stdin.isatty():
        return None
    print(question, end=" ", flush=True)
    return stdin.readline().strip().lower() in ("y", "yes")


def clear_store(path: Path) -> None:
    """Remove the store file (the records are gone; the next run starts a new one)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        raise CannotWrite(path, why_not_writable(e)) from None


def _clear(store: StoreContents, yes: bool) -> int:
    n = len(store.records) + store.skipped
    if not store.path.exists():
        print(f"nothing to clear: no store at {store.path}")
        return 0
    if not yes:
        answer = _confirmed(f"Remove {n} calibration record{'s' if n != 1 else ''} ({store.path})? [y/N]")
        if answer is None:
            print(f"{PROG}: not clearing: no terminal to confirm on; add --yes to clear without asking.",
                  file=sys.stderr)
            return EXIT_USAGE
        if not answer:
            print("kept: nothing was removed.")
            return EXIT_DECLINED
    clear_store(store.path)
    print(f"removed {n} record{'s' if n != 1 else ''}: {store.path}")
    return 0


def run_calibration(argv: Sequence[str]) -> int:
    """`tuiwiz calibration ARGV...`; user mistakes print one line on stderr and return 2."""
    try:
        args = build_parser().parse_args(list(argv))
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        if args.yes and not args.clear:
            raise UserError("--yes only goes with --clear.")
        store = read_records(default_path())
        if args.clear:
            return _clear(store, args.yes)
        print(json.dumps(store_json(store), indent=1) if args.json else format_store(store))
        return 0
    except UserError as err:
        print(f"{PROG}: {' '.join(str(err).split())}", file=sys.stderr)
        return err.exit_code
