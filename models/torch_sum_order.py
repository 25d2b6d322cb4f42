"""Float64 row sums in numpy, added in the order of torch's CPU ``sum(dim=-1)``, bit for bit.

Floating-point addition is not associative, so a numpy twin of a torch computation gives the
same bits only if it adds in torch's order. For a contiguous row of float64 values torch's CPU
kernel (``aten/src/ATen/native/cpu/SumKernel.cpp``: ``cascade_sum`` -> ``vectorized_inner_sum``)
adds like this (``n`` values, ``V = 4`` lanes: ``Vectorized<double>`` of the AVX2 kernel, which
torch also runs on AVX-512 machines; checked against torch in ``tests/model/test_host_baselines.py``):

1. The first ``4 * (n // 4)`` values form ``n // 4`` vectors of 4 lanes. The vectors are summed
   by ``row_sum`` with 4 accumulators (accumulator ``k`` takes vectors ``4 j + k``), each a
   running sum (``multi_row_sum``: from 16 terms on, in cascaded levels), lane by lane; vectors
   left over after the last group of 4 go to accumulator 0, then accumulator 0 adds 1, 2, 3.
2. A scalar starting at 0 adds the ``n % 4`` tail values in order, then the 4 lanes in order.
3. The output starts at 0 and adds that scalar.

Rows shorter than 4 go through the scalar ``row_sum`` (one value per step). Rows are
independent (torch's threads split rows, never a row, unless the whole reduction has one
output: then a row of >= 32768 values may be split; not reproduced).
"""

from __future__ import annotations

import numpy as np

__all__ = ["LANES", "torch_sums"]

#: Lanes of torch's ``Vectorized<double>`` in its CPU sum kernel.
LANES = 4
#: Accumulators of torch's ``row_sum`` (its ``ilp_factor``).
_ILP = 4
#: Cascade levels of torch's ``multi_row_sum``.
_LEVELS = 4


def _ceil_log2(x: int) -> int:
    return 0 if x <= 1 else int(x - 1).bit_length()


def _multi_row_sum(terms: np.ndarray) -> np.ndarray:
    """``multi_row_sum``: ``terms [size, ...]`` summed over axis 0 in torch's cascade order."""
    size = terms.shape[0]
    power = max(4, _ceil_log2(size) // _LEVELS)
    step, mask = 1 << power, (1 << power) - 1
    acc = [np.zeros(terms.shape[1:]) for _ in range(_LEVELS)]
    i = 0
    while i + step <= size:
        for _ in range(step):
            acc[0] += terms[i]
            i += 1
        for j in range(1, _LEVELS):
            acc[j] += acc[j - 1]
            acc[j - 1] = np.zeros(terms.shape[1:])
            if i & (mask << (j * power)):
                break
    while i < size:
        acc[0] += terms[i]
        i += 1
    for j in range(1, _LEVELS):
        acc[0] += acc[j]
    return acc[0]


def _row_sum(terms: np.ndarray) -> np.ndarray:
    """``row_sum``: ``terms [m, ...]`` (scalars or vectors) summed over axis 0 with 4 accumulators."""
    m = terms.shape[0]
    groups = m // _ILP
    part = _multi_row_sum(terms[: groups * _ILP].reshape(groups, _ILP, *terms.shape[1:]))  # [ILP, ...]
    total = part[0].copy()
    for i in range(groups * _ILP, m):
        total += terms[i]
    for k in range(1, _ILP):
        total += part[k]
    return total


def torch_sums(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sums of float64 ``x`` along ``axis``, bit for bit torch's CPU ``torch.from_numpy(x).sum(dim=axis)``
    where that axis is contiguous in torch (e.g. ``sum(dim=-1)`` of a contiguous tensor).

    Fastest when ``axis`` is the first axis of a C-contiguous ``x`` (every step adds whole
    contiguous slices): e.g. ``[n, N]``, the ``n`` terms of ``N`` sums.

    Returns:
        ``x``'s shape without ``axis``, float64.
    """
    terms = np.moveaxis(np.asarray(x, dtype=np.float64), axis, 0)
    n, rest = terms.shape[0], terms.shape[1:]
    if n < LANES:
        return 0.0 + _row_sum(terms)
    n_vec = n // LANES
    lanes = _row_sum(terms[: n_vec * LANES].reshape(n_vec, LANES, *rest))  # [LANES, ...]
    total = np.zeros(rest)
    for k in range(n_vec * LANES, n):
        total += terms[k]
    for lane in range(LANES):
        total += lanes[lane]
    return 0.0 + total
