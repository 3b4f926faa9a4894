"""The compiled kernels of ``csrc/`` as the ``cpp`` (CPU) and ``cuda`` backends.

``setup.py`` builds them with CMake into ``corda_kernels/_C*.so``, a library of ``torch.library``
ops in the namespace ``corda_kernels_C`` (schemas and bindings: ``csrc/torch_bindings.cpp``).
This module loads it and registers each op's kernels into the backend registry:

* ``cpp``: ``nf4_quantize``, ``nf4_dequantize`` (C++ over torch's thread pool);
* ``cuda`` (when the extension was built against a CUDA torch): ``nf4_quantize``,
  ``nf4_dequantize``, ``blockwise8_quantize``, ``nf4_quantize_residual``, ``covariance_update``
  (bf16 / fp16 tokens; fp32 stays on torch) and ``damped_inverse`` (its fused residual check).

Without the extension the package imports and runs on the torch and Triton backends, with one
warning saying so.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..backend import register_impl, set_compiled_ops

PACKAGE_DIR = Path(__file__).resolve().parent.parent

# How the CUDA kernels compute 1/absmax in bitsandbytes' CUDA arithmetic: 0 the approximate
# ``rcp.approx.ftz`` of its fast-math build, 1 IEEE, 2 ``div.full``; the GPU suite measures each
# against bitsandbytes (bench/gpu_cuda.py).
RECIP_MODE_ON_GPU = 0
_RECIP_IEEE = 1

CPP_OPS = ("nf4_quantize", "nf4_dequantize")
CUDA_OPS = (
    "nf4_quantize",
    "nf4_dequantize",
    "blockwise8_quantize",
    "nf4_quantize_residual",
    "covariance_update",
    "damped_inverse",
)


def library_path() -> Path | None:
    """The built extension (``corda_kernels/_C*.so``), or None."""
    found = sorted(PACKAGE_DIR.glob("_C*.so"))
    return found[0] if found else None


def _load() -> tuple[bool, bool, str | None]:
    """(loaded, built with CUDA, why not loaded)."""
    try:  # already in this process (a JIT build through torch.utils.cpp_extension, say)
        return True, bool(torch.ops.corda_kernels_C.built_with_cuda()), None
    except (AttributeError, RuntimeError):
        pass
    path = library_path()
    if path is None:
        return False, False, "not built"
    try:
        torch.ops.load_library(str(path))
    except OSError as e:  # a stale build against another torch, a missing symbol
        return False, False, f"{path.name} failed to load: {e}"
    return True, bool(torch.ops.corda_kernels_C.built_with_cuda()), None


LOADED, WITH_CUDA, LOAD_ERROR = _load()
if not LOADED:
    warnings.warn(
        f"corda_kernels: the compiled extension is {LOAD_ERROR}; the torch and Triton backends are used "
        "(build it with `pip install -e .`, which needs CMake and a C++17 compiler)",
        RuntimeWarning,
        stacklevel=2,
    )


def _recip(t: torch.Tensor) -> int:
    return RECIP_MODE_ON_GPU if t.device.type == "cuda" else _RECIP_IEEE


def _nf4_quantize(A: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.corda_kernels_C.nf4_quantize(A, blocksize, bnb_cuda, _recip(A))


def _nf4_dequantize(
    packed: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int, dtype: torch.dtype
) -> torch.Tensor:
    return torch.ops.corda_kernels_C.nf4_dequantize(packed, absmax, blocksize, numel, dtype)


def _blockwise8_quantize(A: torch.Tensor, blocksize: int, bnb_cuda: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not bnb_cuda:  # bitsandbytes' CPU arithmetic (a lookup table) has no CUDA kernel here
        from ..ops.nf4 import _blockwise8_quantize_torch

        return _blockwise8_quantize_torch(A, blocksize, bnb_cuda)
    from ..ops.nf4 import dynamic_map

    return torch.ops.corda_kernels_C.blockwise8_quantize(A, dynamic_map(A.device), blocksize, _recip(A))


def _nf4_quantize_residual(
    W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, blocksize: int, bnb_cuda: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.corda_kernels_C.nf4_quantize_residual(W, B, A, scaling, blocksize, bnb_cuda, _recip(W))


def covariance_splits(n: int, K: int, tokens: int, device: torch.device) -> int:
    """Token splits for the CUDA covariance kernel: enough programs for two waves on the device."""
    nt = -(-n // 64)
    tiles = nt * (nt + 1) // 2 * max(K, 1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // tiles)
    return max(1, min(want, -(-tokens // 32), 64))


def _covariance_update(
    C: torch.Tensor,
    x: torch.Tensor,
    mask: torch.Tensor | None,
    seq_scale: torch.Tensor | None,
    seq_bucket: torch.Tensor | None,
    upper_only: bool,
) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16) or not C.is_contiguous():
        from ..ops.covariance import _covariance_update_torch

        _covariance_update_torch(C, x, mask, seq_scale, seq_bucket, upper_only)
        return
    K = C.shape[0] if seq_bucket is not None else 1
    splits = covariance_splits(x.shape[2], K, x.shape[0] * x.shape[1], x.device)
    torch.ops.corda_kernels_C.covariance_update(C, x, mask, seq_scale, seq_bucket, upper_only, splits)


def residual_norm(A: torch.Tensor, Binv: torch.Tensor) -> torch.Tensor:
    """``‖A[b]·Binv[b] − I‖_F`` for fp32 ``(B, n, n)`` CUDA tensors → fp32 ``(B,)``, fused (no n × n temporary)."""
    return torch.ops.corda_kernels_C.damping_residual_sq(A, Binv).sqrt().float()


def _damped_inverse(
    C: torch.Tensor, damp: float, threshold: float, max_steps: int, probes: int, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from ..ops.damping import _damped_inverse_torch, search_with_residual

    if C.dtype != torch.float32:
        return _damped_inverse_torch(C, damp, threshold, max_steps, probes, inverse)
    return search_with_residual(C, damp, threshold, max_steps, probes, inverse, residual_norm)


_CUDA_IMPLS = {
    "nf4_quantize": _nf4_quantize,
    "nf4_dequantize": _nf4_dequantize,
    "blockwise8_quantize": _blockwise8_quantize,
    "nf4_quantize_residual": _nf4_quantize_residual,
    "covariance_update": _covariance_update,
    "damped_inverse": _damped_inverse,
}

if LOADED:
    for _op in CPP_OPS:
        register_impl(_op, "cpp")(_CUDA_IMPLS[_op])
    set_compiled_ops("cpp", CPP_OPS)
    if WITH_CUDA:
        for _op in CUDA_OPS:
            register_impl(_op, "cuda")(_CUDA_IMPLS[_op])
        set_compiled_ops("cuda", CUDA_OPS)
