"""The tracer's per-tensor sums in one compiled pass (numba), for parameters on the CPU.

:class:`reprokit.flatsums.FlatSums` gets its sums from a dozen torch ops over flat rows: each op
reads and writes whole rows, so a traced step moves ~27 rows' worth of memory, and right after a
training step that memory is out of cache. These loops read θ_t, θ_{t−1} and g once and write
nothing but the sums, which cuts a traced step's cost by about a third (README, Benchmarks). Each sum is
accumulated in float64, one element after the other (no fast-math: nothing is reordered), so the
bits do not depend on the machine's vector width, and Σ|θ| and Σθ² come out the same in both
functions. Compiled on first use and cached next to this file (``cache=True``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def traced_sums(theta: np.ndarray, prev: np.ndarray, grad: np.ndarray, bounds: np.ndarray,
                out: np.ndarray) -> None:
    """Per tensor ``i`` (elements ``bounds[i, 0]:bounds[i, 1]`` of the flat rows) into ``out[:, i]``:
    Σ|g·θ_{t−1}|, Σ|Δθ|, Σ|θ_t|, ΣΔθ², Σθ_t², Σg²."""
    for i in range(bounds.shape[0]):
        saliency = moved = size = moved2 = size2 = grad2 = 0.0
        for j in range(bounds[i, 0], bounds[i, 1]):
            t, p, g = np.float64(theta[j]), np.float64(prev[j]), np.float64(grad[j])
            d = t - p
            saliency += abs(g * p)
            moved += abs(d)
            size += abs(t)
            moved2 += d * d
            size2 += t * t
            grad2 += g * g
        out[0, i], out[1, i], out[2, i] = saliency, moved, size
        out[3, i], out[4, i], out[5, i] = moved2, size2, grad2


@njit(cache=True, nogil=True)
def norms(theta: np.ndarray, bounds: np.ndarray, out: np.ndarray) -> None:
    """Per tensor Σ|θ| and Σθ² into ``out[0, i]`` and ``out[1, i]``, as :func:`traced_sums` sums them."""
    for i in range(bounds.shape[0]):
        size = size2 = 0.0
        for j in range(bounds[i, 0], bounds[i, 1]):
            t = np.float64(theta[j])
            size += abs(t)
            size2 += t * t
        out[0, i], out[1, i] = size, size2
