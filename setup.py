"""Build the optional C++ extension ``scalselect_fast._native`` from ``csrc/``.

Everything else is declared in ``pyproject.toml``. The extension is required at build time (a
failed compile fails the install, loudly), but the package runs without it: ``scalselect_fast.native``
falls back to numpy when the module cannot be imported.
"""
import glob
import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

extra_compile_args = []
if sys.platform != "win32":
    # -O3 for the hot loops; F16C/AVX2 are selected at run time per function (target attributes),
    # so the binary still loads on older x86-64 CPUs.
    extra_compile_args = ["-O3", "-fvisibility=hidden", "-pthread"]

# Compile the csrc/ files in parallel (one job per core unless NPY_NUM_BUILD_JOBS says otherwise).
ParallelCompile("NPY_NUM_BUILD_JOBS", default=0).install()

ext_modules = [
    Pybind11Extension(
        "scalselect_fast._native",
        sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
        cxx_std=17,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-pthread"] if sys.platform != "win32" else [],
    )
]

setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
