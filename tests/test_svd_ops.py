"""svd_top and qr_leading against float64 references: fresh random inputs, odd shapes, flat and
decaying spectra, batches, half-precision and non-contiguous inputs.

Tolerances come from the computation: singular values within the path's own posterior bound
(which must not claim more than was achieved) and never worse than float32's resolution of
the top-r values; subspaces within twice its Wedin estimate ``‖residual‖/gap``; the QR factors
within ``c·√k·u`` of the working precision times ``‖W‖`` (Householder QR is backward stable).
"""

from __future__ import annotations

import math

import pytest
import torch

from corda_kernels.ops.cosvd import principal_cosines
from corda_kernels.ops.linalg import all_finite
from corda_kernels.ops.svd import qr_leading, svd_top
from tests.conftest import rel_err

U32 = torch.finfo(torch.float32).eps / 2


def planted(gen: torch.Generator, m: int, n: int, spectrum: torch.Tensor) -> torch.Tensor:
    """``U diag(spectrum) Vᵀ`` with Haar-random ``U``, ``V`` (float64)."""
    k = spectrum.numel()
    U = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))[0]
    return (U * spectrum) @ V.T


def check_top(W: torch.Tensor, r: int, got: tuple, info: dict) -> None:
    U, S, V = got
    W64 = W.double()
    Ue, Se, Vhe = torch.linalg.svd(W64, full_matrices=False)
    assert U.shape == (W.shape[0], r) and S.shape == (r,) and V.shape == (W.shape[1], r)
    assert U.dtype == S.dtype == V.dtype == torch.float32
    sv_err = float(((S.double() - Se[:r]).abs() / Se[:r]).max())
    if info["method"] == "exact-fallback":
        assert sv_err <= 4 * U32, info
    else:
        # the posterior bound must hold (float32 output: + its rounding), and it must be small
        assert sv_err <= info["sv_rel_bound"] + 2 * U32, (sv_err, info)
        assert info["sv_rel_bound"] <= 1e-4 * float(Se[0] / Se[r - 1]), info
        sin_est = info["subspace_sin_est"]
        for got_, ref in ((U, Ue[:, :r]), (V, Vhe[:r].T)):
            cos_min = float(principal_cosines(got_.double(), ref).min())
            sin_true = math.sqrt(max(0.0, 1 - cos_min**2))
            assert sin_true <= 2 * sin_est + 10 * U32 * math.sqrt(max(W.shape)), (sin_true, info)
    # the triplets are those of W: U diag(S) Vᵀ projects W onto U
    assert rel_err((U.double() * S.double()) @ V.double().T, U.double() @ (U.double().T @ W64)) < 1e-5
    # orthonormal columns
    eye = torch.eye(r, dtype=torch.float64)
    assert float((U.double().T @ U.double() - eye).abs().max()) < 50 * U32 * math.sqrt(W.shape[0])
    assert float((V.double().T @ V.double() - eye).abs().max()) < 50 * U32 * math.sqrt(W.shape[1])


@pytest.mark.parametrize(
    "m, n, r, kind",
    [
        (97, 61, 5, "gauss"),
        (300, 700, 16, "gauss"),
        (700, 300, 24, "gauss"),
        (640, 640, 16, "decay"),
        (520, 1100, 8, "gap"),
        (1100, 600, 48, "gauss"),
    ],
)
def test_svd_top_matches_float64(gen: torch.Generator, m: int, n: int, r: int, kind: str) -> None:
    k = min(m, n)
    if kind == "gauss":
        W = torch.randn(m, n, generator=gen) / math.sqrt(n)
    else:
        i = torch.arange(k, dtype=torch.float64)
        spectrum = 0.97**i if kind == "decay" else torch.where(i < r, 3.0 - i / k, 1.0 - i / (2 * k))
        W = planted(gen, m, n, spectrum).float()
    U, S, V, infos = svd_top(W, r)
    check_top(W, r, (U, S, V), infos[0])
    if kind != "gauss":  # the dense start is the top subspace already: one or two confirming steps
        assert infos[0]["method"] == "fast-ipm" and infos[0]["iterations"] <= 2, infos[0]


