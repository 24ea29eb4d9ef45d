"""Install pydl: the package `pydl`, with the top-level `kernels/` folder mapped to `pydl.kernels`.

A top-level package named `kernels` would collide with the `kernels` package on PyPI, so the
folder keeps its short name in the repository and is installed under pydl.
"""
from setuptools import setup

setup(
    name="pydl",
    version="0.1.0",
    description="Handwritten Triton and Numba CUDA kernels for the core ops of deep networks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["pydl", "pydl.reference", "pydl.kernels", "pydl.kernels.triton", "pydl.kernels.numba"],
    package_dir={"pydl": "pydl", "pydl.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        # The GPU machine runs triton 3.6; tests in emulation pin the same release so what
        # passes in the interpreter also compiles there.
        "triton>=3.6,<3.7",
        "numba>=0.60",
        "numba-cuda>=0.20",
        # triton 3.6's interpreter breaks `for k in range(0, K, BLOCK)` loops with numpy 2.4.
        "numpy>=1.26,<2.4",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "hypothesis>=6",
                 "scikit-learn>=1.3"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7", "tqdm>=4"],
        "cupy": ["cupy-cuda13x>=13"],
        "examples": ["scikit-learn>=1.3", "matplotlib>=3.7"],
    },
)
