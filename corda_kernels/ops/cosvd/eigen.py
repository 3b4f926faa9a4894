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

SciPy's Python wrapper holds the GIL through the LAPACK call, so a batch would run one matrix at
a time on one core. The routine is called instead through the function pointer SciPy exports for
Cython (``scipy.linalg.cython_lapack``, the route numba takes), which ``ctypes`` calls with the GIL
released: the matrices of a batch are solved on ``torch.get_num_threads()`` threads, one BLAS
thread each (k = 384, four matrices: 26 → 14 ms on 2 cores), with the very arguments SciPy's
``eigh(driver="evr", subset_by_index=…)`` passes (the results are bit for bit SciPy's).
"""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
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
    range, the matrices on ``torch.get_num_threads()`` threads with one BLAS thread each (one matrix at
    a time on all of them from ``BLAS_THREADS_MIN_K``); otherwise torch's ``eigh`` of all pairs, sliced.
    """
    k = G.shape[-1]
    if not 0 <= first <= first + count <= k or count < 1:
        raise ValueError(f"eigh_range: indices {first}…{first + count - 1} outside 0…{k - 1}")
    if G.device.type != "cpu" or k < SUBSET_MIN_K.get(G.dtype, k + 1) or SUBSET_SHARE[G.dtype] * count > k:
        values, vectors = torch.linalg.eigh(G, UPLO="U")
        return values[..., first : first + count], vectors[..., first : first + count]
    values = torch.empty(*G.shape[:-2], count, dtype=G.dtype)
    vectors = torch.empty(*G.shape[:-1], count, dtype=G.dtype)
    flat = G.detach().reshape(-1, k, k)
    threads = torch.get_num_threads() if k >= BLAS_THREADS_MIN_K[G.dtype] else 1

    def solve(b: int) -> None:
        # Gᵀ is G's upper triangle as a Fortran-ordered lower triangle; syevr overwrites its input
        val, vec = _syevr(np.array(flat[b].numpy().T, order="F"), first, count)
        values.view(-1, count)[b] = torch.from_numpy(val)
        vectors.view(-1, k, count)[b] = torch.from_numpy(vec)

    workers = min(flat.shape[0], torch.get_num_threads()) if threads == 1 else 1
    with blas_threads(threads):
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(solve, range(flat.shape[0])))
        else:
            for b in range(flat.shape[0]):
                solve(b)
    return values, vectors


_CTYPES = {np.dtype(np.float64): ("dsyevr", ctypes.c_double), np.dtype(np.float32): ("ssyevr", ctypes.c_float)}


@lru_cache(maxsize=2)
def _routine(name: str):  # noqa: ANN202
    """LAPACK's ``name`` from SciPy's Cython exports, as a ctypes function (GIL released during the call)."""
    from scipy.linalg import cython_lapack

    capsule = cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 21)(get_pointer(capsule, get_name(capsule)))


def _syevr(a: np.ndarray, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenpairs ``first … first + count − 1`` (ascending, 0-based) of the symmetric ``a`` ``(k, k)``
    (Fortran order, lower triangle read, overwritten) by LAPACK's ``?syevr``: ``(count,)``, ``(k, count)``."""
    name, real = _CTYPES[a.dtype]
    fn = _routine(name)
    k = a.shape[0]
    ref = ctypes.byref

    def ptr(x: np.ndarray) -> ctypes.c_void_p:
        return x.ctypes.data_as(ctypes.c_void_p)

    jobz, rng, uplo = ctypes.c_char(b"V"), ctypes.c_char(b"I"), ctypes.c_char(b"L")
    n, il, iu = ctypes.c_int(k), ctypes.c_int(first + 1), ctypes.c_int(first + count)
    vl, vu, abstol = real(0.0), real(1.0), real(0.0)  # SciPy's defaults; vl, vu unused for an index range
    found, info = ctypes.c_int(0), ctypes.c_int(0)
    w = np.empty(k, dtype=a.dtype)
    z = np.empty((k, count), dtype=a.dtype, order="F")
    isuppz = np.empty(2 * max(1, count), dtype=np.int32)

    def call(work: np.ndarray, lwork: int, iwork: np.ndarray, liwork: int) -> None:
        fn(ref(jobz), ref(rng), ref(uplo), ref(n), ptr(a), ref(n), ref(vl), ref(vu), ref(il), ref(iu), ref(abstol),
           ref(found), ptr(w), ptr(z), ref(n), ptr(isuppz), ptr(work), ref(ctypes.c_int(lwork)), ptr(iwork),
           ref(ctypes.c_int(liwork)), ref(info))  # fmt: skip

    work, iwork = np.empty(1, dtype=a.dtype), np.empty(1, dtype=np.int32)
    call(work, -1, iwork, -1)  # workspace query
    lwork, liwork = int(work[0]), int(iwork[0])
    call(np.empty(lwork, dtype=a.dtype), lwork, np.empty(liwork, dtype=np.int32), liwork)
    if info.value != 0 or found.value != count:
        raise RuntimeError(
            f"LAPACK {name} failed on a {k}×{k} matrix (info {info.value}, {found.value} of {count} pairs found)"
        )
    return w[:count], z
