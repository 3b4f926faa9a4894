"""The thread count of the BLAS libraries SciPy and NumPy bring (their own OpenBLAS builds).

torch computes with its own MKL and OpenMP threads; the LAPACK routines torch does not expose
(:func:`scipy.linalg.eigh` with an index subset) run on SciPy's OpenBLAS, whose pool defaults to
every core and spins after each call. :func:`blas_threads` sets that pool to a given size for a
block of code and restores it, through ``threadpoolctl`` (the library scikit-learn uses for this).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache


@lru_cache(maxsize=1)
def _controller():  # noqa: ANN202
    import scipy.linalg  # noqa: F401  (loads SciPy's OpenBLAS, so the controller sees it)
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with SciPy's / NumPy's BLAS limited to ``n ≥ 1`` threads."""
    if n < 1:
        raise ValueError(f"blas_threads: n must be ≥ 1, got {n}")
    with _controller().limit(limits=n):
        yield
