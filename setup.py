"""Build the Cython kernels.

Every module in xllm/_kernels/*.pyx is compiled with -O3 -mavx2 -mfma -mf16c and OpenMP, except
``_cpu`` (compiled for the baseline ISA, so importing it can never raise "Illegal instruction":
xllm asks it which instruction sets the CPU has before importing the AVX2 modules).
Faster paths (AVX-512) are selected at run time inside the kernels, via target attributes.
"""
import os
import subprocess
import sys
import tempfile
import warnings
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

SIMD_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
BASE_FLAGS = ["-O3", "-fno-math-errno", "-Wno-unused-function", "-Wno-unreachable-code"]


def _compiler_accepts(flag: str) -> bool:
    """True if the C compiler builds and links an OpenMP program with `flag`."""
    cc = os.environ.get("CC", "cc")
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([cc, flag, path, "-o", os.path.join(d, "t")],
                               capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


if sys.platform == "win32":
    OPENMP, SIMD_FLAGS, BASE_FLAGS = ["/openmp"], ["/arch:AVX2"], ["/O2"]
elif os.environ.get("XLLM_NO_OPENMP") != "1" and _compiler_accepts("-fopenmp"):
    OPENMP = ["-fopenmp"]
else:
    OPENMP = []
    warnings.warn("xllm: the C compiler has no OpenMP support; kernels will run on one thread.")


def extension(pyx: str) -> Extension:
    name = "xllm._kernels." + os.path.splitext(os.path.basename(pyx))[0]
    baseline = name.endswith("._cpu")  # also holds the thread count
    return Extension(
        name, [pyx], include_dirs=[numpy.get_include(), "xllm/_kernels"],
        extra_compile_args=BASE_FLAGS + ([] if baseline else SIMD_FLAGS + OPENMP),
        extra_link_args=[] if baseline else OPENMP,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


# Developers may rebuild a subset in place: XLLM_BUILD_ONLY=matmul,norm python setup.py build_ext -i
ONLY = {m for m in os.environ.get("XLLM_BUILD_ONLY", "").split(",") if m}
PYX = [p for p in sorted(glob("xllm/_kernels/*.pyx"))
       if not ONLY or os.path.splitext(os.path.basename(p))[0] in ONLY]

setup(
    ext_modules=cythonize(
        [extension(p) for p in PYX],
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ),
)
