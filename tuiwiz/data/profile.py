"""profile_dataset: exact per-sample token counts -> statistics and a suggested cutoff_len.

Hot path: normalize + render in Python (the compiled template is cached), tokenize in
chunks with the Rust `encode_batch` (multi-threaded, and it releases the GIL, so rendering
of the next chunk overlaps it on a second thread). Per-sample results go into compact
arrays (4 bytes per number), never per-sample objects; only the top-k longest are kept
whole. With `sample=N` a uniform reservoir of N samples is kept while streaming.
"""

from __future__ import annotations

import heapq
import random
import threading
from array import array
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from tuiwiz.data.chat_template import TemplateError
from tuiwiz.data.encode import Rendered, chat_error, encode_rendered, render_sample, template_for, token_spans
from tuiwiz.data.layouts import Sample, iter_conversations
from tuiwiz.data.readers import ReadReport, SkippedRow
from tuiwiz.data.stats import (
    PERCENTILE_RANGE,
    PERCENTILES,
    bfd_bins,
    histogram,
    padded_tokens,
    percentile_ci,
    percentile_from_counts,
    round_cutoff,
)
from tuiwiz.data.tokenizer import APPROX_HINT, CountingTokenizer, EncodingLike
from tuiwiz.errors import BadValue, CancelledError

CHUNK = 512
PREVIEW_CHARS = 100
Progress = Callable[[int, "int | None"], None]


@dataclass(frozen=True)
class LongSample:
    index: int
    line: int | None
    tokens: int
    trained: int
    preview: str


#: How samples share a micro-batch (the `batching` knob; tuiwiz.planning.knobs.Batching).
BATCHINGS = ("padded", "packed", "padding_free")


@dataclass(frozen=True)
class CutoffStats:
    """What a given cutoff/micro-batch/batching choice means for this dataset."""

    cutoff: int
    micro_batch: int
    batching: str
    truncated: int  # samples longer than the cutoff
    truncated_frac: float
    trained_tokens_lost: int
    trained_lost_frac: float  # of all trained tokens, lost to truncation
    tokens_kept: int  # sum(min(len, cutoff))
    sequences: int  # packed rows (packed) or samples
    efficiency: float  # real tokens / token slots computed (1.0 = no padding): the slot efficiency
    padding_waste: float  # 1 - efficiency
    #: packed: real tokens / (rows x cutoff), how full trl's best-fit-decreasing rows are; else 1.0
    fill: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


