#!/usr/bin/env bash
# The test suite (CPU only; Triton kernels run through the interpreter). Sets up .venv on first use.
# With no arguments: ruff, the whole suite, then the whole suite again on the code paths of an
# AVX2-only CPU (ATen's avx2 kernels, MKL's AVX2 path) and the floating-point tests once more on
# ATen's portable kernels, so that tolerances that hold on one CPU only fail here. Arguments go to
# a single pytest run (e.g. `bash scripts/test.sh tests/test_ops.py -x`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
ruff check corda_kernels tests bench python
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q "$@"
fi
python -m pytest -q
echo "== again on an AVX2-only CPU's code paths (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2)"
ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 python -m pytest -q -p no:cacheprovider
echo "== floating-point tests on ATen's portable kernels (ATEN_CPU_CAPABILITY=default)"
ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=AVX2 python -m pytest -q -p no:cacheprovider \
  tests/test_ops.py tests/test_damping_triton.py tests/test_damping_screen.py tests/test_calibration.py \
  tests/test_peft_parity.py tests/test_dropin_behaviour.py tests/test_covariance_triton.py tests/test_compiled_ops.py
