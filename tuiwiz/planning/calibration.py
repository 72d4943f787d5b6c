"""Calibration: the memory estimate corrected by what this GPU measured on the user's own runs.

The store is one JSON line per run that fitted (`append_record`, written by the training
worker), kept at `$XDG_DATA_HOME/tuiwiz/calibration.jsonl` (`TUIWIZ_CALIBRATION=FILE`
overrides). It is the user's file: plain text, readable, deletable (`tuiwiz calibration`).

Planning reads the store once, in its read step (`read_calibration`), and fits a `Calibration`:
pure data that `make_plan` hands to the advisor and on to `estimate_memory`. Only the terms
that are not physics move:

- **activations**: a residual on the terms that scale with the batch (activations, the
  dequantized weight, logits). Parameter, adapter, gradient and optimizer bytes are exact
  and never corrected, so the whole allocated error of a run is its activations' error.
- **allocator slack**: the measured `max_reserved / max_allocated - 1` replaces the prior.
- **CUDA context**: the measured `NVML peak - max_reserved` replaces the prior.

Robustness, and the bounds (docs/runs.md "Calibration store" says why each has its size):

- each level is the *median* over the records that inform it (one odd run cannot drag it);
- a record informs a level only when its numbers are physical for that level, and the
  activation residual only when the run measured the plan it was estimated for (allocated
  within a factor of 2 of the estimate) with at least `MIN_DYNAMIC_GIB` of activations;
- each median is clamped (`ACTIVATION_RATIO`, `SLACK_FRACTION`, `CONTEXT_GIB`), then moved
  toward the prior by n / (n + `PRIOR_RUNS`): the prior counts as one run, so a single
  record moves a level halfway, four records 80%;
- the net correction of one estimate is bounded: at most `MAX_RAISE` (+25%) above and
  `MAX_LOWER` (-15%) below the uncalibrated peak; beyond that every term's change is scaled
  down by the same factor and the result says `bounded`;
- only the newest `MAX_RECORDS` records of the GPU count, so a driver or torch upgrade
  washes out old behaviour.

No torch, no Textual: the training worker imports this module to append its record.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuiwiz.atomic import why_not_writable
from tuiwiz.errors import CannotWrite, NotFound, UserError
from tuiwiz.hardware import GpuInfo, gpu_key
from tuiwiz.planning import memory
from tuiwiz.planning.memory import GIB, MemoryEstimate, Term

#: Libraries whose versions a record keeps (they change the allocator, kernels and context size).
VERSIONED = ("torch", "transformers", "peft", "trl", "bitsandbytes")

#: Breakdown groups the activation residual scales: what grows with batch x sequence.
DYNAMIC_GROUPS = ("activations", "logits")

MAX_RECORDS = 20
PRIOR_RUNS = 1
MIN_DYNAMIC_GIB = 0.25
#: A record measured the plan it was estimated for only if its allocated peak is within this factor.
SAME_PLAN_FACTOR = 2.0
#: Bounds on each fitted level (see the module docstring and docs/runs.md).
ACTIVATION_RATIO = (0.75, 1.5)
SLACK_FRACTION = (0.0, 0.35)
CONTEXT_GIB = (0.2, 2.0)
MAX_RAISE = 0.25
MAX_LOWER = 0.15
#: Two GPUs are the same card only when their NVML totals agree this closely (L4 vs L40S, MIG slices).
TOTAL_TOLERANCE = 0.03


# ---- the record ------------------------------------------------------------------------

class _Levels(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class EstimateLevels(_Levels):
    """The uncalibrated estimate the run was planned with, at the levels torch and NVML report."""

    allocated_gib: float = Field(ge=0)
    reserved_gib: float = Field(ge=0)
    peak_gib: float = Field(ge=0)
    #: activations + dequantized weight + logits at the peak: what the activation residual scales.
    #: Optional so that a record without it still calibrates the slack and the context.
    dynamic_gib: float | None = Field(default=None, ge=0)


class MeasuredLevels(_Levels):
    """What the run measured: torch's max allocated and max reserved, and NVML's peak for the process."""

    allocated_gib: float = Field(ge=0)
    reserved_gib: float = Field(ge=0)
    nvml_gib: float = Field(ge=0)


class CalibrationRecord(BaseModel):
    """One line of the store. Unknown keys are ignored, so a newer writer never breaks a reader."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    t: float  # unix time of the measurement
    gpu: str  # the NVML name, e.g. "NVIDIA GeForce RTX 4090"
    total_gib: float = Field(gt=0)
    versions: dict[str, str | None] = Field(default_factory=dict)
    model: str
    knobs: dict[str, Any]  # the TrainingKnobs dump
    estimate: EstimateLevels
    measured: MeasuredLevels


