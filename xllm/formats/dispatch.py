"""Which kernel computes a product: the registry's ``kernel`` column. Float weights (arrays)
go to the backend's ``matmul`` and ``embedding``, packed weights (QTensor) to ``qmatmul`` and
``qembedding``."""
from .. import _kernels
from .qtensor import QTensor
from .registry import FLOAT, MATMUL, PANELS, QMATMUL, kernel_of_packing

# The kernel of each container of weights: arrays hold the FLOAT formats, QTensors the PANELS
# ones (EXPANDED formats are float32 arrays by the time they are multiplied).
PACKED_KERNEL = kernel_of_packing(PANELS)
FLOAT_KERNEL = kernel_of_packing(FLOAT)
# The embedding lookup that goes with each matrix product kernel.
EMBEDDING = {MATMUL: "embedding", QMATMUL: "qembedding"}


class Ops:
    """A kernel backend whose ``matmul`` and ``embedding`` take weights of any format.
    ``matmul(x, (w1, w2, ...), (out1, out2, ...))`` computes several products of one x (the
    quantized kernel quantizes x once for all of them)."""

    def __init__(self, backend):
        self.backend = backend
        self._packed_matmul = getattr(backend, PACKED_KERNEL)
        self._float_matmul = getattr(backend, FLOAT_KERNEL)
        self._packed_embedding = getattr(backend, EMBEDDING[PACKED_KERNEL])
        self._float_embedding = getattr(backend, EMBEDDING[FLOAT_KERNEL])
        # every other kernel (rmsnorm, rope, attention, sampling ...) as the backend has it
        for name in _kernels.KERNEL_NAMES:
            if name not in ("matmul", "embedding"):
                setattr(self, name, getattr(backend, name))

    def matmul(self, x, w, out, accumulate=False):
        if _all_quantized_alike(w):
            self._packed_matmul(x, w, out, accumulate)
        elif type(w) is tuple:  # weights sharing the input x, with their outputs
            for wi, oi in zip(w, out):
                self.matmul(x, wi, oi, accumulate)
        else:
            self._float_matmul(x, w, out, accumulate)

    def embedding(self, table, ids, out):
        if type(table) is QTensor:
            self._packed_embedding(table, ids, out)
        else:
            self._float_embedding(table, ids, out)


def _all_quantized_alike(w):
    """True for a QTensor, or a tuple of QTensors that one qmatmul call can take: any formats
    (a Q4_K_M file mixes Q4_K, Q6_K and Q5_0 in wq/wk/wv) with equal ``parts``; a tuple mixing
    parts (Q8_0's 2 beside Q4_x's 3) goes one by one."""
    if type(w) is QTensor:
        return True
    if type(w) is not tuple:
        return False
    return all(type(t) is QTensor and t.parts == w[0].parts for t in w)


_OPS = {}


def ops(backend=None) -> Ops:
    """The Ops of `backend` (default: the selected one, ``xllm._kernels.backend``), made once."""
    backend = _kernels.backend if backend is None else backend
    found = _OPS.get(id(backend))
    if found is None or found.backend is not backend:
        found = Ops(backend)
        _OPS[id(backend)] = found
    return found
