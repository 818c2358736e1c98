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


def dd_sum(values: np.ndarray) -> DD:
    """Sum over axis 0 as a double-double pair (pairwise tree, TwoSum at every level)."""
    hi = np.asarray(values, dtype=np.float64)
    if len(hi) == 0:
        zero = np.zeros(hi.shape[1:])
        return zero, zero.copy()
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
