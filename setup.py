"""Package build. ``pip install -e .`` also builds the compiled kernels of ``csrc/`` with CMake.

The CMake build (``CMakeLists.txt``, the pattern vLLM uses) makes ``corda_kernels/_C*.so``: the C++
CPU kernels always, the CUDA kernels too when nvcc and a CUDA torch are present. It needs torch at
build time, so install with ``--no-build-isolation`` (``scripts/env.sh`` does). Without CMake or a
compiler the build warns and the package runs on its torch and Triton backends.
Environment: ``CORDA_CUDA_ARCHS`` (default ``80;90a``), ``CORDA_BUILD_CUDA=0`` to skip CUDA,
``MAX_JOBS`` for parallel compile jobs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build the ``_C`` target with CMake, writing the file setuptools expects."""

    def build_extension(self, ext: Extension) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            self.warn("corda_kernels: CMake not found; the compiled kernels are not built (torch/Triton only)")
            return
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        args = [
            cmake,
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCORDA_EXT_OUTPUT={out}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCORDA_CUDA_ARCHS={os.environ.get('CORDA_CUDA_ARCHS', '80;90a')}",
            f"-DCORDA_BUILD_CUDA={'OFF' if os.environ.get('CORDA_BUILD_CUDA') == '0' else 'ON'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        try:
            subprocess.run(args, check=True)
            subprocess.run([cmake, "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            self.warn(f"corda_kernels: building the compiled kernels failed ({e}); torch/Triton backends only")


setup(
    name="corda_kernels",
    version="0.1.0",
    description="Fast, complete CorDA / CorDA++ adapter initialization: Triton/CUDA kernels under a thin PyTorch layer",
    packages=find_packages(include=["corda_kernels", "corda_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers",
        "peft",
        "attrs",
        "bitsandbytes",
        "safetensors",
        "tqdm",
        "matplotlib",
        "scipy",
        "threadpoolctl",
    ],
    extras_require={"triton": ["triton"], "gguf": ["gguf"]},
    ext_modules=[CMakeExtension("corda_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["corda-kernels=corda_kernels.cli:main"]},
)
