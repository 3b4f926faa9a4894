"""GPU suite module: NF4 quantize-and-pack, dequantize and the fused residual → NF4.

Called by ``bench/gpu_suite.py`` as ``run(device) -> list[dict]``; rows
``{kernel, shape, ours_ms, ref_ms, ratio, max_err, note}`` with ``ratio = ref_ms / ours_ms``
(> 1: ours faster). Not imported by the tests.

What it checks and times (Triton backend against bitsandbytes' CUDA kernels, in one process):

* ``nf4_quantize``: ``corda_kernels.nf4_quantize`` vs ``bitsandbytes.functional.quantize_4bit``
  (bf16 / fp16 / fp32 weights, blocksize 64, plain and double-quantized statistics).
  ``max_err`` = number of packed bytes + absmax entries (+ nested codes, offset, nested absmax)
  that differ: 0 means byte-exact. The note gives the fraction of the measured copy bandwidth
  (``torch.empty_like(x).copy_(x)``, bytes read + written, measured in the same run) that the
  Triton kernel reaches, counting the bytes it must move (weight read, nibbles + absmax written).
  Targets: ratio ≥ 1 and ≥ 70 % of copy bandwidth.
* ``nf4_quantize (torch path)``: our pure-torch implementation on CUDA tensors vs bitsandbytes
  (it uses an IEEE reciprocal where bitsandbytes' fast-math build uses ``rcp.approx``: codes may
  differ there, and only where the scaled value sits within rounding of a code boundary; each
  differing code is checked for that, and any other difference fails).
* ``nf4_dequantize``: vs ``bitsandbytes.functional.dequantize_4bit`` (``max_err`` = max abs diff).
* ``nf4_residual``: fused ``NF4(W − s·B·A)`` vs residual-then-quantize (``W.float() − s·(B @ A)`` in fp32,
  cast to W's dtype, then bitsandbytes' ``quantize_4bit``); ``max_err`` = fraction of 4-bit codes
  that differ. The summation order of the rank-r product differs, so a code may differ only where
  the value lies on a code boundary within that product's rounding bound: every differing code is
  checked for it (``_unexplained``) and any other difference fails. The note adds the dequantized
  relative error between the two. Target: ratio > 1.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:  # the suite's shared helpers (bench/_gpu_util.py)
    from _gpu_util import SMALL, guarded, rel_err, row, timeit
except ImportError:  # pragma: no cover - standalone use without the suite's helpers
    import statistics
    import time

    SMALL = os.environ.get("CORDA_GPU_SUITE_SMALL", "0") == "1"

    def timeit(fn, device: str, *, rep_ms: int = 100, min_reps: int = 3) -> float:  # noqa: ANN001
        if torch.device(device).type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
        fn()
        times = []
        for _ in range(max(min_reps, 3)):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
        ref64 = ref.double()
        return float((a.double() - ref64).norm() / ref64.norm())

    def row(kernel, shape, ours_ms=None, ref_ms=None, max_err=None, note=""):  # noqa: ANN001, ANN201
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

    def guarded(rows, label, fn):  # noqa: ANN001, ANN201
        import traceback

        import corda_kernels as ck

        try:
            rows.extend(fn())
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            rows.append(row(label, "-", note=f"ERROR {type(e).__name__}: {e}"[:300]))
        finally:
            ck.set_backend("auto")


BLOCKSIZE = 64
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _shapes() -> list[tuple[int, int]]:
    return [(256, 320)] if SMALL else [(4096, 4096), (4096, 11008)]


def _copy_gbs(x: torch.Tensor, device: str) -> float:
    """Copy bandwidth (GB/s, bytes read + written) of ``x``'s size, measured now."""
    ms = timeit(lambda: torch.empty_like(x).copy_(x), device)
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def _state_diffs(packed, state, ref_p, ref_s) -> int:  # noqa: ANN001
    """How many stored values differ between our (packed, state) and bitsandbytes'."""
    d = int((packed != ref_p).sum()) + int((state.absmax != ref_s.absmax).sum())
    if ref_s.nested:
        d += int(state.offset.float().item() != ref_s.offset.float().item())
        d += int((state.state2.absmax != ref_s.state2.absmax).sum())
    return d


def _codes(packed: torch.Tensor) -> torch.Tensor:
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 15], dim=1)


