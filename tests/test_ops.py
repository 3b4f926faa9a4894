"""Every op of the torch backend against a float64 reference on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

import corda_kernels as ck
from corda_kernels.ops.damping import DampingError
from tests.conftest import rel_err

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def ref_cov(x: torch.Tensor, mask=None, scale=None) -> torch.Tensor:  # noqa: ANN001
    x64 = x.double().reshape(-1, x.shape[-2], x.shape[-1])
    B, L, _ = x64.shape
    w = torch.ones(B, L, dtype=torch.float64) if mask is None else mask.reshape(B, L).double()
    if scale is not None:
        w = w * scale.double().view(B, 1)
    return torch.einsum("bl,bli,blj->ij", w, x64, x64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [37, 300, 513])
def test_covariance_update(dtype: torch.dtype, n: int, gen: torch.Generator) -> None:
    x = torch.randn(3, 29, n, generator=gen).to(dtype)
    mask = torch.rand(3, 29, generator=gen) > 0.3
    scale = torch.rand(3, generator=gen) + 0.5
    C0 = torch.randn(n, n, generator=gen)
    C0 = C0 @ C0.T
    C0 = (C0 + C0.T) / 2  # exactly symmetric: a float32 GEMM's C0·C0ᵀ need not be (MKL's AVX2 path)
    C = ck.covariance_update(C0.clone(), x, mask=mask, seq_scale=scale)
    assert rel_err(C, C0.double() + ref_cov(x, mask, scale)) < TOL[torch.float32]
    assert torch.equal(C, C.T)


def test_covariance_upper_only_and_noncontiguous(gen: torch.Generator) -> None:
    x = torch.randn(1100, 2, 7, generator=gen).permute(1, 2, 0)  # (2, 7, 1100), non-contiguous
    assert not x.is_contiguous()
    C = ck.covariance_update(torch.zeros(1100, 1100), x, upper_only=True)
    ref = ref_cov(x)
    upper = torch.triu(torch.ones(1100, 1100, dtype=torch.bool))
    assert rel_err(C[upper], ref[upper]) < 1e-6
    from corda_kernels.ops.covariance import symmetrize_

    assert rel_err(symmetrize_(C), ref) < 1e-6


def test_covariance_buckets(gen: torch.Generator) -> None:
    x = torch.randn(5, 11, 40, generator=gen)
    bucket = torch.tensor([0, 2, 2, 1, 0])
    C = ck.covariance_update(torch.zeros(3, 40, 40), x, seq_bucket=bucket)
    for k in range(3):
        sel = bucket == k
        assert rel_err(C[k], ref_cov(x[sel])) < 1e-6


def test_covariance_leading_dims_and_2d(gen: torch.Generator) -> None:
    x = torch.randn(2, 3, 9, 16, generator=gen)
    mask = torch.rand(2, 3, 9, generator=gen) > 0.5
    mask[0, 0, 0] = True
    C = ck.covariance_update(torch.zeros(16, 16), x, mask=mask)
    assert rel_err(C, ref_cov(x, mask)) < 1e-6
    C2 = ck.covariance_update(torch.zeros(16, 16), x[0, 0])
    assert rel_err(C2, ref_cov(x[0, 0])) < 1e-6


def test_covariance_errors() -> None:
    with pytest.raises(TypeError, match="float32"):
        ck.covariance_update(torch.zeros(4, 4, dtype=torch.float64), torch.randn(3, 4))
    with pytest.raises(ValueError, match="expected"):
        ck.covariance_update(torch.zeros(5, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="mask shape"):
        ck.covariance_update(torch.zeros(4, 4), torch.randn(2, 3, 4), mask=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="seq_bucket out of range"):
        ck.covariance_update(torch.zeros(2, 4, 4), torch.randn(2, 3, 4), seq_bucket=torch.tensor([0, 2]))


def reference_damping(C: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, float]:
    """PEFT's loop, verbatim in arithmetic."""
    while True:
        C_fix = C + torch.diag(torch.ones(C.shape[0]) * torch.mean(torch.diag(C)) * damp)
        if torch.dist(C_fix @ torch.linalg.inv(C_fix), torch.eye(C.shape[0])).item() < 0.05:
            return C_fix, damp
        damp *= 2


def ill_conditioned(gen: torch.Generator, n: int, tokens: int) -> torch.Tensor:
    """Covariance of low-rank activations with a few outlier channels (needs several doublings)."""
    x = torch.randn(tokens, n, generator=gen)
    x[:, :3] *= 300.0
    return (x.T @ x / tokens).float()


@pytest.mark.parametrize("n,tokens", [(64, 30), (200, 40), (333, 100)])
def test_damped_inverse_matches_rule(n: int, tokens: int, gen: torch.Generator) -> None:
    C = ill_conditioned(gen, n, tokens)
    C_fix, C_inv, damp = ck.damped_inverse(C, damp=1e-7)
    ref_fix, ref_damp = reference_damping(C, 1e-7)
    assert damp > 1e-7  # the rule had to double
    assert damp == pytest.approx(ref_damp, rel=0, abs=0)
    assert torch.equal(C_fix, ref_fix)
    assert rel_err(C_inv, torch.linalg.inv(C_fix.double())) < 0.05


