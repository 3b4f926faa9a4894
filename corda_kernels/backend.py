"""Backend selection and op dispatch.

Every operation is one ``torch.library`` custom op (namespace ``corda_kernels``) with a
schema and a fake kernel. Its real kernel is a small dispatcher that picks an
implementation from a registry keyed by backend name: ``torch`` (always present, the
pure-torch path), ``triton`` (the Triton kernels), ``cuda`` and ``cpp`` (the compiled CUDA and
C++ CPU kernels of ``csrc/``), each registered by its kernel module when it can be loaded. The
backend is chosen with :func:`set_backend` or the environment variable ``CORDA_KERNELS_BACKEND``;
``auto`` takes, per op and device, the implementation measured fastest (``docs/benchmarks.md``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")
# Preference order of ``auto`` on CUDA tensors, as measured by bench/gpu_suite.py on an H200
# (docs/benchmarks.md): the Triton kernels beat the CUDA ones on every op they share (the
# covariance's wgmma pipeline most of all), and cuBLAS's product makes the torch damping check
# faster than either fused check.
_AUTO_ORDER_CUDA = ("triton", "cuda", "torch")
_AUTO_ORDER_CUDA_BY_OP: dict[str, tuple[str, ...]] = {"damped_inverse": ("torch",)}
# On the CPU ``auto`` is torch except for the ops whose C++ kernel measured faster
# (bench/bench_nf4_cpu.py): NF4 quantize and dequantize.
_AUTO_ORDER_CPU_BY_OP: dict[str, tuple[str, ...]] = {
    "nf4_quantize": ("cpp", "torch"),
    "nf4_dequantize": ("cpp", "torch"),
}

LIB = torch.library.Library("corda_kernels", "DEF")
_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {}
_backend: str | None = None


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown corda_kernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op: ``auto``, ``torch``, ``triton``, ``cuda`` or ``cpp``."""
    global _backend
    _backend = _check_name(name)


def get_backend() -> str:
    """The selected backend name (``CORDA_KERNELS_BACKEND`` when none was set, else ``auto``)."""
    if _backend is not None:
        return _backend
    return _check_name(os.environ.get("CORDA_KERNELS_BACKEND", "auto"))


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(op: str) -> list[str]:
    """Backends that registered an implementation of ``op``."""
    return list(_IMPLS.get(op, {}))


def define_op(name: str, schema: str, fake: Callable[..., Any]) -> None:
    """Define ``corda_kernels::name`` with ``schema``; its kernel dispatches by backend."""
    LIB.define(f"{name}{schema}")
    _IMPLS.setdefault(name, {})

    def dispatch(*args: Any) -> Any:
        return resolve(name, _first_device(args))(*args)

    LIB.impl(name, dispatch, "CompositeExplicitAutograd")
    torch.library.register_fake(f"corda_kernels::{name}", fake, lib=LIB)


def register_impl(name: str, backend: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``fn`` as the ``backend`` implementation of op ``name``."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        _IMPLS.setdefault(name, {})[_check_name(backend)] = fn
        return fn

    return deco


def _first_device(args: tuple[Any, ...]) -> torch.device:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def resolve(name: str, device: torch.device) -> Callable[..., Any]:
    """The implementation of op ``name`` that the current backend uses for ``device``."""
    impls = _IMPLS[name]
    backend = get_backend()
    if backend == "auto":
        if device.type == "cuda":
            order = _AUTO_ORDER_CUDA_BY_OP.get(name, _AUTO_ORDER_CUDA)
        else:
            order = _AUTO_ORDER_CPU_BY_OP.get(name, ("torch",)) if device.type == "cpu" else ("torch",)
        for b in order:
            if b in impls:
                return impls[b]
        raise RuntimeError(f"corda_kernels: no implementation of {name} for device {device}")
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise RuntimeError(
            f"corda_kernels: the triton backend needs CUDA tensors (got {device}) or the Triton "
            "interpreter (set TRITON_INTERPRET=1 before importing triton)"
        )
    if backend == "cuda" and device.type != "cuda":
        raise RuntimeError(f"corda_kernels: the cuda backend needs CUDA tensors (got {device})")
    if backend == "cpp" and device.type != "cpu":
        raise RuntimeError(f"corda_kernels: the cpp backend runs on CPU tensors (got {device})")
    if backend in ("cuda", "cpp") and backend not in impls and _COMPILED_OPS.get(backend) is None:
        # the extension is not built: running torch under its name would say what is not so
        raise NotImplementedError(
            f"corda_kernels: the {backend} backend is not built (the compiled extension corda_kernels/_C "
            f"is missing or has no {backend} kernels; built for {name}: {', '.join(available_backends(name))}); "
            "choose 'auto', 'triton' or 'torch', or build it with `pip install -e .`"
        )
    # An op without a kernel of its own in the chosen backend (an SVD, say) runs its torch path.
    return impls.get(backend, impls["torch"])


# Set by corda_kernels.kernels.compiled: for "cpp" / "cuda", the ops whose kernels the loaded
# extension provides (None when that backend was not built).
_COMPILED_OPS: dict[str, tuple[str, ...] | None] = {"cpp": None, "cuda": None}


def set_compiled_ops(backend: str, ops: tuple[str, ...]) -> None:
    """Record that the compiled extension provides ``backend``'s kernels for ``ops`` (kernels.compiled)."""
    _COMPILED_OPS[_check_name(backend)] = tuple(ops)


def compiled_backends() -> dict[str, tuple[str, ...] | None]:
    """For ``cpp`` and ``cuda``: the ops with a compiled kernel, or None where none was built."""
    return dict(_COMPILED_OPS)