def _unexplained(values: torch.Tensor, absmax: torch.Tensor, ours: torch.Tensor, ref: torch.Tensor,
                 slack: torch.Tensor | float = 0.0) -> tuple[int, int]:  # fmt: skip
    """``(differing codes, differing codes not explained by rounding at a code boundary)``.

    ``values`` are the flattened float32 (or float64) values that were quantized, ``absmax`` the
    reference's per-block absmax, ``ours`` / ``ref`` the two 4-bit code sequences. A differing code is
    explained when the two codes are neighbours and the scaled value ``v/absmax`` lies within
    ``4 ulp(v) + slack/absmax`` of the midpoint between them: there an IEEE reciprocal and
    ``rcp.approx`` (or two summation orders of the value itself, ``slack`` bounding their spread)
    may round to either side. Anything else is a real difference.
    """
    from corda_kernels.ops.nf4 import NF4_LEVELS

    diff = (ours.reshape(-1) != ref.reshape(-1)).nonzero().flatten()
    if diff.numel() == 0:
        return 0, 0
    o, r = ours.reshape(-1)[diff].long(), ref.reshape(-1)[diff].long()
    block = values.numel() // absmax.numel() if absmax.numel() else 1
    a = absmax.reshape(-1).double()[diff // block]
    v = values.reshape(-1).double()[diff]
    levels = torch.as_tensor(NF4_LEVELS, dtype=torch.float64, device=v.device)
    mid = (levels[torch.minimum(o, r)] + levels[torch.maximum(o, r)]) / 2
    ulp = torch.finfo(torch.float32).eps * v.abs()
    sl = slack[diff].double() if isinstance(slack, torch.Tensor) else torch.full_like(v, float(slack))
    near = ((v / a - mid).abs() <= (4 * ulp + sl) / a) & ((o - r).abs() == 1)
    return int(diff.numel()), int((~near).sum())


def residual_code_diffs(W, B, A, s: float, absmax, packed, ref_packed) -> tuple[int, int]:  # noqa: ANN001
    """``(differing codes, differing codes not explained)`` between a fused ``NF4(W − s·B·A)`` and the
    unfused reference. The residual itself differs between the fused tile order and the GEMM by at
    most the rank-r product's rounding, γ_r·s·(|B|·|A|) per element, plus its cast to W's dtype."""
    r = B.shape[1]
    exact = W.double() - s * (B.double() @ A.double())
    u = torch.finfo(torch.float32).eps / 2  # both sides accumulate in fp32 (bf16 products are exact there)
    spread = (r * u / (1 - r * u)) * s * (B.double().abs() @ A.double().abs())
    spread += exact.abs() * torch.finfo(W.dtype).eps  # the cast of each side's residual to W's dtype
    return _unexplained(exact, absmax, _codes(packed), _codes(ref_packed), slack=spread.reshape(-1))


def _quantize_rows(device: str) -> list[dict[str, Any]]:
    import bitsandbytes.functional as F

    import corda_kernels as ck

    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for shape in _shapes():
        for name, dtype in DTYPES.items():
            if shape[1] > 4096 and name == "fp16":
                continue
            W = (torch.randn(shape, device=device, generator=g) * 0.02).to(dtype)
            label = f"{shape[0]}x{shape[1]} {name} bs{BLOCKSIZE}"
            copy_gbs = _copy_gbs(W, device)
            for compress in (False, True):
                ck.set_backend("triton")
                packed, state = ck.nf4_quantize(W, blocksize=BLOCKSIZE, compress_statistics=compress)
                ref_p, ref_s = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=compress)
                diffs = _state_diffs(packed, state, ref_p, ref_s)
                ours = timeit(
                    lambda W=W, c=compress: ck.nf4_quantize(W, blocksize=BLOCKSIZE, compress_statistics=c), device
                )
                ref = timeit(
                    lambda W=W, c=compress: F.quantize_4bit(
                        W, blocksize=BLOCKSIZE, quant_type="nf4", compress_statistics=c
                    ),
                    device,
                )
                moved = W.numel() * W.element_size() + W.numel() // 2 + 4 * W.numel() // BLOCKSIZE
                frac = moved / (ours * 1e-3) / 1e9 / copy_gbs
                status = "byte-exact" if diffs == 0 else f"FAIL {diffs} stored values differ from bitsandbytes"
                rows.append(
                    row(
                        "nf4_quantize" + (" +double-quant" if compress else ""),
                        label,
                        ours,
                        ref,
                        float(diffs),
                        f"{status}; {frac:.0%} of copy bandwidth ({copy_gbs:.4g} GB/s measured)",
                    )
                )
            if name == "fp32":
                # diagnostic: the same kernel with an IEEE 1/absmax instead of rcp.approx.ftz (says
                # which reciprocal bitsandbytes' build really uses; not a pass/fail row)
                from corda_kernels.kernels import nf4_triton

                nf4_triton.APPROX_RCP_ON_GPU = False
                try:
                    packed, _ = ck.nf4_quantize(W, blocksize=BLOCKSIZE)
                finally:
                    nf4_triton.APPROX_RCP_ON_GPU = True
                ref_p, _ = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4")
                d = int((_codes(packed) != _codes(ref_p)).sum())
                rows.append(
                    row(
                        "nf4_quantize (triton, IEEE 1/absmax)",
                        label,
                        None,
                        None,
                        float(d),
                        f"diagnostic: {d} codes differ from bitsandbytes with an IEEE reciprocal",
                    )
                )
            # the pure-torch path on the same tensor (IEEE reciprocal: rare neighbouring codes allowed)
            ck.set_backend("torch")
            packed, state = ck.nf4_quantize(W, blocksize=BLOCKSIZE)
            ref_p, ref_s = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4")
            d, bad = _unexplained(W.float(), ref_s.absmax, _codes(packed), _codes(ref_p))
            ok = bad == 0  # every differing code sits on a code boundary, within the reciprocal's rounding
            ours = timeit(lambda W=W: ck.nf4_quantize(W, blocksize=BLOCKSIZE), device)
            ref = timeit(lambda W=W: F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4"), device)
            rows.append(
                row(
                    "nf4_quantize (torch path)",
                    label,
                    ours,
                    ref,
                    float(d),
                    ("" if ok else "FAIL ")
                    + f"{d} codes differ, {bad} not at a code boundary (IEEE 1/absmax vs bitsandbytes' rcp.approx)",
                )
            )
    return rows


def _dequantize_rows(device: str) -> list[dict[str, Any]]:
    import bitsandbytes.functional as F

    import corda_kernels as ck

    rows = []
    g = torch.Generator(device=device).manual_seed(1)
    shape = _shapes()[0]
    for name in ("bf16", "fp32"):
        W = (torch.randn(shape, device=device, generator=g) * 0.02).to(DTYPES[name])
        ref_p, ref_s = F.quantize_4bit(W, blocksize=BLOCKSIZE, quant_type="nf4")
        ck.set_backend("triton")
        out = ck.nf4_dequantize(ref_p, ref_s)
        ref = F.dequantize_4bit(ref_p, ref_s, quant_type="nf4")
        err = float((out.float() - ref.float()).abs().max())
        ours_ms = timeit(lambda p=ref_p, st=ref_s: ck.nf4_dequantize(p, st), device)
        ref_ms = timeit(lambda p=ref_p, st=ref_s: F.dequantize_4bit(p, st, quant_type="nf4"), device)
        rows.append(
            row(
                "nf4_dequantize",
                f"{shape[0]}x{shape[1]} {name} bs{BLOCKSIZE}",
                ours_ms,
                ref_ms,
                err,
                "exact" if err == 0 else "FAIL differs from bitsandbytes",
            )
        )
    return rows


def _residual_rows(device: str) -> list[dict[str, Any]]:
    import bitsandbytes.functional as F

    import corda_kernels as ck
    from corda_kernels.ops.nf4 import residual

    rows = []
    g = torch.Generator(device=device).manual_seed(2)
    m, n = _shapes()[0]
    for name, ab_dtype, r in (("bf16", torch.float32, 64), ("bf16", torch.bfloat16, 64), ("fp32", torch.float32, 16)):
        W = (torch.randn(m, n, device=device, generator=g) * 0.02).to(DTYPES[name])
        B = (torch.randn(m, r, device=device, generator=g) * 0.01).to(ab_dtype)
        A = (torch.randn(r, n, device=device, generator=g) * 0.01).to(ab_dtype)
        s = 2.0

        def unfused(W=W, B=B, A=A, s=s):  # noqa: ANN001, ANN202
            return F.quantize_4bit(residual(W, B, A, s), blocksize=BLOCKSIZE, quant_type="nf4")

        ck.set_backend("triton")
        packed, state = ck.nf4_quantize_residual(W, B, A, s, blocksize=BLOCKSIZE)
        ref_p, ref_s = unfused()
        frac = float((_codes(packed) != _codes(ref_p)).float().mean())
        deq_err = rel_err(ck.nf4_dequantize(packed, state).float(), F.dequantize_4bit(ref_p, ref_s, quant_type="nf4"))
        d, bad = residual_code_diffs(W, B, A, s, ref_s.absmax, packed, ref_p)
        ours = timeit(lambda W=W, B=B, A=A, s=s: ck.nf4_quantize_residual(W, B, A, s, blocksize=BLOCKSIZE), device)
        ref = timeit(unfused, device)
        ok = bad == 0 and deq_err < 1e-3
        ab = "bf16 dot" if ab_dtype == torch.bfloat16 else "fp32 ieee dot"
        rows.append(
            row(
                "nf4_residual fused vs unfused",
                f"{m}x{n} W {name}, r={r} ({ab})",
                ours,
                ref,
                frac,
                ("" if ok else "FAIL ")
                + f"fraction of differing codes ({d}, {bad} not at a boundary within the product's rounding);"
                + f" dequantized rel. err {deq_err:.1e}",
            )
        )
    return rows


def run(device: str) -> list[dict[str, Any]]:
    """All NF4 rows for ``device`` (``cuda`` on the GPU; ``cpu`` only as an interpreter dry run)."""
    rows: list[dict[str, Any]] = []
    guarded(rows, "nf4_quantize", lambda: _quantize_rows(device))
    guarded(rows, "nf4_dequantize", lambda: _dequantize_rows(device))
    guarded(rows, "nf4_residual", lambda: _residual_rows(device))
    return rows


if __name__ == "__main__":  # pragma: no cover
    dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
    for r_ in run(dev):
        print(r_)
