"""Triton kernels, one module per op (kernel, launcher, registration for the ``triton`` backend).

Every module here is imported when triton is importable; each registers its
implementations with :func:`corda_kernels.backend.register_impl` and may expose
``compile_specs()`` (the kernels and signatures the Hopper / Ampere compile check builds).
"""

from __future__ import annotations

import importlib
import pkgutil

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    HAS_TRITON = False

MODULES: list[str] = []
if HAS_TRITON:
    for _info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{_info.name}")
        MODULES.append(_info.name)
