# The instruction-set path of a kernel module: included by matmul.pyx, qmatmul.pyx (through
# _matrix.pxi) and attention.pyx. It imports what it uses itself and needs one call from the
# including module, right after the include, naming the module's paths (best last) and the CPU
# features (keys of _cpu.features()) each one needs:
#
#     _init_isa({"avx2": (), "avx512": ("avx512",)})
#
# It defines set_isa and get_isa (Python), and the C int _isa that the kernels pass to C.
import os

from xllm._kernels._cpu import amx_status, features

_ISAS = ()  # the module's path names, best last (set by _init_isa)
_NEEDS = {}  # path name -> the CPU features it needs
cdef int _isa = 0  # index into _ISAS


def set_isa(name):
    """Select the kernel path, one of the module's ``_ISAS`` (ValueError if the CPU lacks it)."""
    global _isa
    if name not in _ISAS:
        raise ValueError(f"isa must be one of {_ISAS}, got {name!r}")
    if not all(features()[f] for f in _NEEDS.get(name, ())):
        if "amx" in _NEEDS[name] and not features()["amx"]:
            raise ValueError(f"{amx_status()}; use isa='amx-emulated' (tests) or 'avx512vnni'")
        raise ValueError(f"this CPU lacks {'/'.join(_NEEDS[name])}; use isa='avx2'")
    _isa = _ISAS.index(name)


def get_isa():
    """The kernel path in use."""
    return _ISAS[_isa]


def _init_isa(paths=None):
    """Select the best path this CPU has (never an emulation), or the one XLLM_ISA names: a
    path's exact name, else the first path it begins ("avx512" selects "avx512vnni" where that
    is the module's AVX-512 path); "amx" or "amx-emulated" in a module without tile kernels
    selects its best path. `paths` ({name: needed features}, best last) declares the module's
    paths, once, at import; without it the declared paths stay (tools/benchmark.py calls
    ``_init_isa()`` to return to the default path)."""
    global _ISAS, _NEEDS
    if paths is not None:
        _ISAS = tuple(paths)
        _NEEDS = dict(paths)
    want = os.environ.get("XLLM_ISA", "").strip().lower()
    if want in _ISAS:
        chosen = want
    elif want in _AMX_PATHS:  # a module without tile kernels keeps its best vector path
        chosen = _default_isa()
    elif want:
        named = [n for n in _ISAS if n.startswith(want)]
        chosen = named[0] if named else want  # (set_isa refuses a name that is no path)
    else:
        chosen = _default_isa()
    try:
        set_isa(chosen)
    except ValueError as e:
        raise ValueError(f"XLLM_ISA={want!r}: {e}") from None


# The tile paths (gemm_amx.h), which only some modules have. "amx-emulated" runs the same tile
# kernels on a scalar model of the tiles: for tests, never chosen unless named.
_AMX_PATHS = ("amx", "amx-emulated")


def _default_isa():
    """The best path this CPU has, among those that are not emulations."""
    usable = [n for n in _ISAS if all(features()[f] for f in _NEEDS.get(n, ()))
              and not n.endswith("-emulated")]
    return usable[len(usable) - 1]  # (the modules compile without wraparound)
