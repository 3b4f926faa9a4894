"""CPU benchmarks of the NF4 path against bitsandbytes (pytest-benchmark).

Run (from the repository root)::

    PYTHONPATH=$PWD python -m pytest bench/bench_nf4.py --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Groups: ``quantize-*`` (our torch path vs ``bitsandbytes.functional.quantize_4bit``),
``dequantize-*`` (ours vs ``dequantize_4bit``) and ``residual-*`` (our ``nf4_quantize_residual``
vs forming ``W − s·B·A`` and then calling ``quantize_4bit``). Each benchmark checks its result
against the reference once before timing, so a fast wrong answer cannot pass. Compare medians
within a group (one process, same machine state); absolute times are not meaningful.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

import corda_kernels as ck
from corda_kernels.ops.nf4 import residual

SHAPE = (2048, 2048)
RANK = 64
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.fixture(autouse=True)
def _torch_backend():
    before = ck.get_backend()
    ck.set_backend("torch")
    yield
    ck.set_backend(before)


def _weight(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(SHAPE, generator=g) * 0.02).to(dtype)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "double"])
@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("impl", ["ours", "bnb"])
def test_quantize(benchmark, impl: str, dt: str, compress: bool) -> None:  # noqa: ANN001
    W = _weight(DTYPES[dt])
    benchmark.group = f"quantize-{dt}-{'double' if compress else 'plain'}"
    ref_p, _ = F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=compress)
    if impl == "ours":
        fn = lambda: ck.nf4_quantize(W, blocksize=64, compress_statistics=compress)  # noqa: E731
    else:
        fn = lambda: F.quantize_4bit(W, blocksize=64, quant_type="nf4", compress_statistics=compress)  # noqa: E731
    assert torch.equal(fn()[0], ref_p)
    benchmark(fn)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("impl", ["ours", "bnb"])
def test_dequantize(benchmark, impl: str, dt: str) -> None:  # noqa: ANN001
    W = _weight(DTYPES[dt])
    benchmark.group = f"dequantize-{dt}"
    packed, state = ck.nf4_quantize(W, blocksize=64)
    ref = F.dequantize_4bit(packed, state, quant_type="nf4")
    if impl == "ours":
        fn = lambda: ck.nf4_dequantize(packed, state)  # noqa: E731
    else:
        fn = lambda: F.dequantize_4bit(packed, state, quant_type="nf4")  # noqa: E731
    assert torch.equal(fn(), ref)
    benchmark(fn)


@pytest.mark.parametrize("dt", list(DTYPES))
@pytest.mark.parametrize("impl", ["fused", "residual-then-bnb"])
def test_residual(benchmark, impl: str, dt: str) -> None:  # noqa: ANN001
    W = _weight(DTYPES[dt])
    g = torch.Generator().manual_seed(1)
    B = torch.randn(SHAPE[0], RANK, generator=g) * 0.01
    A = torch.randn(RANK, SHAPE[1], generator=g) * 0.01
    s = 2.0
    benchmark.group = f"residual-{dt}-r{RANK}"
    ref_p, _ = F.quantize_4bit(residual(W, B, A, s), blocksize=64, quant_type="nf4")
    if impl == "fused":
        fn = lambda: ck.nf4_quantize_residual(W, B, A, s, blocksize=64)  # noqa: E731
    else:

        def fn():  # noqa: ANN202
            R = (W.float() - s * (B @ A)).to(W.dtype)
            return F.quantize_4bit(R, blocksize=64, quant_type="nf4")

    assert torch.equal(fn()[0], ref_p)
    benchmark(fn)
