"""CPU benchmarks of the covariance update (pytest-benchmark; the Triton kernel is GPU-only,
see ``bench/gpu_covariance.py``; the interpreter is a test vehicle, not worth timing).

Compared side by side in one run, grouped by shape (median is the figure to read):

- ``ref_full``: ``C += x.float().T @ x.float()``, what PEFT / GPTQ-style hooks do;
- ``ours_torch_triangle``: this library's torch backend, upper block-triangle only (what the
  collector calls per batch; mirrored once at the end);
- ``peft_per_sequence`` / ``ours_mask_scale``: PEFT's normalization (each sequence divided by
  its max), PEFT's loop over sequences against our batched masked call.

Run: ``PYTHONPATH=. python -m pytest bench/bench_covariance.py --benchmark-columns=median,iqr,rounds``
"""

from __future__ import annotations

import pytest
import torch

import corda_kernels as ck

SHAPES = [(576, 4, 512), (1536, 4, 512)]  # (n, sequences, tokens per sequence): SmolLM2 widths
DTYPES = [torch.float32, torch.bfloat16]


def _inputs(n: int, B: int, L: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 7 + B)
    return torch.randn(B, L, n, generator=g).to(dtype), torch.zeros(n, n)


@pytest.fixture(autouse=True)
def _torch_backend():
    before = ck.get_backend()
    ck.set_backend("torch")
    yield
    ck.set_backend(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,B,L", SHAPES)
def test_ref_full(benchmark, n: int, B: int, L: int, dtype: torch.dtype) -> None:  # noqa: ANN001
    x, C = _inputs(n, B, L, dtype)
    benchmark.group = f"covariance n={n} T={B * L} {str(dtype)[6:]}"

    def ref() -> None:
        xf = x.reshape(-1, n).float()
        C.addmm_(xf.T, xf)

    benchmark(ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,B,L", SHAPES)
def test_ours_torch_triangle(benchmark, n: int, B: int, L: int, dtype: torch.dtype) -> None:  # noqa: ANN001
    x, C = _inputs(n, B, L, dtype)
    benchmark.group = f"covariance n={n} T={B * L} {str(dtype)[6:]}"
    # One call on a fresh C first: its upper triangle must equal the full product's.
    ck.covariance_update(C, x, upper_only=True)
    xf = x.reshape(-1, n).double()
    ref = xf.T @ xf
    up = torch.ones(n, n, dtype=torch.bool).triu()
    assert float((C.double()[up] - ref[up]).norm() / ref[up].norm()) < 1e-5
    benchmark(lambda: ck.covariance_update(C, x, upper_only=True))


@pytest.mark.parametrize("n,B,L", SHAPES[:1])
def test_peft_per_sequence(benchmark, n: int, B: int, L: int) -> None:  # noqa: ANN001
    x, C = _inputs(n, B, L, torch.float32)
    benchmark.group = f"PEFT normalization n={n} T={B * L}"

    def peft() -> None:
        for b in range(B):
            xs = x[b].float()
            xs = xs / torch.max(xs).abs()
            C.addmm_(xs.T, xs)

    benchmark(peft)


@pytest.mark.parametrize("n,B,L", SHAPES[:1])
def test_ours_mask_scale(benchmark, n: int, B: int, L: int) -> None:  # noqa: ANN001
    x, C = _inputs(n, B, L, torch.float32)
    benchmark.group = f"PEFT normalization n={n} T={B * L}"
    mask = torch.ones(B, L, dtype=torch.bool)
    scale = 1.0 / x.amax(dim=(1, 2)).abs() ** 2
    benchmark(lambda: ck.covariance_update(C, x, mask=mask, seq_scale=scale, upper_only=True))