def installed_versions() -> dict[str, str | None]:
    """The versions of the libraries that shape memory, read from package metadata (imports nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def record_for(*, gpu: str, total_gib: float, model: str, knobs: Any, estimate: MemoryEstimate,
               measured: MeasuredLevels, versions: dict[str, str | None] | None = None,
               t: float | None = None) -> CalibrationRecord:
    """The record of one measured run. `estimate` must be the *uncalibrated* estimate of the plan
    (`estimate_memory(..., calibration=None)`): fitting corrections on corrected figures would compound."""
    if estimate.calibration is not None:
        raise ValueError("record_for needs the uncalibrated estimate (calibration=None)")
    dynamic = sum(b for g, b in estimate.breakdown_bytes().items() if g in DYNAMIC_GROUPS)
    dump = knobs.model_dump(mode="json") if hasattr(knobs, "model_dump") else dict(knobs)
    return CalibrationRecord(
        t=time.time() if t is None else t, gpu=gpu, total_gib=total_gib,
        versions=installed_versions() if versions is None else versions, model=model, knobs=dump,
        estimate=EstimateLevels(allocated_gib=estimate.allocated_gib, reserved_gib=estimate.reserved_gib,
                                peak_gib=estimate.peak_gib, dynamic_gib=dynamic / GIB),
        measured=measured)


# ---- the store -------------------------------------------------------------------------

def data_home() -> Path:
    """$XDG_DATA_HOME, else ~/.local/share (the XDG base-directory default)."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"


def default_path() -> Path:
    """Where the store lives: `TUIWIZ_CALIBRATION`, else $XDG_DATA_HOME/tuiwiz/calibration.jsonl."""
    env = os.environ.get("TUIWIZ_CALIBRATION")
    return Path(env).expanduser() if env else data_home() / "tuiwiz" / "calibration.jsonl"


def append_record(record: CalibrationRecord, path: str | os.PathLike[str] | None = None) -> Path:
    """Append one whole line to the store: one `write` on an O_APPEND descriptor, then fsync.

    Concurrent writers never interleave inside a line. A torn last line left by a crash is
    closed with a newline first, so the new record stays whole (the reader skips the torn one).
    Raises `CannotWrite` naming the file when it cannot be written.
    """
    target = Path(path).expanduser() if path is not None else default_path()
    line = (record.model_dump_json() + "\n").encode("utf-8")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line
            view = memoryview(line)
            while view:  # one write in practice; the loop only guards a short write
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise CannotWrite(target, why_not_writable(e)) from None
    return target


@dataclass(frozen=True)
class StoreContents:
    """The readable records of a store, and how many lines were skipped as malformed."""

    path: Path
    records: tuple[CalibrationRecord, ...]
    skipped: int = 0


def parse_lines(lines: Iterable[str]) -> tuple[list[CalibrationRecord], int]:
    """Records from JSON lines; blank lines are ignored, malformed ones counted."""
    records, skipped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(CalibrationRecord.model_validate(json.loads(line)))
        except (ValueError, ValidationError):  # JSONDecodeError is a ValueError
            skipped += 1
    return records, skipped


def read_records(path: str | os.PathLike[str] | None = None) -> StoreContents:
    """Every well-formed record of the store (none when it does not exist yet).

    Malformed lines (a torn write, a hand edit) are skipped and counted. A store that exists
    but cannot be read (not a regular file, no permission) is a `UserError` naming it.
    """
    from tuiwiz.userfile import check_regular_file, open_file

    target = Path(path).expanduser() if path is not None else default_path()
    try:
        check_regular_file(target, field="calibration", what="calibration store")
    except NotFound:
        return StoreContents(target, ())
    with open_file(target, "r", field="calibration", encoding="utf-8", errors="replace") as fh:
        try:
            records, skipped = parse_lines(fh)
        except OSError as e:
            raise UserError(f"{target}: cannot read it ({e.strerror or e}).", field="calibration") from None
    return StoreContents(target, tuple(records), skipped)


