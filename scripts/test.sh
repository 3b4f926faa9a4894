#!/usr/bin/env bash
# The test suite (CPU only; Triton kernels run through the interpreter). Sets up .venv on first use.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
ruff check corda_kernels tests bench python
exec python -m pytest -q "$@"