@dataclass
class LengthProfile:
    """Token lengths of a dataset as the trainer will see them, and what they imply."""

    path: str
    layout: str
    tokenizer: str
    approximate: bool
    samples: int  # samples profiled
    skipped: int  # records left out (malformed, another layout, no assistant turn)
    skipped_examples: list[SkippedRow]  # the first few of them, in file order
    lengths: array  # total tokens per sample ('I')
    trained: array  # trained tokens per sample ('I')
    span_offsets: array  # per-sample start into span_flat ('Q'); len = samples + 1
    span_flat: array  # trained token spans, flattened [a0, b0, a1, b1, ...] ('I')
    longest: list[LongSample]
    percentile: float
    max_positions: int | None
    population: int | None = None  # samples seen when a uniform sample was profiled
    seed: int = 0
    counts: Counter = field(default_factory=Counter)
    stats: dict[str, float] = field(default_factory=dict)
    suggested_cutoff: int = 0
    percentile_ci: tuple[int, int] | None = None
    cutoff_stats: CutoffStats | None = None
    _order: array | None = None
    _slots: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.counts = Counter(self.lengths)
        n = self.samples
        st: dict[str, float] = {"count": n}
        if n:
            st["min"] = min(self.counts)
            st["max"] = max(self.counts)
            st["mean"] = sum(self.lengths) / n
            for p in PERCENTILES:
                st[f"p{p}"] = percentile_from_counts(self.counts, n, p)
            st["total_tokens"] = sum(self.lengths)
            st["trained_tokens"] = sum(self.trained)
        self.stats = st
        self.suggested_cutoff = round_cutoff(self.value_at(self.percentile), cap=self.max_positions) if n else 0

    # -------------------------------------------------------------- queries

    @property
    def first_skipped(self) -> SkippedRow | None:
        return self.skipped_examples[0] if self.skipped_examples else None

    def skipped_note(self) -> str | None:
        """One line for reports: how many records were left out, and the first one and why."""
        first = self.first_skipped
        if not self.skipped or first is None:
            return None
        rows = "record" if self.skipped == 1 else "records"
        return f"{self.skipped:,} {rows} skipped; first at {first.where()}: {first.reason}"

    def value_at(self, p: float) -> int:
        return percentile_from_counts(self.counts, self.samples, p)

    def histogram(self, bins: int = 30, upto: int | None = None) -> tuple[list[int], list[int]]:
        return histogram(self.counts, bins, upto)

    def trained_lost(self, cutoff: int) -> int:
        """Trained tokens at positions >= cutoff (exact, from the stored token spans)."""
        lost = 0
        lengths, offs, flat = self.lengths, self.span_offsets, self.span_flat
        for i, length in enumerate(lengths):
            if length <= cutoff:
                continue
            for j in range(offs[i], offs[i + 1], 2):
                a, b = flat[j], flat[j + 1]
                if b > cutoff:
                    lost += b - max(a, cutoff)
        return lost

    def _shuffled(self) -> array:
        # Trainers shuffle before batching; padding is estimated on one seeded shuffle.
        if self._order is None:
            order = list(range(self.samples))
            random.Random(self.seed).shuffle(order)
            self._order = array("I", order)
        return self._order

    def at_cutoff(self, cutoff: int, micro_batch: int = 1, batching: str = "padded") -> CutoffStats:
        """Truncation and slot efficiency at another cutoff, without re-tokenizing (for live edits).

        padded: each micro-batch is padded to its longest sample (trl pads to the batch, not to
        the cutoff), on one seeded shuffle. packed and padding_free are flattened by trl's collator
        into one row per micro-batch with no padding at all, so every slot is a real token;
        packed also reports how full its best-fit-decreasing rows are (`fill`).
        """
        if cutoff < 1:
            raise BadValue("cutoff_len", cutoff, "must be at least 1")
        if micro_batch < 1:
            raise BadValue("micro_batch_size", micro_batch, "must be at least 1")
        if batching not in BATCHINGS:
            raise BadValue("batching", batching, "choose one of " + ", ".join(BATCHINGS))
        n = self.samples
        truncated = sum(c for length, c in self.counts.items() if length > cutoff)
        kept = sum(min(length, cutoff) * c for length, c in self.counts.items())
        lost = self.trained_lost(cutoff) if truncated else 0
        trained_total = int(self.stats.get("trained_tokens", 0))
        sequences, slots, fill = n, kept, 1.0
        if batching == "packed":
            sequences = bfd_bins(self.counts, cutoff)
            fill = kept / (sequences * cutoff) if sequences else 1.0
        elif batching == "padded" and micro_batch > 1:
            slots = self._padded_slots(cutoff, micro_batch)
        eff = kept / slots if slots else 1.0
        return CutoffStats(
            cutoff=cutoff,
            micro_batch=micro_batch,
            batching=batching,
            truncated=truncated,
            truncated_frac=truncated / n if n else 0.0,
            trained_tokens_lost=lost,
            trained_lost_frac=lost / trained_total if trained_total else 0.0,
            tokens_kept=kept,
            sequences=sequences,
            efficiency=eff,
            padding_waste=1.0 - eff,
            fill=fill,
        )

    def _padded_slots(self, cutoff: int, micro_batch: int) -> int:
        """Token slots of padded micro-batches on the seeded shuffle (cached: the advisor and the
        planner's re-plans ask for the same few again and again)."""
        key = (cutoff, micro_batch)
        if key not in self._slots:
            lengths = self.lengths
            self._slots[key] = padded_tokens((lengths[i] for i in self._shuffled()), micro_batch, cutoff)
        return self._slots[key]

    def to_json(self) -> dict[str, Any]:
        """Plain data for JSON output and the planner; every key is always present (zero or None if unknown).

        `skipped_rows` is {"count", "first", "examples"}: `first` and each example are
        {"line", "row", "reason"} (line for text files, row for Parquet/Arrow; the other None).
        """
        st = self.stats
        cs = self.cutoff_stats
        edges, hist = self.histogram()
        out: dict[str, Any] = {
            "path": self.path,
            "layout": self.layout,
            "samples": self.samples,
            "skipped": self.skipped,
            "tokenizer": self.tokenizer,
            "approximate": self.approximate,
            "p50": st.get("p50", 0),
            "p95": st.get("p95", 0),
            "p99": st.get("p99", 0),
            "max": st.get("max", 0),
            "suggested_cutoff": self.suggested_cutoff,
            "truncated_at_cutoff": cs.truncated if cs else 0,
            "min": st.get("min", 0),
            "mean": round(st.get("mean", 0.0), 2),
            "p90": st.get("p90", 0),
            "p98": st.get("p98", 0),
            "percentile": self.percentile,
            "max_positions": self.max_positions,
            "total_tokens": st.get("total_tokens", 0),
            "trained_tokens": st.get("trained_tokens", 0),
            "at_cutoff": cs.to_json() if cs else None,
            "histogram": {"edges": edges, "counts": hist},
            "longest": [ls.__dict__ for ls in self.longest],
            "skipped_rows": {
                "count": self.skipped,
                "first": self.first_skipped.to_json() if self.first_skipped else None,
                "examples": [row.to_json() for row in self.skipped_examples],
            },
        }
        if self.approximate:
            out["note"] = APPROX_HINT
        if self.population is not None:
            out["sampled_from"] = self.population
            out["percentile_ci95"] = list(self.percentile_ci) if self.percentile_ci else None
        return out


