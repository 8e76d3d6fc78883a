"""Builds the fused CPU kernels of the Mamba block (mdaf_dist/models/csrc) ahead of time, as a
torch C++ extension; everything else about the package is in pyproject.toml.

torch must be installed before (`make install` does it in order, and installs with
--no-build-isolation so that the build uses that torch rather than downloading one). Where the
build is missing, mdaf_dist/models/cpu_kernels.py compiles the kernels on first use instead.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

# the kernels' module alone (not the package, whose imports need torchrec): its names and flags
_spec = importlib.util.spec_from_file_location("cpu_kernels", Path(__file__).parent / "mdaf_dist" / "models" / "cpu_kernels.py")
kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernels)

setup(
    ext_modules=[
        CppExtension(
            kernels.PREBUILT,
            [str(source.relative_to(Path(__file__).resolve().parent)) for source in kernels.SOURCES],
            extra_compile_args=kernels.CFLAGS,
            extra_link_args=kernels.LDFLAGS,
        ),
    ],
    # no_python_abi_suffix: the library registers torch ops and has no Python module interface
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=True, use_ninja=True)},
)
