"""Build the Cython kernels.

Every module in xllm/_kernels/*.pyx is compiled with -O3 -mavx2 -mfma -mf16c and OpenMP, except
``_cpu`` (compiled for the baseline ISA, so importing it can never raise "Illegal instruction":
xllm asks it which instruction sets the CPU has before importing the AVX2 modules).
Faster paths (AVX-512) are selected at run time inside the kernels, via target attributes.

Compiling takes one to two minutes on two cores; the build says which module it compiles (pip shows
it with -v). An extension already built in place (xllm/_kernels/*.so, as every editable install
leaves it) that is newer than its sources, the kernel headers and this file is reused instead of
compiled again, so a second ``pip install -e .`` compiles nothing. ``XLLM_REBUILD=1`` compiles
everything regardless (e.g. after changing CC or XLLM_NO_OPENMP, or upgrading numpy).
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from glob import glob

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

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


# Files every kernel module may read at compile time: a change to any of them rebuilds them all.
DEPENDS = sorted(glob("xllm/_kernels/*.h") + glob("xllm/_kernels/*.pxd")
                 + glob("xllm/_kernels/*.pxi") + ["setup.py"])


def extension(pyx: str) -> Extension:
    name = "xllm._kernels." + os.path.splitext(os.path.basename(pyx))[0]
    baseline = name.endswith("._cpu")  # also holds the thread count
    return Extension(
        name, [pyx], include_dirs=[numpy.get_include(), "xllm/_kernels"], depends=DEPENDS,
        extra_compile_args=BASE_FLAGS + ([] if baseline else SIMD_FLAGS + OPENMP),
        extra_link_args=[] if baseline else OPENMP,
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )


# Developers may rebuild a subset in place: XLLM_BUILD_ONLY=matmul,norm python setup.py build_ext -i
ONLY = {m for m in os.environ.get("XLLM_BUILD_ONLY", "").split(",") if m}
PYX = [p for p in sorted(glob("xllm/_kernels/*.pyx"))
       if not ONLY or os.path.splitext(os.path.basename(p))[0] in ONLY]


def in_place_build(pyx: str) -> str:
    """Where an in-place build of `pyx` puts its module for this interpreter."""
    return os.path.splitext(pyx)[0] + sysconfig.get_config_var("EXT_SUFFIX")


def up_to_date(pyx: str) -> bool:
    """Whether the in-place build of `pyx` exists and is newer than the .pyx and DEPENDS (then
    it is reused: neither translated by Cython nor compiled). Not the generated .c: Cython
    writes it again whenever the numpy it cimports was installed afresh, as in every isolated
    build environment of pip."""
    built = in_place_build(pyx)
    if os.environ.get("XLLM_REBUILD") == "1" or not os.path.exists(built):
        return False
    newest = max(os.path.getmtime(f) for f in [pyx] + DEPENDS)
    return os.path.getmtime(built) > newest


class BuildKernels(build_ext):
    """build_ext that says what it compiles and how long it took, and reuses an up-to-date
    in-place build (see the module docstring and up_to_date)."""

    def run(self):
        print(f"xllm: building {len(self.extensions)} kernel modules (Cython + C, -O3, OpenMP); "
              "compiling takes one to two minutes on two cores", file=sys.stderr, flush=True)
        started = time.perf_counter()
        super().run()
        print(f"xllm: kernel modules ready in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)

    def build_extension(self, ext):
        pyx = os.path.join(*ext.name.split(".")) + ".pyx"
        if ext.name in REUSED:
            built = in_place_build(pyx)
            destination = self.get_ext_fullpath(ext.name)
            if os.path.abspath(built) != os.path.abspath(destination):
                os.makedirs(os.path.dirname(destination), exist_ok=True)
                shutil.copy2(built, destination)
            print(f"xllm: {ext.name} is up to date ({built}): not compiled", file=sys.stderr,
                  flush=True)
            return
        print(f"xllm: compiling {ext.name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        super().build_extension(ext)
        print(f"xllm: compiled {ext.name} in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)


# Up-to-date modules keep their .pyx source untranslated (BuildKernels copies their build);
# the others go through Cython.
REUSED = {extension(p).name for p in PYX if up_to_date(p)}
STALE = [extension(p) for p in PYX if extension(p).name not in REUSED]
setup(
    cmdclass={"build_ext": BuildKernels},
    ext_modules=[extension(p) for p in PYX if extension(p).name in REUSED] + (cythonize(
        STALE,
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ) if STALE else []),
)