# ------------------------------------------------------------------ the work


def _preview(sample: Sample) -> str:
    if sample.kind == "chat":
        msgs = sample.messages or []
        first = next((m for m in msgs if m["role"] == "user"), msgs[0] if msgs else {"content": ""})
        text = first.get("content") or ""
    elif sample.kind == "completion":
        text = sample.prompt or ""
    else:
        text = sample.text or ""
    text = " ".join(str(text).split())
    return text[:PREVIEW_CHARS] + ("…" if len(text) > PREVIEW_CHARS else "")


def _reservoir(samples: Iterable[Sample], k: int, seed: int, tick: Callable[[int], None]) -> tuple[list[Sample], int]:
    """Algorithm R: a uniform random k-subset of a stream of unknown length, in O(k) memory."""
    rng = random.Random(seed)
    keep: list[Sample] = []
    seen = 0
    for s in samples:
        seen += 1
        if len(keep) < k:
            keep.append(s)
        else:
            j = rng.randrange(seen)
            if j < k:
                keep[j] = s
        if not seen & 1023:
            tick(seen)
    keep.sort(key=lambda s: s.index)
    return keep, seen


def _chunks(it: Iterable[Sample], size: int) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for s in it:
        chunk.append(s)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_profile_args(percentile: float, sample: int | None) -> None:
    """Refuse a percentile outside PERCENTILE_RANGE and a sample size below 1 (BadValue)."""
    lo, hi = PERCENTILE_RANGE
    if not lo <= percentile <= hi:
        raise BadValue("percentile", percentile, f"must be between {lo:g} and {hi:g}")
    if sample is not None and sample < 1:
        raise BadValue("sample", sample, "must be a positive number of samples")


class _Watch:
    """Progress reports and cancellation checks, shared by every step of one profiling run."""

    def __init__(self, progress: Progress | None, cancel: threading.Event | None, report: ReadReport) -> None:
        self.progress, self.cancel, self.report = progress, cancel, report
        self.total: int | None = None  # known once sampled; else the reader's hint

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CancelledError("profiling cancelled")

    def tick(self, done: int) -> None:
        self.check()
        if self.progress:
            self.progress(done, self.total if self.total is not None else self.report.total_hint)


class _Tally:
    """Per-sample results in compact arrays (4-8 bytes a number) plus the top-k longest, whole."""

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self.lengths, self.trained = array("I"), array("I")
        self.span_offsets, self.span_flat = array("Q", [0]), array("I")
        self._heap: list[tuple[int, int, LongSample]] = []

    def add(self, sample: Sample, rendered: Rendered, enc: EncodingLike) -> None:
        n, t = len(enc), 0
        for a, b in token_spans(rendered, enc):
            self.span_flat.append(a)
            self.span_flat.append(b)
            t += b - a
        self.span_offsets.append(len(self.span_flat))
        self.lengths.append(n)
        self.trained.append(t)
        self._keep_if_long(sample, n, t)

    def _keep_if_long(self, sample: Sample, n: int, trained: int) -> None:
        heap = self._heap
        if self.top_k <= 0 or (len(heap) >= self.top_k and n <= heap[0][0]):
            return
        entry = (n, -sample.index, LongSample(sample.index, sample.line, n, trained, _preview(sample)))
        if len(heap) < self.top_k:
            heapq.heappush(heap, entry)
        else:
            heapq.heapreplace(heap, entry)

    def longest(self) -> list[LongSample]:
        return [e[2] for e in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]


