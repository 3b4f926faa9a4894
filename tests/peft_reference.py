"""PEFT's own LoftQ on the CPU, as the reference the tests and ``bench/bench_accelerate.py`` compare with.

PEFT's ``loftq_init`` hard-codes its compute device (``"xpu"`` if available, else ``"cuda"``), so
on a machine without a GPU it cannot run at all. :func:`peft_loftq_init_cpu` (and
:func:`peft_loftq_init_new_cpu`) is PEFT's function compiled from PEFT's own source with that one
assignment changed to ``"cpu"``; everything else (bitsandbytes' ``Params4bit`` quantization, the
float32 SVD, the loop) is PEFT's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

_DEVICE_LINE = 'compute_device = "xpu" if is_xpu_available() else "cuda"'


def _on_cpu(name: str, key: str) -> Callable:
    from peft.utils import loftq_utils

    from corda_kernels.peft import inits

    fn = inits._ORIGINALS.get(key, getattr(loftq_utils, name))  # PEFT's, even while accelerate() is on
    src = inspect.getsource(fn)
    if _DEVICE_LINE not in src:
        raise RuntimeError(f"PEFT's {name} no longer contains {_DEVICE_LINE!r}: update tests/peft_reference.py")
    namespace = dict(vars(loftq_utils))
    exec(compile(src.replace(_DEVICE_LINE, 'compute_device = "cpu"'), loftq_utils.__file__, "exec"), namespace)
    return namespace[name]


def peft_loftq_init_cpu() -> Callable:
    """PEFT's ``loftq_utils.loftq_init`` (``LoftQConfig``) with its compute device set to the CPU."""
    return _on_cpu("loftq_init", "loftq_init.utils")


def peft_loftq_init_new_cpu() -> Callable:
    """PEFT's ``loftq_utils._loftq_init_new`` (``replace_lora_weights_loftq``) on the CPU."""
    return _on_cpu("_loftq_init_new", "_loftq_init_new")
