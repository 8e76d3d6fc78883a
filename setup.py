"""Install with `make install` (see README): torch, fbgemm-gpu and torchrec are pinned there
because torchrec must go in with --no-deps (its fbgemm-gpu dependency would pull the CUDA build
over the CPU one)."""

from setuptools import find_packages, setup

setup(
    name="mdaf_dist",
    version="0.1.0",
    description="Distributed trainer for MDAF (Mamba-DCN with Adaptive Fusion) CTR models",
    packages=find_packages(include=["mdaf_dist", "mdaf_dist.*"]),
    # the fused CPU kernels of the Mamba block, compiled on first use (mdaf_dist/models/cpu_kernels.py)
    package_data={"mdaf_dist.models": ["csrc/*.cpp"]},
    python_requires=">=3.10",
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.26",
        "pyarrow>=16",
        "fsspec>=2024.1",
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "tensorboard>=2.16",
        "matplotlib>=3.8",
        # the studies' significance tests (paired t-test, normal tail of DeLong's statistic)
        "scipy>=1.11",
        "torchx==0.7.0",
        # torchrec's real dependencies (torchrec itself is installed with --no-deps)
        "tensordict",
        "torchmetrics==1.0.3",
        "pyre-extensions",
        "iopath",
        # builds the fused CPU selective scan with torch.utils.cpp_extension (needs a C++ compiler)
        "ninja",
        # `mdaf export` writes the unsharded weights in safetensors
        "safetensors>=0.8",
    ],
    extras_require={
        "cpu": ["fbgemm-gpu-cpu==1.8.0"],
        "cuda": ["fbgemm-gpu==1.8.0"],
        # mamba_ssm's fused selective scan: optional, builds from source (needs nvcc)
        "mamba": ["mamba-ssm"],
        "test": ["pytest>=8", "scikit-learn>=1.4"],
    },
    entry_points={"console_scripts": ["mdaf=mdaf_dist.cli:main"]},
)