def test_svd_top_batches_half_and_strided_inputs(gen: torch.Generator) -> None:
    Wb = torch.randn(3, 260, 190, generator=gen)
    U, S, V, infos = svd_top(Wb, 12)
    for b in range(3):
        check_top(Wb[b], 12, (U[b], S[b], V[b]), infos[b])
    # a transposed view and a bf16 weight: the same as their float32 / contiguous copies
    Wt = torch.randn(230, 410, generator=gen).T
    assert not Wt.is_contiguous()
    got = svd_top(Wt, 7)
    check_top(Wt, 7, got[:3], got[3][0])
    ref = svd_top(Wt.contiguous(), 7)
    assert torch.allclose(got[1], ref[1], rtol=4 * U32, atol=0)
    Wh = (torch.randn(300, 200, generator=gen) / 15).bfloat16()
    got = svd_top(Wh, 9)
    check_top(Wh.float(), 9, got[:3], got[3][0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_all_finite_finds_any_nonfinite_entry(dtype: torch.dtype, gen: torch.Generator) -> None:
    """The one-sum check agrees with the elementwise one: a NaN, +Inf, −Inf or both infinities at a
    random place (strided input too), and finite entries whose sum overflows."""
    x = torch.randn(37, 53, generator=gen).to(dtype)
    assert all_finite(x) and all_finite(x.T)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        y = x.clone()
        for v in bad:
            y.view(-1)[int(torch.randint(0, y.numel(), (1,), generator=gen))] = v
        assert not all_finite(y) and not all_finite(y.T), (dtype, bad)
    huge = torch.full((64,), torch.finfo(dtype).max / 4, dtype=dtype)  # the sum overflows, every entry is finite
    assert not bool(torch.isfinite(huge.sum())) and all_finite(huge)


def test_svd_top_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rank 0"):
        svd_top(torch.randn(20, 10), 0)
    with pytest.raises(ValueError, match="rank 11"):
        svd_top(torch.randn(20, 10), 11)
    W = torch.randn(30, 20)
    W[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        svd_top(W, 4)


@pytest.mark.parametrize("m, n, r", [(97, 61, 5), (64, 300, 16), (500, 130, 130), (40, 30, 50), (257, 257, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_leading_is_the_full_qr_sliced(gen: torch.Generator, m: int, n: int, r: int, dtype: torch.dtype) -> None:
    W = torch.randn(m, n, generator=gen, dtype=dtype)
    Q, R = qr_leading(W, r)
    Qf, Rf = torch.linalg.qr(W)
    k = min(r, m, n)
    assert Q.shape == (m, k) and R.shape == (k, n) and Q.dtype == R.dtype == dtype
    u = torch.finfo(dtype).eps / 2
    tol = 20 * math.sqrt(max(m, n)) * u
    # the same Householder factors (signs included), not just some QR of the same columns
    assert float((Q - Qf[:, :k]).abs().max()) <= tol
    assert float((R - Rf[:k]).abs().max()) <= tol * float(W.abs().max()) * math.sqrt(m)
    W64 = W.double()
    assert rel_err(Q.double() @ R.double(), Q.double() @ (Q.double().T @ W64)) <= tol
    assert float(torch.triu(R[:, :k]).sub(R[:, :k]).abs().max()) == 0.0


@pytest.mark.parametrize(
    "m, n, ell, batch",
    [
        (90, 300, 6, 1),  # short side < 384: the full Gram, torch's eigh
        (430, 900, 12, 2),  # 384 ≤ k < 512: the upper triangle, torch's eigh
        (1300, 600, 20, 1),  # k ≥ 512, ell ≤ k/8: the upper triangle, LAPACK's subset solver
        (600, 610, 100, 1),  # ell > k/8: torch's eigh on the triangle
    ],
)
def test_dense_start_is_the_top_subspace(gen: torch.Generator, m: int, n: int, ell: int, batch: int) -> None:
    """The start alone (no iteration) spans the top-ell left singular subspace on a gapped
    spectrum, within the Gram route's ``~u₃₂·σ_1²/(σ_ell² − σ_{ell+1}²)``."""
    from corda_kernels.ops.cosvd.top import dense_start

    k = min(m, n)
    i = torch.arange(k, dtype=torch.float64)
    spectrum = torch.where(i < ell, 2.0 - i / k, 1.0 - i / (2 * k))
    Ws = torch.stack([planted(gen, m, n, spectrum) for _ in range(batch)])
    Q = dense_start(Ws.float(), ell)
    assert Q.shape == (batch, m, ell)
    bound = 50 * U32 * math.sqrt(k) * float(spectrum[0] ** 2 / (spectrum[ell - 1] ** 2 - spectrum[ell] ** 2))
    for b in range(batch):
        ref = torch.linalg.svd(Ws[b], full_matrices=False)[0][:, :ell]
        cos_min = float(principal_cosines(Q[b].double(), ref).min())
        assert math.sqrt(max(0.0, 1 - cos_min**2)) <= bound, (m, n, ell, b)
