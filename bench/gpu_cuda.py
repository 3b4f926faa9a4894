"""GPU suite module: the compiled CUDA kernels of ``csrc/`` (the ``cuda`` backend).

Correctness first, on fresh random inputs, then timings side by side with the Triton kernels, the
torch path and bitsandbytes, in one process:

* ``nf4_quantize`` (with and without double quantization) and ``nf4_dequantize`` against
  bitsandbytes' CUDA kernels, byte for byte, over dtypes, blocksizes and odd sizes; on fp32 the
  three reciprocals bitsandbytes' build might use (``rcp.approx.ftz``, IEEE, ``div.full``) are
  each counted against it, and any differing element is printed;
* the fused ``nf4_quantize_residual`` against the residual then bitsandbytes (codes may differ
  only on a code boundary within the rank-r product's rounding, as ``bench/gpu_nf4.py`` checks);
* ``covariance_update`` against float64 on odd shapes, masks, scales, buckets, strided and fp16
  inputs: every element within the fp32 accumulation bound ``γ_{T+1}·(|X|ᵀ|X| + |C0|)``
  (``err/bound`` ≤ 1), the strict lower triangle untouched;
* the damping check ``‖C_fix·C_inv − I‖_F`` against float64, and the ``damped_inverse`` search
  with it against the torch rule's damps.

Run by ``bench/gpu_suite.py`` (which builds the extension first with ``--build``).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _gpu_util import (  # noqa: E402
    SMALL,
    bound_ratio,
    ceilings,
    covariance_case,
    gram_reference,
    guarded,
    rel_err,
    row,
    timeit,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _compiled():  # noqa: ANN202
    from corda_kernels.kernels import compiled

    if not compiled.WITH_CUDA:
        raise RuntimeError(f"the CUDA extension is not loaded ({compiled.LOAD_ERROR or 'built without CUDA'})")
    return compiled


def _nf4_rows(device: str) -> list[dict[str, Any]]:
    import bitsandbytes.functional as F
    from gpu_nf4 import _codes, _state_diffs, _unexplained

    import corda_kernels as ck

    comp = _compiled()
    rows = []
    g = torch.Generator(device=device).manual_seed(10)
    # correctness sweep: dtypes × blocksizes × odd sizes, single and double quantization
    sizes = [(1, 1), (3, 37), (129, 255), (1000, 333)] + ([] if SMALL else [(4096, 4096)])
    bad, cases = [], 0
    for name, dtype in DTYPES.items():
        for bs in (64, 128, 256, 1024, 4096) if not SMALL else (64,):
            for shape in sizes:
                W = (torch.randn(shape, device=device, generator=g) * 0.02).to(dtype)
                for compress in (False, True):
                    ck.set_backend("cuda")
                    p, s = ck.nf4_quantize(W, blocksize=bs, compress_statistics=compress)
                    rp, rs = F.quantize_4bit(W, blocksize=bs, quant_type="nf4", compress_statistics=compress)
                    cases += 1
                    d = _state_diffs(p, s, rp, rs)
                    if d:
                        # codes that differ only on a code boundary (the scaled value within 4 ulp of
                        # the midpoint between two levels), with equal statistics, are reported apart
                        am = F.quantize_4bit(W, blocksize=bs, quant_type="nf4")[1].absmax  # fp32, unnested
                        d_codes, unexplained = _unexplained(W.float(), am, _codes(p), _codes(rp))
                        tag = "boundary" if unexplained == 0 and d_codes == d else "bad"
                        bad.append(f"{tag}: {name} {shape} bs{bs}{' dq' if compress else ''}: {d}")
                    if not compress:
                        out = ck.nf4_dequantize(rp, rs)
                        ref = F.dequantize_4bit(rp, rs, quant_type="nf4")
                        if not torch.equal(out, ref):
                            bad.append(f"dequant {name} {shape} bs{bs}")
    ck.set_backend("auto")
    real = [b for b in bad if not b.startswith("boundary")]
    if real:
        note = f"FAIL {len(real)} cases differ: " + "; ".join(real[:4])
    elif bad:
        note = f"byte-exact except {len(bad)} cases with codes on a code boundary: " + "; ".join(bad[:3])
    else:
        note = "byte-exact"
    rows.append(row("cuda nf4 quantize/dequantize vs bnb", f"{cases} cases", max_err=float(len(bad)), note=note))
    if bad:
        print("\n".join(bad), file=sys.stderr)

    # which reciprocal bitsandbytes' build uses: count differing codes for each of ours (fp32)
    n = 512 if SMALL else 4096
    W = torch.randn(n, n, device=device, generator=g)
    rp, rs = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    counts = {}
    for mode, label in ((0, "rcp.approx.ftz"), (1, "IEEE"), (2, "div.full.ftz"), (3, "rcp.rz")):
        p, a = torch.ops.corda_kernels_C.nf4_quantize(W, 64, True, mode)
        diff = (_codes(p) != _codes(rp)).reshape(-1).nonzero().flatten()
        counts[label] = int(diff.numel()) + int((a != rs.absmax).sum())
        ours_c, ref_c = _codes(p).reshape(-1), _codes(rp).reshape(-1)
        for i in diff[:3].tolist():  # flat element indices
            v, am = float(W.reshape(-1)[i]), float(rs.absmax[i // 64])
            msg = f"value {v!r} absmax {am!r} scaled {v / am!r} ours {int(ours_c[i])} bnb {int(ref_c[i])}"
            print(f"recip {label}: element {i}: {msg}", file=sys.stderr)
    best = min(counts, key=counts.get)
    rows.append(
        row(
            "cuda nf4 reciprocal vs bnb",
            f"{n}x{n} fp32 bs64",
            max_err=float(counts[best]),
            note="diagnostic: differing values per reciprocal: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + f"; in use: mode {comp.RECIP_MODE_ON_GPU}",
        )
    )

    # timings: NF4 pack and dequantize of a 4096 × 11008 weight, cuda vs triton vs bitsandbytes
    m, k = (256, 512) if SMALL else (4096, 11008)
    copy_gbs = ceilings(device)["copy_gbs"]
    for name in ("bf16", "fp32"):
        W = (torch.randn(m, k, device=device, generator=g) * 0.02).to(DTYPES[name])
        moved = W.numel() * W.element_size() + W.numel() // 2 + 4 * W.numel() // 64
        ref = timeit(lambda W=W: F.quantize_4bit(W, blocksize=64, quant_type="nf4"), device)
        times = {}
        for b in ("cuda", "triton"):
            ck.set_backend(b)
            times[b] = timeit(lambda W=W: ck.nf4_quantize(W, blocksize=64), device)
        ck.set_backend("auto")
        rows.append(
            row(
                "cuda nf4_quantize (pack)",
                f"{m}x{k} {name} bs64",
                times["cuda"],
                ref,
                note=f"ref: bitsandbytes; {moved / (times['cuda'] * 1e-3) / 1e9 / copy_gbs:.0%} of copy bandwidth; "
                f"triton {times['triton']:.3g} ms",
            )
        )
        rp, rs = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
        ref = timeit(lambda rp=rp, rs=rs: F.dequantize_4bit(rp, rs, quant_type="nf4"), device)
        for b in ("cuda", "triton"):
            ck.set_backend(b)
            times[b] = timeit(lambda rp=rp, rs=rs: ck.nf4_dequantize(rp, rs), device)
        ck.set_backend("auto")
        rows.append(
            row(
                "cuda nf4_dequantize",
                f"{m}x{k} {name} bs64",
                times["cuda"],
                ref,
                note=f"ref: bitsandbytes; triton {times['triton']:.3g} ms",
            )  # fmt: skip
        )
    return rows


def _residual_rows(device: str) -> list[dict[str, Any]]:
    import bitsandbytes.functional as F
    from gpu_nf4 import residual_code_diffs

    import corda_kernels as ck
    from corda_kernels.ops.nf4 import residual

    _compiled()
    rows = []
    g = torch.Generator(device=device).manual_seed(11)
    shapes = [(300, 129, 7), (4096, 11008, 64)] if not SMALL else [(300, 129, 7), (256, 512, 16)]
    for (m, n, r), name in zip(shapes, ("fp32", "bf16")):
        W = (torch.randn(m, n, device=device, generator=g) * 0.02).to(DTYPES[name])
        B = torch.randn(m, r, device=device, generator=g) * 0.01
        A = torch.randn(r, n, device=device, generator=g) * 0.01
        s = 2.0

        def unfused(W=W, B=B, A=A, s=s):  # noqa: ANN001, ANN202
            return F.quantize_4bit(residual(W, B, A, s), blocksize=64, quant_type="nf4")

        ck.set_backend("cuda")
        packed, state = ck.nf4_quantize_residual(W, B, A, s, blocksize=64)
        ref_p, ref_s = unfused()
        d, bad = residual_code_diffs(W, B, A, s, ref_s.absmax, packed, ref_p)
        deq = rel_err(ck.nf4_dequantize(packed, state).float(), F.dequantize_4bit(ref_p, ref_s, quant_type="nf4"))
        ours = timeit(lambda W=W, B=B, A=A, s=s: ck.nf4_quantize_residual(W, B, A, s, blocksize=64), device)
        ck.set_backend("triton")
        tri = timeit(lambda W=W, B=B, A=A, s=s: ck.nf4_quantize_residual(W, B, A, s, blocksize=64), device)
        ck.set_backend("auto")
        ref = timeit(unfused, device)
        ok = bad == 0 and deq < 1e-3
        rows.append(
            row(
                "cuda nf4_residual fused vs unfused",
                f"{m}x{n} W {name}, r={r}",
                ours,
                ref,
                float(d),
                ("pass" if ok else "FAIL")
                + f": {d} codes differ, {bad} not on a boundary; dequantized rel. err {deq:.1e}; triton {tri:.3g} ms",
            )
        )
    return rows


def _covariance_rows(device: str) -> list[dict[str, Any]]:
    import corda_kernels as ck

    comp = _compiled()
    rows = []
    g = torch.Generator(device=device).manual_seed(12)
    cases = [  # dtype, n, B, L, mask, scale, K, strided
        (torch.bfloat16, 576, 4, 300, True, True, 1, False),
        (torch.bfloat16, 1031, 3, 257, False, False, 1, True),
        (torch.float16, 130, 5, 129, True, False, 3, False),
        (torch.bfloat16, 700, 6, 200, False, True, 5, False),
        (torch.bfloat16, 37, 2, 1000, True, True, 1, False),
    ]
    for dtype, n, B, L, has_mask, has_scale, K, strided in cases:
        if SMALL:
            n, L = min(n, 70), min(L, 40)
        x, mask, scale, bucket, C0 = covariance_case(device, g, dtype, n, B, L, has_mask, has_scale, K, strided)
        ref, bound = gram_reference(C0, x, mask, scale, bucket)
        for upper in (False, True):
            C = C0.clone()
            if upper:
                C.masked_fill_(~torch.ones(n, n, dtype=torch.bool, device=device).triu(), float("nan"))
            ck.set_backend("cuda")
            ck.covariance_update(C, x, mask=mask, seq_scale=scale, seq_bucket=bucket, upper_only=upper)
            ck.set_backend("auto")
            keep = torch.ones(n, n, dtype=torch.bool, device=device).triu() if upper else torch.ones(
                n, n, dtype=torch.bool, device=device)  # fmt: skip
            keep = keep.expand_as(C)
            ratio = bound_ratio(C[keep], ref[keep], bound[keep])
            lower_ok = bool(torch.isnan(C[~keep]).all()) if upper else True
            ok = ratio <= 1 and lower_ok and bool(torch.isfinite(C[keep]).all())
            flags = "+".join(f for f, on in (("mask", has_mask), ("scale", has_scale), ("upper", upper)) if on)
            shape = f"{str(dtype)[6:]} n={n} B={B} L={L} K={K}" + (" strided" if strided else "")
            rows.append(
                row(
                    "cuda covariance check",
                    shape,
                    max_err=rel_err(C[keep], ref[keep]),
                    note=f"{'pass' if ok else 'FAIL'} ({flags or 'plain'}): err/bound {ratio:.2g}"
                    + ("" if lower_ok else ", strict lower WRITTEN"),
                )  # fmt: skip
            )

    # timings: n = 4096 and 11008, 16k bf16 tokens, upper triangle (the collector's call)
    for n in (256,) if SMALL else (4096, 11008):
        T = 512 if SMALL else 16384
        x = torch.randn(16, T // 16, n, device=device, generator=g).to(torch.bfloat16)
        C = torch.zeros(n, n, device=device)

        def ref_fn(x=x, C=C):  # noqa: ANN001, ANN202
            xf = x.reshape(-1, x.shape[-1]).float()
            C.addmm_(xf.T, xf)

        ref = timeit(ref_fn, device)
        times = {}
        for b in ("cuda", "triton", "torch"):
            ck.set_backend(b)
            times[b] = timeit(lambda x=x, C=C: ck.covariance_update(C, x, upper_only=True), device)
        ck.set_backend("auto")
        flops = n * n * T * (1 + 64 / n)  # upper tiles
        rate = flops / (times["cuda"] * 1e-3) / 1e12
        rows.append(
            row(
                "cuda covariance (triangle)",
                f"bf16 n={n} T={T}",
                times["cuda"],
                ref,
                note=f"ref: x.float().T@x; {rate:.0f} TFLOP/s ({rate / ceilings(device)['bf16_tflops']:.0%} of bf16 "
                f"rate); triton {times['triton']:.3g} ms, torch backend {times['torch']:.3g} ms; "
                f"splits {comp.covariance_splits(n, 1, T, x.device)}",
            )
        )
    return rows


def _damping_rows(device: str) -> list[dict[str, Any]]:
    import corda_kernels as ck
    from corda_kernels.kernels.damping_triton import residual_norm as triton_residual
    from corda_kernels.ops.damping import _identity_residual

    comp = _compiled()
    rows = []
    g = torch.Generator(device=device).manual_seed(13)
    for B, n in ((3, 1031), (4, 4096)) if not SMALL else ((2, 70),):
        X = torch.randn(B, n, n + 64, device=device, generator=g)
        C = X @ X.transpose(1, 2) / n
        inv = torch.linalg.inv(C)
        val = comp.residual_norm(C, inv)
        P = C.double() @ inv.double()
        P.diagonal(dim1=-2, dim2=-1).sub_(1)
        ref = torch.linalg.matrix_norm(P)
        # fp32 dots of length n: |error| ≤ γ_n·(|C|·|inv|) per element; as a bound on the norm
        u = 2.0**-24
        bound = n * u / (1 - n * u) * torch.linalg.matrix_norm(C.double().abs() @ inv.double().abs())
        bound = bound + u * ref  # the result's own rounding to fp32
        err = float(((val.double() - ref).abs() / bound).max())
        ours = timeit(lambda C=C, inv=inv: comp.residual_norm(C, inv), device)
        tor = timeit(lambda C=C, inv=inv: _identity_residual(C, inv), device)
        tri = timeit(lambda C=C, inv=inv: triton_residual(C, inv), device)
        rows.append(
            row(
                "cuda ‖C_fix·C_inv − I‖_F",
                f"B={B} n={n}",
                ours,
                tor,
                err,
                f"{'pass' if err <= 1 else 'FAIL'}: err/bound; ref: torch product; triton {tri:.3g} ms",
            )  # fmt: skip
        )
        ck.set_backend("cuda")
        _, _, d_cuda = ck.damped_inverse(C, damp=1e-8)
        ms = timeit(lambda C=C: ck.damped_inverse(C, damp=1e-8), device)
        ck.set_backend("torch")
        _, _, d_torch = ck.damped_inverse(C, damp=1e-8)
        ms_t = timeit(lambda C=C: ck.damped_inverse(C, damp=1e-8), device)
        ck.set_backend("auto")
        same = torch.equal(torch.as_tensor(d_cuda), torch.as_tensor(d_torch))
        rows.append(
            row(
                "cuda damped_inverse search",
                f"B={B} n={n}",
                ms,
                ms_t,
                None,
                f"{'pass' if same else 'differ (within the rounding band?)'}: damps cuda "
                f"{torch.as_tensor(d_cuda).tolist()} torch {torch.as_tensor(d_torch).tolist()}",
            )  # fmt: skip
        )
    return rows


def run(device: str) -> list[dict[str, Any]]:
    if torch.device(device).type != "cuda":
        # the C++ CPU kernels are tested by tests/test_compiled_ops.py; these need a GPU
        return [row("cuda kernels", "-", note="skipped: the CUDA kernels need a CUDA device")]
    rows: list[dict[str, Any]] = []
    guarded(rows, "cuda nf4", lambda: _nf4_rows(device))
    guarded(rows, "cuda nf4_residual", lambda: _residual_rows(device))
    guarded(rows, "cuda covariance", lambda: _covariance_rows(device))
    guarded(rows, "cuda damping", lambda: _damping_rows(device))
    return rows