# ---- the fit ---------------------------------------------------------------------------

def same_gpu(name_a: str, total_a: float, name_b: str, total_b: float) -> bool:
    """Whether two names denote the same card: NVML's "NVIDIA GeForce RTX 4090" is the catalog's
    "GeForce RTX 4090". Names are compared normalised (`gpu_key`), one may extend the other
    ("H100 80GB" / "NVIDIA H100 80GB HBM3"), and the totals must agree within 3%, which keeps
    an L4 apart from an L40S and a MIG slice apart from its card."""
    a, b = gpu_key(name_a), gpu_key(name_b)
    if not a or not b or not (a == b or a.startswith(b) or b.startswith(a)):
        return False
    return abs(total_a - total_b) <= TOTAL_TOLERANCE * max(total_a, total_b)


def _activation_ratio(r: CalibrationRecord) -> float | None:
    """measured / estimated dynamic bytes, taking every allocated byte the estimate missed as dynamic."""
    e, m = r.estimate, r.measured
    if e.dynamic_gib is None or e.dynamic_gib < MIN_DYNAMIC_GIB or e.allocated_gib <= 0:
        return None
    if not 1 / SAME_PLAN_FACTOR <= m.allocated_gib / e.allocated_gib <= SAME_PLAN_FACTOR:
        return None
    ratio = (m.allocated_gib - (e.allocated_gib - e.dynamic_gib)) / e.dynamic_gib
    return ratio if ratio > 0 else None


def _slack_fraction(r: CalibrationRecord) -> float | None:
    m = r.measured
    return m.reserved_gib / m.allocated_gib - 1 if 0 < m.allocated_gib <= m.reserved_gib else None


def _context_gib(r: CalibrationRecord) -> float | None:
    m = r.measured
    return m.nvml_gib - m.reserved_gib if 0 < m.reserved_gib <= m.nvml_gib else None


def _level(values: list[float], prior: float, bounds: tuple[float, float]) -> float | None:
    """The clamped median, moved from the prior by n / (n + PRIOR_RUNS); None without values."""
    if not values:
        return None
    lo, hi = bounds
    median = min(hi, max(lo, statistics.median(values)))
    return prior + len(values) / (len(values) + PRIOR_RUNS) * (median - prior)


