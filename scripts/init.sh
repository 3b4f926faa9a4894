#!/usr/bin/env bash
# The main job: CorDA adapters for the embedded SmolLM2-135M on the Lee corpus.
# Sets up .venv on first use; extra arguments go to `corda-kernels init`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec corda-kernels init "$@"
