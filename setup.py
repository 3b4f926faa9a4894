"""Package build. The CUDA extension (csrc/) is built only when asked and possible."""

from setuptools import find_packages, setup

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
    ],
    extras_require={"triton": ["triton"], "gguf": ["gguf"]},
    entry_points={"console_scripts": ["corda-kernels=corda_kernels.cli:main"]},
)
