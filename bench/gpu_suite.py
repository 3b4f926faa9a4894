"""The one prepared GPU script: ceilings, correctness and timing of every kernel, one table.

Run once on a lent GPU (H200 / H100), from the repository root::

    python bench/gpu_suite.py                 # device cuda, table on stdout, files under $OUT
    python bench/gpu_suite.py --only covariance

It measures the device's bf16 / fp32 / tf32 matmul rates and its copy bandwidth, then imports
every ``bench/gpu_*.py`` module (this one excepted), calls its ``run(device) -> list[dict]``
(rows ``kernel, shape, ours_ms, ref_ms, ratio, max_err, note``; ``ratio`` = ref / ours, > 1 means
ours is faster) and prints one markdown table. A module that raises becomes an ERROR row; a
module started after the time budget (default 270 s) is skipped, so the whole run stays under
5 minutes. Rows whose note starts with FAIL or ERROR make the exit status 1.

With ``--build`` it first builds the compiled extension (``CMakeLists.txt``: the CUDA kernels for
the device's architecture and the torch bindings) into ``corda_kernels/``; the build's time and
outcome are the table's first row.

Dry run on the CPU (exercises the flow, numbers meaningless)::

    TRITON_INTERPRET=1 CORDA_GPU_SUITE_SMALL=1 PYTHONPATH=. python bench/gpu_suite.py --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
from _gpu_util import ceilings, row  # noqa: E402


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.1e}"
    return str(v).replace("|", "/")


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (kernel, shape, ours_ms, ref_ms, ratio, max_err, note)."""
    keys = ["kernel", "shape", "ours_ms", "ref_ms", "ratio", "max_err", "note"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def device_info(device: str) -> str:
    """One line: versions and the device's name, capability, SM count and memory."""
    import triton

    info = f"torch {torch.__version__}, triton {triton.__version__}"
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info += (
            f", {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB"
        )
    return info


def build_extension(device: str) -> dict[str, Any]:
    """Build ``corda_kernels/_C`` with CMake for this device's architecture; one result row."""
    import shutil
    import subprocess

    root = HERE.parent
    arch = "90a"
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = f"{major}{minor}" + ("a" if major == 9 else "")
    for old in (root / "corda_kernels").glob("_C*.so"):
        old.unlink()
    build = root / "build" / "gpu"
    args = ["cmake", "-S", str(root), "-B", str(build), f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCORDA_CUDA_ARCHS={arch}", f"-DCORDA_EXT_OUTPUT={root / 'corda_kernels' / '_C.so'}"]  # fmt: skip
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    t = time.perf_counter()
    log = ""
    try:
        for cmd in (args, ["cmake", "--build", str(build), "--target", "_C", "-j", str(os.cpu_count() or 4)]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            log += done.stdout + done.stderr
            if done.returncode:
                raise RuntimeError(f"{' '.join(cmd[:2])} exited {done.returncode}")
        note = f"CMake: built for sm_{arch} in {time.perf_counter() - t:.0f} s"
    except Exception as e:
        print(log[-6000:], file=sys.stderr, flush=True)
        note = f"ERROR CMake {e}: " + " ".join(log.split()[-30:])
        # the same sources through torch's own extension builder, so that the kernels still get measured
        try:
            from torch.utils.cpp_extension import load

            csrc = root / "csrc"
            load(
                name="corda_kernels_C",
                sources=[str(csrc / "torch_bindings.cpp"), str(csrc / "cpu" / "nf4_cpu.cpp")]
                + [str(p) for p in sorted((csrc / "cuda").glob("*.cu"))],
                extra_include_paths=[str(csrc / "include")],
                extra_cflags=["-O3", "-ffp-contract=off", "-DCORDA_WITH_CUDA"],
                extra_cuda_cflags=["-O3", "--fmad=false", f"-gencode=arch=compute_{arch},code=sm_{arch}"],
                build_directory=str(build.parent),
                is_python_module=False,
                verbose=False,
            )
            # now loaded into this process: corda_kernels.kernels.compiled finds its ops registered
            note = f"FALLBACK torch.utils.cpp_extension built it in {time.perf_counter() - t:.0f} s; " + note
        except Exception as e2:
            note += f"; fallback failed too: {type(e2).__name__}: {e2}"[:300]
    return row("build: compiled extension (CMake)", f"sm_{arch}", note=note)


def modules(only: list[str] | None) -> list[Path]:
    """``bench/gpu_*.py`` files other than this one, sorted; filtered by substrings in ``only``."""
    found = sorted(p for p in HERE.glob("gpu_*.py") if p.name != Path(__file__).name)
    if only:
        found = [p for p in found if any(o in p.stem for o in only)]
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", nargs="*", help="run only modules whose name contains one of these")
    ap.add_argument("--budget-s", type=float, default=270.0, help="start no module after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_suite.json / .md ($OUT)")
    ap.add_argument("--build", action="store_true", help="build the compiled extension first (CMake)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    device = args.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible", file=sys.stderr)
        return 2
    print(device_info(device), flush=True)
    rows: list[dict[str, Any]] = []
    if args.build:
        rows.append(build_extension(device))
        print(rows[-1]["note"], flush=True)
    ceil = ceilings(device)
    rows.append(
        row(
            "ceiling: matmul",
            "8192³",
            note=(
                f"bf16 {ceil['bf16_tflops']:.3g} TFLOP/s, fp32 (TF32 off) "
                f"{ceil['fp32_tflops']:.3g}, tf32 {ceil['tf32_tflops']:.3g}"
            ),
        )
    )
    rows.append(row("ceiling: copy", "2 GiB d2d", note=f"{ceil['copy_gbs']:.0f} GB/s (read + write)"))
    print(f"ceilings {ceil} after {time.perf_counter() - t0:.1f} s", flush=True)
    for path in modules(args.only):
        elapsed = time.perf_counter() - t0
        if elapsed > args.budget_s:
            rows.append(row(path.stem, "-", note=f"SKIPPED: time budget spent ({elapsed:.0f} s)"))
            continue
        t = time.perf_counter()
        try:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            got = mod.run(device)
            rows.extend(got)
            status = f"{len(got)} rows"
        except Exception as e:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            rows.append(row(path.stem, "-", note=f"ERROR {type(e).__name__}: {e}"[:300]))
            status = "error"
        print(f"{path.stem}: {status} in {time.perf_counter() - t:.1f} s", flush=True)
    total = time.perf_counter() - t0
    table = markdown(rows)
    print()
    print(f"## GPU suite ({device_info(device)}; {total:.0f} s)\n")
    print(table)
    bad = [r for r in rows if str(r.get("note", "")).startswith(("FAIL", "ERROR"))]
    print(f"\n{len(rows)} rows, {len(bad)} FAIL/ERROR, {total:.0f} s")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_suite.json").write_text(
            json.dumps({"device": device_info(device), "ceilings": ceil, "seconds": total, "rows": rows}, indent=1)
        )
        (out / "gpu_suite.md").write_text(table + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
