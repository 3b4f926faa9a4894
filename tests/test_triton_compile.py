"""Every Triton kernel compiles for Hopper (sm_90) and Ampere (sm_80), on this CPU-only machine.

The compile runs in a subprocess with ``TRITON_INTERPRET=0`` (the interpreter replaces
``@triton.jit`` functions, so they could not be compiled in the test process) and a fresh
``TRITON_CACHE_DIR`` (so nothing is served from an old cache). No driver is needed:
``triton.compile`` with an explicit ``GPUTarget`` runs the whole pipeline
(TTIR → TTGIR → LLVM IR → PTX → cubin) with the ``ptxas`` bundled in the triton wheel.

Every module of :mod:`corda_kernels.kernels` is imported; each ``compile_specs()`` entry
(``fn``, ``signature``, ``constexprs``, ``name``, optional ``num_warps`` / ``num_stages`` /
``attrs`` = {argument: Triton attributes such as ``[["tt.divisibility", 16]]``, as a launch
specializes them} / ``ptx_contains`` = {capability: text or list of texts the PTX must
contain}) is compiled for both targets, and
every ``@triton.jit`` function a module defines must be covered by one of its specs (or be a
helper called from a covered kernel), so kernels added later are checked without touching this
file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = [("cuda", 90, 32), ("cuda", 80, 32)]

WORKER = textwrap.dedent(
    """
    import importlib, json, sys, traceback
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    import corda_kernels.kernels as K

    targets = json.loads(sys.argv[1])
    results = []
    for mod_name in K.MODULES:
        mod = importlib.import_module(f"corda_kernels.kernels.{mod_name}")
        jitted = {name for name, obj in vars(mod).items() if isinstance(obj, JITFunction)}
        specs = mod.compile_specs() if hasattr(mod, "compile_specs") else []
        covered = {getattr(s["fn"], "__name__", None) for s in specs}
        # @triton.jit helpers called by a covered kernel are compiled with it.
        grew = True
        while grew:
            srcs = [vars(mod)[c].src for c in covered if c in jitted]
            extra = {h for h in jitted - covered if any(h + "(" in src for src in srcs)}
            covered |= extra
            grew = bool(extra)
        for name in sorted(jitted - covered):
            results.append({"module": mod_name, "name": name, "target": None, "ok": False,
                            "error": "@triton.jit function without a compile_specs() entry"})
        for spec in specs:
            for backend, cap, warp in targets:
                row = {"module": mod_name, "name": spec["name"], "target": f"{backend}:{cap}"}
                try:
                    opts = {k: spec[k] for k in ("num_warps", "num_stages") if k in spec}
                    fn = spec["fn"]
                    attrs = {(fn.arg_names.index(a),): v for a, v in spec.get("attrs", {}).items()}
                    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec.get("constexprs", {}),
                                    attrs=attrs)
                    kernel = triton.compile(src, target=GPUTarget(backend, cap, warp), options=opts)
                    ptx = kernel.asm["ptx"]
                    need = spec.get("ptx_contains", {}).get(cap) or []
                    need = [need] if isinstance(need, str) else list(need)
                    missing = [w for w in need if w not in ptx]
                    row.update(ok=bool(kernel.asm.get("cubin")) and not missing,
                               cubin_bytes=len(kernel.asm.get("cubin", b"")), shared=kernel.metadata.shared,
                               ptx_needed=need, ptx_missing=missing)
                except Exception:
                    row.update(ok=False, error=traceback.format_exc()[-1500:])
                results.append(row)
    print("RESULTS" + json.dumps(results))
    """
)


def test_every_kernel_compiles_for_hopper_and_ampere(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        TRITON_CACHE_DIR=str(tmp_path / "triton_cache"),
        TRITON_DEFAULT_FP_FUSION="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(TARGETS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS") :])
    failed = [r for r in results if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)[-6000:]
    modules = {r["module"] for r in results}
    # The kernels of this package that must always be there (others are picked up as added).
    assert {"covariance_triton", "damping_triton"} <= modules, modules
    for mod in modules:
        done = {r["target"] for r in results if r["module"] == mod}
        assert done == {f"{b}:{c}" for b, c, _ in TARGETS}, (mod, done)
    print("\n".join(f"{r['target']:8s} {r['module']}.{r['name']}: cubin {r['cubin_bytes']} B" for r in results))
