"""The engine: model layers, calibration hooks, the per-layer decomposition pipeline, CorDA++
planning, adapters, caches and the embedded model and texts. Uses :mod:`corda_kernels.ops`;
used by the front ends (:mod:`corda_kernels.peft`, :mod:`corda_kernels.cli`)."""
