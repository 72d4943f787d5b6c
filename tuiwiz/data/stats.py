"""Length statistics that work on compact data: a Counter of distinct lengths (percentiles,
histogram), arrays of per-sample lengths (padding), and trl's best-fit-decreasing packing
computed on counts of lengths, so even a million samples stay cheap to re-evaluate.
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import Counter
from typing import Iterable, Sequence

PERCENTILES = (50, 90, 95, 98, 99)
#: The percentiles a suggested cutoff may be taken at (inclusive): below 95 truncates too
#: much to be a sensible default, and above 99 the nearest rank is the longest outliers.
PERCENTILE_RANGE = (95.0, 99.0)


def percentile_from_counts(counts: Counter[int], n: int, p: float) -> int:
    """Nearest-rank percentile: the smallest length L with at least p% of samples <= L.

    So a cutoff >= p99 truncates at most 1% of samples."""
    if n <= 0:
        return 0
    rank = max(1, math.ceil(p / 100.0 * n))
    seen = 0
    for length in sorted(counts):
        seen += counts[length]
        if seen >= rank:
            return length
    return max(counts)


def round_cutoff(value: int, multiple: int = 64, cap: int | None = None) -> int:
    """Round up to a multiple of 64 (GPU-friendly), never above the model's max positions."""
    rounded = max(multiple, -(-value // multiple) * multiple)
    if cap is not None and rounded > cap:
        return cap
    return rounded


def percentile_ci(sorted_values: Sequence[int], p: float, confidence: float = 0.95) -> tuple[int, int]:
    """Distribution-free CI for the population p-th percentile from a uniform sample.

    The rank of the true percentile among n samples is Binomial(n, p); we take the order
    statistics at np -+ z*sqrt(np(1-p)) (normal approximation, +1 on the upper side for
    the discrete rank), as in Conover, Practical Nonparametric Statistics."""
    n = len(sorted_values)
    if n == 0:
        return 0, 0
    q = p / 100.0
    z = {0.9: 1.6449, 0.95: 1.96, 0.99: 2.5758}.get(confidence, 1.96)
    half = z * math.sqrt(n * q * (1 - q))
    lo = max(1, math.floor(n * q - half))
    hi = min(n, math.ceil(n * q + half) + 1)
    return sorted_values[lo - 1], sorted_values[hi - 1]


def histogram(counts: Counter[int], bins: int = 30, upto: int | None = None) -> tuple[list[int], list[int]]:
    """(edges, counts): `bins` equal-width bins from 0 to `upto` (default: the max length);
    lengths above `upto` land in the last bin. len(edges) == bins + 1."""
    if not counts:
        return [0] * (bins + 1), [0] * bins
    top = max(upto or max(counts), 1)
    width = max(1, -(-top // bins))
    edges = [i * width for i in range(bins + 1)]
    out = [0] * bins
    for length, c in counts.items():
        out[min(length // width, bins - 1)] += c
    return edges, out


def bfd_bins(lengths: Counter[int], capacity: int) -> int:
    """Number of packed sequences trl's `pack_dataset(strategy="bfd")` makes at this length.

    Same algorithm (sequences truncated to `capacity`, longest first, each into the bin with
    the least space that still fits it), run on counts: bins with equal remaining space are
    interchangeable, so we track how many bins have each remaining space."""
    space_count: dict[int, int] = {}
    spaces: list[int] = []  # sorted distinct remaining spaces with count > 0
    n_bins = 0
    trunc: Counter[int] = Counter()
    for length, c in lengths.items():
        if length > 0:
            trunc[min(length, capacity)] += c
    for length in sorted(trunc, reverse=True):
        k = trunc[length]
        while k:
            i = bisect_left(spaces, length)
            if i < len(spaces):
                s = spaces[i]
                # if the bin still fits another item of this length after this one, best fit
                # puts the next item there too: place one at a time; else fill m bins at once
                m = 1 if s - length >= length else min(k, space_count[s])
                space_count[s] -= m
                if not space_count[s]:
                    del space_count[s]
                    spaces.pop(i)
                k -= m
                rest = s - length
            else:
                rest = capacity - length
                if rest < length:  # the next items of this length cannot share: open k bins at once
                    m = k
                else:
                    m = 1
                n_bins += m
                k -= m
            if rest > 0:
                if rest not in space_count:
                    space_count[rest] = 0
                    insort(spaces, rest)
                space_count[rest] += m
    return n_bins


def padded_tokens(lengths: Iterable[int], micro_batch: int, cutoff: int) -> int:
    """Token slots when batches of `micro_batch` consecutive samples are padded to their longest."""
    total = 0
    batch_max = 0
    in_batch = 0
    for length in lengths:
        length = length if length < cutoff else cutoff
        if length > batch_max:
            batch_max = length
        in_batch += 1
        if in_batch == micro_batch:
            total += batch_max * in_batch
            batch_max = in_batch = 0
    if in_batch:
        total += batch_max * in_batch
    return total
