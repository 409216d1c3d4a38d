"""Deterministic train/test/verification split.

Rows are ordered by a keyed hash of their canonical JSON (blake2b, keyed by the seed) and cut at exact counts.
So a row's split depends only on the set of rows and the seed, never on input order, and the counts are the
configured shares rounded by largest remainder. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from fractions import Fraction

SPLIT_NAMES = ("train", "test", "verification")


def split_counts(total: int, ratios: Sequence[float]) -> list[int]:
    """Rows per split: shares of `total` rounded by largest remainder, summing to `total`, each at least 1.

    Raises ValueError when there are fewer rows than splits or a ratio is not positive.
    """
    if any(not (r > 0) or math.isinf(r) for r in ratios):
        raise ValueError(f"ratios must be positive, got {list(ratios)}")
    if total < len(ratios):
        raise ValueError(f"cannot split {total} rows into {len(ratios)} non-empty splits")
    # Exact decimal arithmetic: 0.29 * 100 must be 29, not 28.999999999999996.
    shares = [Fraction(repr(float(r))) for r in ratios]
    scale = sum(shares)
    exact = [total * s / scale for s in shares]
    counts = [math.floor(x) for x in exact]
    leftover = total - sum(counts)
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    # Every split needs a row: take them from the largest split.
    for i, count in enumerate(counts):
        if count == 0:
            largest = max(range(len(counts)), key=lambda k: (counts[k], -k))
            counts[largest] -= 1
            counts[i] = 1
    return counts


def row_key(row: bytes, seed: int) -> bytes:
    """The sort key of a row: blake2b of its canonical JSON bytes, keyed by the seed."""
    return hashlib.blake2b(row, digest_size=16, key=_seed_key(seed)).digest()


def _seed_key(seed: int) -> bytes:
    """blake2b key bytes (at most 64) for a seed."""
    text = str(int(seed)).encode()
    return text if len(text) <= 64 else hashlib.sha512(text).digest()


def split_rows(rows: Sequence[bytes], ratios: Sequence[float], seed: int) -> list[list[bytes]]:
    """Split unique canonical rows into len(ratios) lists, each in hash order; raises ValueError as split_counts."""
    counts = split_counts(len(rows), ratios)
    key = _seed_key(seed)
    blake2b = hashlib.blake2b
    digests = [blake2b(r, digest_size=16, key=key).digest() for r in rows]
    # Sorting indices by digest is twice as fast as sorting the rows by a key function. Rows are unique,
    # so equal keys would need a 128-bit blake2b collision; only then would input order matter.
    order = sorted(range(len(rows)), key=digests.__getitem__)
    del digests
    out, start = [], 0
    for count in counts:
        out.append([rows[i] for i in order[start : start + count]])
        start += count
    return out
