"""A range of eigenpairs of a batch of symmetric matrices, from LAPACK's subset solver where it pays.

torch's ``eigh`` always computes every eigenvector (``syevd``). LAPACK's ``syevr`` with an index
range tridiagonalizes as well but computes and back-transforms only the requested vectors; torch
does not expose it, SciPy does. Measured on 2 cores (min of 7; SciPy's BLAS on one thread
unless noted):

=====  =======  =====  ===================  ==================
k      dtype    pairs  torch eigh (ms)      syevr subset (ms)
=====  =======  =====  ===================  ==================
256    float64  16     3.7                  2.9
256    float64  32     3.6                  4.5
384    float64  16     8.5 (median 16)      6.0
576    float64  36     21                   19
1024   float64  16     100                  85 (two threads: 46)
1024   float32  48     57                   39 (two threads)
=====  =======  =====  ===================  ==================

The subset pays while its share of the pairs is small: up to ``k/8`` in float32, ``k/16`` in float64.
"""

from __future__ import annotations

import torch

from ..blas_threads import blas_threads

# the subset solver from this k on (below it torch's eigh is as fast) for at most k / SUBSET_SHARE pairs
SUBSET_MIN_K = {torch.float32: 512, torch.float64: 256}
SUBSET_SHARE = {torch.float32: 8, torch.float64: 16}
# SciPy's OpenBLAS keeps its own threads, which spin after a call while torch's take the cores:
# below this k one thread is about as fast (float32 k = 512 9.9 against 9.1 ms, 768 22 against
# 18 ms) and leaves nothing spinning (svd_top at 512²: 12.8 ms median, 19 ms worst, against 18
# and 120 ms). In float64 the Gram products that follow suffer more: KPM's eigh factor at
# 2816×1024 took 217 ms median with one thread, 243–263 ms with two (45 against 85 ms alone).
BLAS_THREADS_MIN_K = {torch.float32: 1024, torch.float64: 2048}


def eigh_range(G: torch.Tensor, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(B, count)`` and eigenvectors ``(B, k, count)`` of the eigenvalues with ascending
    indices ``first … first + count − 1`` of symmetric ``G`` ``(B, k, k)`` (float32 or float64),
    ascending. Reads the upper triangle of ``G`` only.

    On the CPU with ``k ≥ SUBSET_MIN_K[dtype]`` and ``count ≤ k/SUBSET_SHARE[dtype]``: LAPACK's ``syevr`` for the
    range (SciPy), one matrix at a time; otherwise torch's ``eigh`` of all pairs, sliced.
    """
    k = G.shape[-1]
    if not 0 <= first <= first + count <= k or count < 1:
        raise ValueError(f"eigh_range: indices {first}…{first + count - 1} outside 0…{k - 1}")
    if G.device.type != "cpu" or k < SUBSET_MIN_K.get(G.dtype, k + 1) or SUBSET_SHARE[G.dtype] * count > k:
        values, vectors = torch.linalg.eigh(G, UPLO="U")
        return values[..., first : first + count], vectors[..., first : first + count]
    import scipy.linalg

    values = torch.empty(*G.shape[:-2], count, dtype=G.dtype)
    vectors = torch.empty(*G.shape[:-1], count, dtype=G.dtype)
    threads = torch.get_num_threads() if k >= BLAS_THREADS_MIN_K[G.dtype] else 1
    with blas_threads(threads):
        for b in range(G.shape[0]):
            # Gᵀ is G's upper triangle as a Fortran-ordered lower triangle: no copy on the way in
            val, vec = scipy.linalg.eigh(
                G[b].detach().numpy().T,
                lower=True,
                subset_by_index=(first, first + count - 1),
                driver="evr",
                check_finite=False,
            )
            values[b] = torch.from_numpy(val)
            vectors[b] = torch.from_numpy(vec)
    return values, vectors
