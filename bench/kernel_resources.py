"""Registers, spills and shared memory of every Triton kernel variant, read off the compiler on
the CPU (no GPU needed): each ``compile_specs()`` entry of every module of
:mod:`corda_kernels.kernels` is compiled for sm_90 and sm_80 and its PTX assembled again by the
``ptxas`` bundled with triton with ``-v``.

Run: ``TRITON_INTERPRET=0 PYTHONPATH=. python bench/kernel_resources.py``
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run with TRITON_INTERPRET=0: the interpreter replaces @triton.jit functions")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import corda_kernels.kernels as K  # noqa: E402

PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def resources(spec: dict, cap: int) -> dict[str, str | int]:
    """Compile ``spec`` for ``sm_{cap}`` and return its registers, spill line and shared memory."""
    fn = spec["fn"]
    attrs = {(fn.arg_names.index(a),): v for a, v in spec.get("attrs", {}).items()}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}), attrs=attrs)
    opts = {k: spec[k] for k in ("num_warps", "num_stages") if k in spec}
    kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    # triton 3.9 assembles sm_90+ with its newer ptxas ("ptxas-blackwell"), older targets with "ptxas".
    exe = os.path.join(PTXAS, "ptxas-blackwell" if cap >= 90 else "ptxas")
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"
    cmd = [exe, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", f.name, "-o", os.devnull]
    log = subprocess.run(cmd, capture_output=True, text=True).stderr.splitlines()
    os.unlink(f.name)
    regs = next((ln.split("Used ")[1].split(" ")[0] for ln in log if "Used " in ln), "?")
    spill = next((ln.split(": ")[-1].strip() for ln in log if "spill" in ln), "?")
    return {"registers": regs, "spills": spill, "shared": kernel.metadata.shared}


def main() -> None:
    print("| kernel | target | registers | shared B | stack / spills |\n|---|---|---|---|---|")
    for name in K.MODULES:
        mod = importlib.import_module(f"corda_kernels.kernels.{name}")
        for spec in getattr(mod, "compile_specs", list)():
            for cap in (90, 80):
                r = resources(spec, cap)
                print(f"| {spec['name']} | sm_{cap} | {r['registers']} | {r['shared']} | {r['spills']} |", flush=True)


if __name__ == "__main__":
    main()
