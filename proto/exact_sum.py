"""Double-double (about 106-bit) summation, so that sums do not depend on how terms are grouped.

A cohort may send partial sums instead of every client's values; the server then adds
partials. Plain float64 addition would give a result that depends on the grouping (cohort
size) and so would the whole run. Carrying each sum as an unevaluated pair ``hi + lo``
(Knuth's TwoSum keeps the rounding error of every addition) makes every grouping agree to
about 2^-100 relative, far below float64 resolution: after the final rounding to one float64
the results are identical, except in the vanishing case of an exact sum within 2^-100 of a
rounding boundary.
"""

from __future__ import annotations

import numpy as np

DD = tuple[np.ndarray, np.ndarray]  # (hi, lo)


def two_sum(a: np.ndarray, b: np.ndarray) -> DD:
    """a + b = s + e exactly (Knuth), elementwise."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


SEQUENTIAL_SIZE = 1024  # terms of at least this many elements are added one after another


def dd_sum(values: np.ndarray) -> DD:
    """Sum over axis 0 as a double-double pair: a pairwise tree with TwoSum at every level
    for many small terms; for large terms (d x d statistics), one term after another, TwoSum
    into ``hi`` and the exact rounding errors gathered in ``lo`` (in place: the tree's
    temporaries made a sum of 25 1000 x 1000 matrices 17 times slower). Either way the
    result is within about n 2^-106 of the exact sum, so groupings round alike."""
    hi = np.asarray(values, dtype=np.float64)
    if len(hi) == 0:
        zero = np.zeros(hi.shape[1:])
        return zero, zero.copy()
    if hi[0].size >= SEQUENTIAL_SIZE:
        return _dd_sum_sequential(hi)
    lo = np.zeros_like(hi)
    while len(hi) > 1:
        if len(hi) % 2:
            hi = np.concatenate([hi, np.zeros_like(hi[:1])])
            lo = np.concatenate([lo, np.zeros_like(lo[:1])])
        s, e = two_sum(hi[0::2], hi[1::2])
        hi, lo = two_sum(s, e + lo[0::2] + lo[1::2])
    return hi[0], lo[0]


def dd_add(a: DD, b: DD) -> DD:
    s, e = two_sum(a[0], b[0])
    return two_sum(s, e + a[1] + b[1])


def dd_value(a: DD) -> np.ndarray:
    """The pair rounded to float64."""
    return a[0] + a[1]


def _dd_sum_sequential(values: np.ndarray) -> DD:
    """``dd_sum`` one term at a time, in place: hi + (exact errors summed in lo)."""
    hi, lo = values[0].copy(), np.zeros_like(values[0])
    total, back, err = np.empty_like(hi), np.empty_like(hi), np.empty_like(hi)
    for v in values[1:]:  # TwoSum(hi, v) = total + err, exactly
        np.add(hi, v, out=total)
        np.subtract(total, hi, out=back)
        np.subtract(total, back, out=err)
        np.subtract(hi, err, out=err)
        np.subtract(v, back, out=back)
        np.add(err, back, out=err)
        np.add(lo, err, out=lo)
        hi, total = total, hi
    return two_sum(hi, lo)
