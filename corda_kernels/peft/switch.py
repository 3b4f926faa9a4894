"""One switch that routes PEFT's own initializations through this library, PEFT code unchanged.

    from corda_kernels.peft import accelerate

    with accelerate():
        model = get_peft_model(model, LoraConfig(init_lora_weights="pissa", ...))

or ``enable()`` … ``disable()``. While enabled, these PEFT functions are replaced (the
replacements are in :mod:`corda_kernels.peft.inits`):

==========================================================  =====================================
PEFT                                                         computed by
==========================================================  =====================================
``LoraLayer.pissa_init`` (``"pissa"``, ``"pissa_niter_N"``)  certified top-r SVD
``LoraLayer.olora_init`` (``"olora"``)                      leading-r QR
``loftq_utils.loftq_init`` (``LoftQConfig``, 4-bit)          our NF4 + certified top-r SVD
``loftq_utils._loftq_init_new`` (``replace_lora_weights_loftq``)  certified top-r SVD
``corda.calib_cov_distribution``, ``corda.collect_eigens``   our calibration hooks and CO-SVD
(the stages of PEFT's own ``preprocess_corda``)
==========================================================  =====================================

The module attributes PEFT looks up at call time are replaced, so a ``preprocess_corda`` or
``get_peft_model`` imported before enabling is accelerated too. Each patched target is checked
against the signature it must have; a PEFT without one of them raises :class:`PeftVersionError`
naming the PEFT version and the missing piece, and nothing is patched. Enabling nests (a counter);
:func:`calls` lists what went through the switch since it was last enabled from zero.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from . import inits

TESTED_PEFT = "0.21.2"


class PeftVersionError(RuntimeError):
    """The installed PEFT lacks a function :func:`accelerate` replaces (or its signature changed)."""


@dataclass(frozen=True)
class _Patch:
    key: str  # the original's key in inits._ORIGINALS
    module: str
    owner: str | None  # a class in the module, or None for a module attribute
    name: str
    params: tuple[str, ...]  # the leading parameters PEFT's function must take
    replacement: Callable


PATCHES = (
    _Patch(
        "pissa_init",
        "peft.tuners.lora.layer",
        "LoraLayer",
        "pissa_init",
        ("self", "adapter_name", "init_lora_weights"),
        inits.pissa_init,
    ),
    _Patch(
        "olora_init", "peft.tuners.lora.layer", "LoraLayer", "olora_init", ("self", "adapter_name"), inits.olora_init
    ),
    # LoraLayer.loftq_init calls the name its module imported; direct callers use loftq_utils'
    _Patch(
        "loftq_init",
        "peft.tuners.lora.layer",
        None,
        "loftq_init",
        ("weight", "num_bits", "reduced_rank", "num_iter"),
        inits.loftq_init,
    ),
    _Patch(
        "loftq_init.utils",
        "peft.utils.loftq_utils",
        None,
        "loftq_init",
        ("weight", "num_bits", "reduced_rank", "num_iter"),
        inits.loftq_init,
    ),
    _Patch(
        "_loftq_init_new",
        "peft.utils.loftq_utils",
        None,
        "_loftq_init_new",
        ("qweight", "weight", "num_bits", "reduced_rank"),
        inits.loftq_init_new,
    ),
    _Patch(
        "calib_cov_distribution",
        "peft.tuners.lora.corda",
        None,
        "calib_cov_distribution",
        ("model", "config", "run_model", "hooked_model", "covariance_file"),
        inits.calib_cov_distribution,
    ),
    _Patch(
        "collect_eigens",
        "peft.tuners.lora.corda",
        None,
        "collect_eigens",
        ("model", "config", "verbose"),
        inits.collect_eigens,
    ),
)

_LOCK = threading.Lock()
_DEPTH = 0


def _peft_version() -> str:
    try:
        import peft
    except ImportError as e:
        raise PeftVersionError("corda_kernels.peft.accelerate needs PEFT installed (pip install peft)") from e
    return getattr(peft, "__version__", "unknown")


def _holder(patch: _Patch) -> object:
    version = _peft_version()
    where = f"{patch.module}.{patch.owner + '.' if patch.owner else ''}{patch.name}"
    try:
        module = importlib.import_module(patch.module)
    except ImportError as e:
        raise PeftVersionError(f"PEFT {version} has no module {patch.module} (needed for {where})") from e
    holder = getattr(module, patch.owner, None) if patch.owner else module
    fn = getattr(holder, patch.name, None) if holder is not None else None
    if fn is None or not callable(fn):
        raise PeftVersionError(
            f"PEFT {version} has no {where}, which corda_kernels.peft.accelerate replaces "
            f"(tested with PEFT {TESTED_PEFT})"
        )
    got = tuple(inspect.signature(fn).parameters)[: len(patch.params)]
    if got != patch.params:
        raise PeftVersionError(
            f"PEFT {version}: {where} takes ({', '.join(got)}), corda_kernels.peft.accelerate expects "
            f"({', '.join(patch.params)}) (tested with PEFT {TESTED_PEFT})"
        )
    return holder


def enable() -> None:
    """Route PEFT's initializations through this library until the matching :func:`disable`."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            holders = [_holder(p) for p in PATCHES]  # every check before any patch
            inits.RECORD.clear()
            for patch, holder in zip(PATCHES, holders):
                inits._ORIGINALS[patch.key] = getattr(holder, patch.name)
            for patch, holder in zip(PATCHES, holders):
                setattr(holder, patch.name, patch.replacement)
        _DEPTH += 1


def disable() -> None:
    """Undo one :func:`enable`; the last one puts PEFT's own functions back."""
    global _DEPTH
    with _LOCK:
        if _DEPTH == 0:
            raise RuntimeError("corda_kernels.peft.disable() without a matching enable()")
        _DEPTH -= 1
        if _DEPTH == 0:
            for patch in PATCHES:
                holder = importlib.import_module(patch.module)
                if patch.owner:
                    holder = getattr(holder, patch.owner)
                setattr(holder, patch.name, inits._ORIGINALS.pop(patch.key))


def is_enabled() -> bool:
    return _DEPTH > 0


@contextmanager
def accelerate() -> Iterator[list[inits.Call]]:
    """``with accelerate(): …`` — :func:`enable` on entry, :func:`disable` on exit. Yields the
    list of :class:`~corda_kernels.peft.inits.Call` records (one per initialized layer or stage)."""
    enable()
    try:
        yield inits.RECORD
    finally:
        disable()


def calls() -> list[inits.Call]:
    """What went through the switch since it was last enabled from zero."""
    return list(inits.RECORD)
