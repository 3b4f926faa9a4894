"""corda_kernels: fast, complete CorDA / CorDA++ adapter initialization.

Public ops: :func:`covariance_update`, :func:`damped_inverse` (and :func:`damp_covariance`, its
``C_fix`` and damp without the inverse), :func:`cosvd`, :func:`nf4_quantize`,
:func:`nf4_dequantize`, and backend selection with :func:`set_backend` / :func:`get_backend`.
The PEFT drop-in lives in :mod:`corda_kernels.peft` (``preprocess_corda``), the command line in
:mod:`corda_kernels.cli`. Layers (``docs/architecture.md``): ``backend`` → ``ops`` (and the
Triton ``kernels`` registered into them) → ``engine`` → front ends (``peft``, ``cli``).
"""

from __future__ import annotations

from .backend import get_backend, set_backend
from .engine.adapters import CordaLinear, build_adapter, lora_scaling
from .engine.calibration import CovarianceCollector, NonFiniteActivationError
from .engine.outputs import load_output
from .ops.cosvd import cosvd
from .ops.covariance import covariance_update
from .ops.damping import DampingError, damp_covariance, damped_inverse
from .ops.nf4 import nf4_dequantize, nf4_quantize, nf4_quantize_residual

__version__ = "0.1.0"

__all__ = [
    "CordaLinear",
    "CovarianceCollector",
    "DampingError",
    "NonFiniteActivationError",
    "build_adapter",
    "cosvd",
    "covariance_update",
    "damp_covariance",
    "damped_inverse",
    "get_backend",
    "load_output",
    "lora_scaling",
    "nf4_dequantize",
    "nf4_quantize",
    "nf4_quantize_residual",
    "set_backend",
]

from . import kernels as _kernels  # noqa: E402,F401  (registers the Triton implementations)