@dataclass(frozen=True)
class Calibration:
    """What this GPU's runs say about the terms that are not physics. Pure data; None fields keep the prior."""

    gpu: str  # the NVML name the records carry
    total_gib: float
    runs: int  # records that informed at least one level
    activation_ratio: float | None = None
    slack_fraction: float | None = None
    context_bytes: int | None = None

    def matches(self, gpu: GpuInfo) -> bool:
        return same_gpu(self.gpu, self.total_gib, gpu.name, gpu.total_gib)

    @property
    def why(self) -> str:
        return f"calibrated from {self.runs} run{'s' if self.runs != 1 else ''}"

    def apply(self, terms: Sequence[Term]) -> tuple[list[Term], "CalibrationApplied"]:
        """The estimate's terms with the fitted levels in place of the priors, within the bounds."""
        by_key = {t.key: t for t in terms}
        allocated = sum(t.bytes for t in terms if t.group != "overhead")
        dynamic = sum(t.bytes for t in terms if t.group in DYNAMIC_GROUPS)
        slack0, context0 = by_key["allocator_slack"].bytes, by_key["cuda_context"].bytes
        act = round((self.activation_ratio - 1) * dynamic) if self.activation_ratio is not None else 0
        fraction = self.slack_fraction if self.slack_fraction is not None else slack0 / max(allocated, 1)
        deltas = {"activation_residual": act,
                  "allocator_slack": round(fraction * (allocated + act)) - slack0,
                  "cuda_context": (self.context_bytes - context0) if self.context_bytes is not None else 0}
        peak0 = allocated + slack0 + context0
        total = sum(deltas.values())
        limit = MAX_RAISE * peak0 if total > 0 else -MAX_LOWER * peak0
        bounded = abs(total) > abs(limit)
        if bounded:
            deltas = {k: int(v * limit / total) for k, v in deltas.items()}
        # a term is calibrated when its level was fitted; the slack also follows a changed allocated
        fitted = {"activation_residual": self.activation_ratio is not None,
                  "allocator_slack": self.slack_fraction is not None or act != 0,
                  "cuda_context": self.context_bytes is not None}
        out: list[Term] = []
        for t in terms:
            if fitted.get(t.key):
                t = dataclasses.replace(t, bytes=t.bytes + deltas[t.key], why=self.why)
            out.append(t)
            if t.key == "logits" and fitted["activation_residual"]:
                out.append(Term("activation_residual", "activation residual (measured)", "activations",
                                deltas["activation_residual"], self.why))
        moved = tuple((k, deltas[k]) for k, on in fitted.items() if on)
        return out, CalibrationApplied(self, moved, bounded)

    def to_json(self) -> dict[str, Any]:
        return {"activation_ratio": None if self.activation_ratio is None else round(self.activation_ratio, 4),
                "slack_fraction": None if self.slack_fraction is None else round(self.slack_fraction, 4),
                "context_gib": None if self.context_bytes is None else round(self.context_bytes / GIB, 3)}


@dataclass(frozen=True)
class CalibrationApplied:
    """How a calibration moved one estimate: each changed term's bytes, and whether the bound cut it."""

    calibration: Calibration
    terms: tuple[tuple[str, int], ...]
    bounded: bool = False

    @property
    def adjust_bytes(self) -> int:
        return sum(b for _, b in self.terms)

    def to_json(self) -> dict[str, Any]:
        """`memory.calibration` of `--json`."""
        c = self.calibration
        return {"runs": c.runs, "gpu": c.gpu, "adjust_gib": round(self.adjust_bytes / GIB, 3),
                "terms": {k: round(b / GIB, 3) for k, b in self.terms}, "bounded": self.bounded,
                "fit": c.to_json()}


def fit_calibration(records: Sequence[CalibrationRecord], gpus: Sequence[GpuInfo]) -> Calibration | None:
    """The calibration for the plan's GPUs from the store's records; None when no record is of that card
    (or the plan mixes cards). Pure: the same records always give the same calibration."""
    if not gpus:
        return None
    g = gpus[0]
    if not all(same_gpu(x.name, x.total_gib, g.name, g.total_gib) for x in gpus[1:]):
        return None
    mine = sorted((r for r in records if same_gpu(r.gpu, r.total_gib, g.name, g.total_gib)), key=lambda r: r.t)
    mine = mine[-MAX_RECORDS:]
    act = [(i, x) for i, r in enumerate(mine) if (x := _activation_ratio(r)) is not None]
    slack = [(i, x) for i, r in enumerate(mine) if (x := _slack_fraction(r)) is not None]
    context = [(i, x) for i, r in enumerate(mine) if (x := _context_gib(r)) is not None]
    runs = len({i for i, _ in act} | {i for i, _ in slack} | {i for i, _ in context})
    if runs == 0:
        return None
    ctx = _level([x for _, x in context], memory.CUDA_CONTEXT_BYTES / GIB, CONTEXT_GIB)
    return Calibration(
        gpu=mine[-1].gpu, total_gib=g.total_gib, runs=runs,
        activation_ratio=_level([x for _, x in act], 1.0, ACTIVATION_RATIO),
        slack_fraction=_level([x for _, x in slack], memory.ALLOCATOR_SLACK, SLACK_FRACTION),
        context_bytes=None if ctx is None else round(ctx * GIB),
    )


def read_calibration(gpus: Sequence[GpuInfo], path: str | os.PathLike[str] | None = None) -> Calibration | None:
    """The I/O half: read the store and fit it for these GPUs (planning's read step calls this)."""
    return fit_calibration(read_records(path).records, gpus)
