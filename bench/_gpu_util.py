"""Shared helpers of the GPU suite's modules (``bench/gpu_*.py``): timing, ceilings, errors.

Not itself a suite module (its name does not start with ``gpu_``). Every ``bench/gpu_*.py``
module exposes ``run(device: str) -> list[dict]`` with rows
``{kernel, shape, ours_ms, ref_ms, ratio, max_err, note}`` (``ratio`` = ref_ms / ours_ms, so
> 1 means ours is faster; a value may be None where it does not apply).

``CORDA_GPU_SUITE_SMALL=1`` shrinks every shape so the whole suite can be dry-run on the CPU
(``TRITON_INTERPRET=1 ... bench/gpu_suite.py --device cpu``): the Python flow is exercised,
the numbers mean nothing there.
"""

from __future__ import annotations

import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

SMALL = os.environ.get("CORDA_GPU_SUITE_SMALL", "0") == "1"


def sync(device: str) -> None:
    """Wait for the device's queued work (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: str, *, rep_ms: int = 100, min_reps: int = 3) -> float:
    """Median milliseconds of ``fn()``: device events via ``triton.testing.do_bench`` on CUDA (warm-up
    first, the L2 flushed between runs), a synchronized host clock elsewhere."""
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (compilation, allocation)
    times = []
    deadline = time.perf_counter() + rep_ms / 1000
    while len(times) < min_reps or time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1000)
        if len(times) >= 50:
            break
    return statistics.median(times)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ‖a − ref‖ / ‖ref‖ in float64 (NaN anywhere gives NaN)."""
    ref64 = ref.double()
    return float((a.double() - ref64).norm() / ref64.norm())


@functools.cache
def ceilings(device: str) -> dict[str, float]:
    """Measured matmul rates (TFLOP/s: bf16, fp32 with TF32 off, tf32) and copy bandwidth (GB/s,
    bytes read + written) of ``device``; measured once per process."""
    n = 512 if SMALL else 8192
    out: dict[str, float] = {}
    g = torch.Generator(device=device).manual_seed(0)
    for name, dtype, tf32 in (
        ("bf16_tflops", torch.bfloat16, False),
        ("fp32_tflops", torch.float32, False),
        ("tf32_tflops", torch.float32, True),
    ):
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ms = timeit(lambda a=a, b=b: a @ b, device)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
        out[name] = 2 * n**3 / (ms * 1e-3) / 1e12
    nbytes = (64 if SMALL else 2048) * 2**20
    src = torch.randn(nbytes // 4, device=device, generator=g)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device)
    out["copy_gbs"] = 2 * nbytes / (ms * 1e-3) / 1e9
    return out


def row(
    kernel: str,
    shape: str,
    ours_ms: float | None = None,
    ref_ms: float | None = None,
    max_err: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    """One result row in the suite's format (``ratio`` = ref_ms / ours_ms)."""
    ratio = ref_ms / ours_ms if ours_ms and ref_ms else None
    return {
        "kernel": kernel,
        "shape": shape,
        "ours_ms": ours_ms,
        "ref_ms": ref_ms,
        "ratio": ratio,
        "max_err": max_err,
        "note": note,
    }


def guarded(rows: list[dict[str, Any]], label: str, fn: Callable[[], list[dict[str, Any]]]) -> None:
    """Run one section of a suite module and extend ``rows`` with its rows; an exception becomes
    an ERROR row (traceback on stderr) so the other sections still run. Resets the backend."""
    import corda_kernels as ck

    try:
        rows.extend(fn())
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        rows.append(row(label, "-", note=f"ERROR {type(e).__name__}: {e}"[:300]))
    finally:
        ck.set_backend("auto")


def gram_reference(C0: torch.Tensor, x: torch.Tensor, mask=None, scale=None, bucket=None):  # noqa: ANN001, ANN201
    """float64 ``C0 + Σ_b s_b·X_bᵀX_b`` over unmasked tokens (per buffer ``bucket[b]``) and the
    elementwise bound of any fp32 evaluation of it: ``γ_{T+3}·(|C0| + Σ_b s_b·|X_b|ᵀ|X_b|)``.

    ``γ_m = m·u/(1 − m·u)`` with ``u = 2⁻²³``, the unit roundoff of truncating fp32 adds, so the bound
    holds for any accumulation order and rounding mode (tensor cores included), for rounded fp32
    products of fp32 inputs, and for the final add into ``C0``. A check passes when
    ``max |C − ref| / bound ≤ 1``: wrong indexing, lost tokens or precision loss beyond fp32 fail it.
    """
    xd = x.double()
    if mask is not None:
        xd = xd * mask.double().unsqueeze(-1)
    w = scale.double() if scale is not None else torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    ref, absref = C0.double().clone(), C0.double().abs()
    for b in range(x.shape[0]):
        prod, aprod = w[b] * (xd[b].T @ xd[b]), w[b] * (xd[b].abs().T @ xd[b].abs())
        if bucket is None:
            ref += prod
            absref += aprod
        else:
            ref[int(bucket[b])] += prod
            absref[int(bucket[b])] += aprod
    m = x.shape[0] * x.shape[1] + 3
    u = 2.0**-23
    return ref, m * u / (1 - m * u) * absref + torch.finfo(torch.float64).tiny


def bound_ratio(C: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> float:
    """``max |C − ref| / bound`` (NaN in C gives NaN, which fails any ``≤ 1`` check)."""
    return float(((C.double() - ref).abs() / bound).max())


def covariance_case(device: str, g: torch.Generator, dtype: torch.dtype, n: int, B: int, L: int, has_mask: bool,
                    has_scale: bool, K: int, strided: bool):  # noqa: ANN201  # fmt: skip
    """Fresh inputs of one covariance check: ``(x (B, L, n), mask, scale, bucket, C0)``; ``strided``
    gives an ``x`` whose token stride is 2 and whose feature stride is not 1; ``C0`` is symmetric."""
    if strided:
        x = torch.randn(B, n, 2 * L, device=device, generator=g).to(dtype)[:, :, ::2].transpose(1, 2)
    else:
        x = torch.randn(B, L, n, device=device, generator=g).to(dtype)
    mask = torch.rand(B, L, device=device, generator=g) > 0.3 if has_mask else None
    scale = torch.rand(B, device=device, generator=g) + 0.5 if has_scale else None
    bucket = torch.randint(0, K, (B,), device=device, generator=g) if K > 1 else None
    C0 = torch.randn(*((K,) if K > 1 else ()), n, n, device=device, generator=g)
    return x, mask, scale, bucket, C0 + C0.transpose(-1, -2)
