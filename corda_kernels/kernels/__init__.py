"""Kernels registered into the ops' backends.

* ``*_triton.py``: Triton kernels, one module per op (kernel, launcher, registration for the
  ``triton`` backend), imported when triton is importable; each may expose ``compile_specs()``
  (the kernels and signatures the Hopper / Ampere compile check builds).
* ``compiled.py``: the CUDA and C++ kernels of ``csrc/`` (the ``cuda`` and ``cpp`` backends),
  loaded from the built extension when there is one.
"""

from __future__ import annotations

import importlib
import pkgutil

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a hard dependency on Linux
    HAS_TRITON = False

from . import compiled  # noqa: E402,F401  (registers the cpp / cuda kernels when built)

MODULES: list[str] = []
if HAS_TRITON:
    for _info in pkgutil.iter_modules(__path__):
        if _info.name.endswith("_triton"):
            importlib.import_module(f"{__name__}.{_info.name}")
            MODULES.append(_info.name)
