"""Compile checks of ``csrc/`` without a GPU: the CMake build of every CUDA kernel for sm_80 and
sm_90a (no register spills), and the CUDA half of the torch bindings against torch's headers.

The kernels' results are checked on a GPU by ``bench/gpu_cuda.py``; their shared NF4 arithmetic
runs here through the C++ CPU kernels (``tests/test_compiled_ops.py``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _cuda_include() -> Path | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    for candidate in (Path(nvcc).resolve().parent.parent, *sorted(Path("/usr/local").glob("cuda*"))):
        if (candidate / "include" / "cuda_runtime_api.h").exists():
            return candidate / "include"
    pytest.fail(f"nvcc found ({out.splitlines()[-1] if out else nvcc}) but not its cuda_runtime_api.h")


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")


@needs_nvcc
@pytest.mark.skipif(shutil.which("cmake") is None, reason="CMake is not installed on this machine")
def test_cmake_builds_every_cuda_kernel_for_sm80_and_sm90a(tmp_path: Path) -> None:
    assert CUDA_SOURCES, "no CUDA sources under csrc/cuda"
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), "-DCORDA_BUILD_TORCH=OFF", "-DCORDA_CUDA_ARCHS=80;90a",
    ]  # fmt: skip
    if shutil.which("ninja"):
        configure += ["-G", "Ninja"]
    done = subprocess.run(configure, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "CUDA kernels for 80;90a" in done.stdout
    done = subprocess.run(["cmake", "--build", str(build), "-j", "2"], capture_output=True, text=True)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-5000:]
    assert "spill" not in log.lower(), log[-5000:]  # -Xptxas=-warn-spills: registers suffice on both targets
    lib = build / "libcorda_cuda_kernels.a"
    assert lib.exists() and (build / "libcorda_cpu_kernels.a").exists()
    cuobjdump = shutil.which("cuobjdump")
    triton_bin = Path(sys.prefix).glob("lib/python*/site-packages/triton/backends/nvidia/bin/cuobjdump")
    cuobjdump = cuobjdump or next((str(p) for p in triton_bin), None)
    if cuobjdump:  # every source carries machine code for both targets
        listing = subprocess.run([cuobjdump, "--list-elf", str(lib)], capture_output=True, text=True).stdout
        for src in CUDA_SOURCES:
            member = listing.split(f"{src.name}.o")[1].split("member")[0]
            assert "sm_80.cubin" in member and "sm_90a.cubin" in member, listing


@needs_nvcc
def test_cuda_bindings_compile_against_torch_headers(tmp_path: Path) -> None:
    """The CUDA implementations in csrc/torch_bindings.cpp, syntax- and type-checked with g++.

    A CPU wheel of torch ships c10/cuda's headers but not the one CMake generates for CUDA builds
    (``cuda_cmake_macros.h``): an empty stand-in is enough for a syntax check.
    """
    include = _cuda_include()
    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
    torch_inc = Path(torch.__file__).parent / "include"
    cmd = [
        shutil.which("g++") or "c++", "-std=c++17", "-fsyntax-only", "-DCORDA_WITH_CUDA",
        f"-I{ROOT / 'csrc' / 'include'}", f"-I{tmp_path / 'shim'}", f"-I{torch_inc}",
        f"-I{torch_inc / 'torch' / 'csrc' / 'api' / 'include'}", f"-I{include}",
        str(ROOT / "csrc" / "torch_bindings.cpp"),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
