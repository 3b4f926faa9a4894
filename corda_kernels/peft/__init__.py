"""PEFT front end: the ``preprocess_corda`` drop-in (:mod:`.corda`) and the :func:`accelerate`
switch that routes PEFT's own PiSSA, OLoRA, LoftQ and CorDA initializations through this
library (:mod:`.switch`, :mod:`.inits`)."""

from .corda import (
    collect_covariances,
    layer_ranks,
    preprocess_corda,
    set_calibration_mask,
    target_modules,
    weights_key,
)
from .switch import PeftVersionError, accelerate, calls, disable, enable, is_enabled

__all__ = [
    "PeftVersionError",
    "accelerate",
    "calls",
    "collect_covariances",
    "disable",
    "enable",
    "is_enabled",
    "layer_ranks",
    "preprocess_corda",
    "set_calibration_mask",
    "target_modules",
    "weights_key",
]
