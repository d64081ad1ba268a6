# The instruction-set path of a kernel module (included by matmul.pyx, qmatmul.pyx and
# attention.pyx), which defines _ISAS (path names, best last) and _NEEDS (CPU features of each).

cdef int _isa = 0  # index into _ISAS


def set_isa(name):
    """Select the kernel path, one of the module's ``_ISAS`` (ValueError if the CPU lacks it)."""
    global _isa
    if name not in _ISAS:
        raise ValueError(f"isa must be one of {_ISAS}, got {name!r}")
    if not all(features()[f] for f in _NEEDS.get(name, ())):
        raise ValueError(f"this CPU lacks {'/'.join(_NEEDS[name])}; use isa='avx2'")
    _isa = _ISAS.index(name)


def get_isa():
    """The kernel path in use."""
    return _ISAS[_isa]


def _init_isa():
    # The best path this CPU has, or the one XLLM_ISA names ("avx512" selects "avx512vnni" where
    # that is the module's AVX-512 path).
    want = os.environ.get("XLLM_ISA", "").strip().lower()
    names = [n for n in _ISAS if n.startswith(want)]
    usable = [n for n in _ISAS if all(features()[f] for f in _NEEDS.get(n, ()))]
    try:
        set_isa((names or [want])[0] if want else usable[len(usable) - 1])  # no wraparound
    except ValueError as e:
        raise ValueError(f"XLLM_ISA={want!r}: {e}") from None