def test_damped_inverse_batched(gen: torch.Generator) -> None:
    # Starting far below CorDA's 0.01 makes every matrix need several, different, doublings.
    Cs = torch.stack([ill_conditioned(gen, 96, t) for t in (20, 200, 60)])
    C_fix, C_inv, damps = ck.damped_inverse(Cs, damp=1e-7)
    for i in range(3):
        ref_fix, ref_damp = reference_damping(Cs[i], 1e-7)
        assert float(damps[i]) == ref_damp
        assert torch.equal(C_fix[i], ref_fix)
    assert len(set(damps.tolist())) > 1  # the batch really needed different numbers of doublings


def test_damped_inverse_errors(gen: torch.Generator) -> None:
    C = ill_conditioned(gen, 32, 8)
    with pytest.raises(DampingError, match="doublings"):
        ck.damped_inverse(C, threshold=1e-12, max_steps=3)
    bad = C.clone()
    bad[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ck.damped_inverse(torch.stack([C, bad]))
    with pytest.raises(ValueError, match="max_steps"):
        ck.damped_inverse(C, max_steps=0)


@pytest.mark.parametrize("m,n", [(48, 80), (90, 33), (64, 64)])
@pytest.mark.parametrize("which", ["top", "bottom", "all"])
def test_cosvd_exact(m: int, n: int, which: str, gen: torch.Generator) -> None:
    W = torch.randn(m, n, generator=gen)
    C = ill_conditioned(gen, n, 3 * n)
    C_fix, _, _ = ck.damped_inverse(C)
    U64, S64, Vh64 = torch.linalg.svd(W.double() @ C_fix.double(), full_matrices=False)
    V64 = (Vh64 @ torch.linalg.inv(C_fix.double())).T
    k, r = min(m, n), 7
    U, S, V = ck.cosvd(W, C, rank=None if which == "all" else r, which=which, method="exact")
    sl = {"top": slice(0, r), "bottom": slice(k - r, k), "all": slice(0, k)}[which]
    assert rel_err(S, S64[sl]) < 1e-6
    sign = torch.sign((U.double() * U64[:, sl]).sum(0))
    assert rel_err(U * sign, U64[:, sl]) < 1e-5
    assert rel_err(V * sign, V64[:, sl]) < 1e-5
    if which == "all":
        assert rel_err((U.double() * S.double()) @ V.double().T, W) < 1e-6


def test_cosvd_errors(gen: torch.Generator) -> None:
    W, C = torch.randn(8, 6, generator=gen), torch.eye(6)
    with pytest.raises(ValueError, match="rank 7"):
        ck.cosvd(W, C, rank=7, which="top")
    with pytest.raises(ValueError, match="do not match"):
        ck.cosvd(W, torch.eye(5), rank=2, which="top")
    with pytest.raises(ValueError, match="which"):
        ck.cosvd(W, C, rank=2, which="middle")  # type: ignore[arg-type]


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown"):
        ck.set_backend("opencl")
    ck.set_backend("torch")
    assert ck.get_backend() == "torch"
    monkeypatch.setenv("CORDA_KERNELS_BACKEND", "triton")
    from corda_kernels import backend

    monkeypatch.setattr(backend, "_backend", None)
    assert ck.get_backend() == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        backend.resolve("covariance_update", torch.device("cpu"))
    ck.set_backend("cuda")
    with pytest.raises(RuntimeError, match="cuda backend needs CUDA"):
        backend.resolve("covariance_update", torch.device("cpu"))
    # no CUDA build of the extension: an error naming the op, never torch running under the cuda name
    with pytest.raises(NotImplementedError, match="cuda backend is not built.*covariance_update"):
        backend.resolve("covariance_update", torch.device("cuda"))
    ck.set_backend("auto")
    assert backend.resolve("covariance_update", torch.device("cpu")) is backend._IMPLS["covariance_update"]["torch"]


def test_fake_kernels_shapes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        C = torch.empty(4, 16, 16)
        C_fix, C_inv, d, chk = torch.ops.corda_kernels.damped_inverse(C, 0.01, 0.05, 10, 32, True)
        assert C_fix.shape == (4, 16, 16) and d.shape == (4,)
        U, S, V = torch.ops.corda_kernels.cosvd_full(torch.empty(10, 16), torch.empty(16, 16))
        assert (U.shape, S.shape, V.shape) == ((10, 10), (10,), (16, 10))


def test_batched_lu_helpers_after_set_num_threads(gen: torch.Generator) -> None:
    """torch 2.13 + MKL: batched LU breaks once set_num_threads ran; our helpers must not."""
    from corda_kernels.ops import linalg

    before = torch.get_num_threads()
    torch.set_num_threads(before)  # the call itself is the trigger, whatever the count
    for b in (1, 3):  # a batch of one goes to torch directly
        A = torch.randn(b, 200, 200, generator=gen, dtype=torch.float64) + 20 * torch.eye(200, dtype=torch.float64)
        B = torch.randn(b, 200, 5, generator=gen, dtype=torch.float64)
        X = linalg.solve(A, B)
        assert rel_err(A @ X, B) < 1e-12
        LU, piv, info = linalg.lu_factor_ex(A)
        assert bool((info == 0).all()) and rel_err(A @ linalg.lu_solve(LU, piv, B), B) < 1e-12
        inv, info = linalg.inv_ex(A.float())
        assert bool((info == 0).all()) and rel_err(A.float() @ inv, torch.eye(200).expand(b, 200, 200)) < 1e-5