def _select(stream: Iterator[Sample], sample: int | None, seed: int, watch: _Watch) -> tuple[Iterable[Sample], int | None]:
    """All samples, streamed; or a uniform reservoir of `sample` of them and the population size."""
    if sample is None:
        return stream, None
    kept, population = _reservoir(stream, sample, seed, watch.tick)
    watch.total = len(kept)
    return kept, population


def _render_chunk(chunk: list[Sample], tokenizer: CountingTokenizer, path: str) -> list[Rendered]:
    """Render a chunk; a conversation the template refuses is an error naming the file and line."""
    out = []
    for s in chunk:
        try:
            out.append(render_sample(s, tokenizer))
        except TemplateError as e:
            raise chat_error(s, tokenizer, e, path) from None
    return out


def _count(samples: Iterable[Sample], tokenizer: CountingTokenizer, path: str, tally: _Tally, watch: _Watch) -> None:
    """Render chunk i+1 while a second thread tokenizes chunk i (the Rust encoder releases the GIL)."""
    done = 0

    def collect(chunk: list[Sample], rendered: list[Rendered], fut: Future) -> None:
        nonlocal done
        for s, r, enc in zip(chunk, rendered, fut.result()):
            tally.add(s, r, enc)
        done += len(chunk)
        watch.tick(done)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuiwiz-encode") as pool:
        pending: tuple[list[Sample], list[Rendered], Future] | None = None
        for chunk in _chunks(samples, CHUNK):
            watch.check()
            rendered = _render_chunk(chunk, tokenizer, path)
            fut = pool.submit(encode_rendered, rendered, tokenizer)
            if pending is not None:
                collect(*pending)
            pending = (chunk, rendered, fut)
        if pending is not None:
            collect(*pending)
    watch.check()


def profile_dataset(
    dataset: Any,
    tokenizer: CountingTokenizer,
    *,
    percentile: float = 99,
    max_positions: int | None = None,
    micro_batch: int = 1,
    cutoff: int | None = None,
    batching: str = "padded",
    sample: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    strict: bool = False,
    top_k: int = 5,
    layout: str | None = None,
) -> LengthProfile:
    """Count every sample exactly as the trainer will see it and summarise.

    `dataset`: a DatasetRef or a path. `percentile` (PERCENTILE_RANGE) picks the suggested
    cutoff, rounded up to a multiple of 64 and capped at `max_positions` (default: the
    tokenizer's). `cutoff` (default: the suggestion) is what truncation and efficiency are
    reported at. `progress(done, total|None)` is called per chunk; `cancel.set()` stops with
    CancelledError. The chat template is compiled first, so a broken one is reported once,
    naming its file, before any row is read.
    """
    check_profile_args(percentile, sample)
    template_for(tokenizer)
    report, detected = ReadReport(), []
    path = str(getattr(dataset, "path", dataset))
    watch = _Watch(progress, cancel, report)
    stream = iter_conversations(dataset, layout=layout, strict=strict, report=report, detected=detected)
    samples, population = _select(stream, sample, seed, watch)
    tally = _Tally(top_k)
    _count(samples, tokenizer, path, tally, watch)
    prof = LengthProfile(
        path=path,
        layout=detected[0] if detected else (layout or "?"),
        tokenizer=tokenizer.name,
        approximate=tokenizer.approximate,
        samples=len(tally.lengths),
        skipped=report.skipped,
        skipped_examples=list(report.examples),
        lengths=tally.lengths,
        trained=tally.trained,
        span_offsets=tally.span_offsets,
        span_flat=tally.span_flat,
        longest=tally.longest(),
        percentile=percentile,
        max_positions=max_positions if max_positions is not None else tokenizer.max_positions,
        population=population,
        seed=seed,
    )
    if population is not None and prof.samples:
        prof.percentile_ci = percentile_ci(sorted(tally.lengths), percentile)
    prof.cutoff_stats = prof.at_cutoff(cutoff or prof.suggested_cutoff, micro_batch, batching)
    return prof
