"""The GPU suite (``bench/gpu_suite.py``) on the CPU with small shapes and the Triton interpreter.

No GPU is lent to CI; this keeps the one script a lent H200 runs from rotting between loans:
every module must import, run its small shapes and pass its own accuracy checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_cpu_dry_run(tmp_path: Path) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", CORDA_GPU_SUITE_SMALL="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_suite.py"), "--device", "cpu", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "gpu_suite.json").read_text())["rows"]
    kernels = " ".join(r["kernel"] for r in rows)
    for name in ("cosvd top", "cosvd bottom", "nf4"):
        assert name in kernels, kernels
    assert not [r for r in rows if str(r.get("note", "")).startswith(("FAIL", "ERROR", "SKIPPED"))], rows
