"""Backend selection and op dispatch.

Every operation is one ``torch.library`` custom op (namespace ``corda_kernels``) with a
schema and a fake kernel. Its real kernel is a small dispatcher that picks an
implementation from a registry keyed by backend name: ``torch`` (always present, the
pure-torch path), ``triton`` and ``cuda`` (registered by the kernel modules when they
can be imported). The backend is chosen with :func:`set_backend` or the environment
variable ``CORDA_KERNELS_BACKEND``; ``auto`` takes the fastest one available for the
tensors' device.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
# Preference order of ``auto`` on CUDA tensors; on every other device ``auto`` is torch.
_AUTO_ORDER_CUDA = ("cuda", "triton", "torch")

LIB = torch.library.Library("corda_kernels", "DEF")
_IMPLS: dict[str, dict[str, Callable[..., Any]]] = {}
_backend: str | None = None


def _check_name(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown corda_kernels backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def set_backend(name: str) -> None:
    """Select the backend for every op: ``auto``, ``torch``, ``triton`` or ``cuda``."""
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
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
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
    if backend == "cuda" and "cuda" not in impls:
        # no compiled kernel for this op: running torch under the cuda name would say what is not so
        raise NotImplementedError(
            f"corda_kernels: the cuda backend has no compiled kernel for {name} (built: "
            f"{', '.join(available_backends(name))}); choose 'auto', 'triton' or 'torch'"
        )
    # An op that has no Triton kernel (an SVD, say) runs its torch path under the triton backend.
    return impls.get(backend, impls["torch"])
