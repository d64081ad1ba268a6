"""The load-time repacking of GGUF Q8_0 / Q4_0 / Q4_1 blocks (``qtensor.from_gguf_blocks``,
which moves the codes as whole 4-byte groups) against the generic packer ``qtensor.pack``,
given the codes and parameters read out of the blocks one value at a time from the GGUF block
definitions (ggml's ``block_q8_0``, ``block_q4_0``, ``block_q4_1``): the arrays must be
bitwise equal (scales and minimums compared as float16 bits, so NaN and -0.0 count), for any
bytes in the blocks and any number of rows, a whole number of panels of 16 or not."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.formats import qtensor as quant

# kind: (bytes per 32-value block, bits, offset of the codes: after d, or d and m)
KINDS = {"Q8_0": (34, 8, 2), "Q4_0": (18, 4, 2), "Q4_1": (20, 4, 4)}


def codes_and_params(raw, kind, n, k):
    """(codes [n, k], scales [n, k/32], mins or None) of GGUF blocks, value by value."""
    block_bytes, bits, start = KINDS[kind]
    blocks = raw.reshape(n, k // 32, block_bytes)
    scales = blocks[:, :, 0:2].copy().view(np.float16)[:, :, 0]
    mins = blocks[:, :, 2:4].copy().view(np.float16)[:, :, 0] if start == 4 else None
    codes = np.empty((n, k // 32, 32), np.int16)
    for j in range(32):
        if bits == 8:
            codes[:, :, j] = blocks[:, :, start + j].view(np.int8)
        elif j < 16:  # byte j: value j in the low nibble, value j + 16 in the high one
            codes[:, :, j] = blocks[:, :, start + j] & 15
        else:
            codes[:, :, j] = blocks[:, :, start + j - 16] >> 4
    return codes.reshape(n, k), scales, mins


def bits_of(a):
    return None if a is None else a.view(np.uint16 if a.dtype == np.float16 else np.uint8)


@settings(deadline=None, max_examples=60)
@given(kind=st.sampled_from(sorted(KINDS)), n=st.integers(1, 50), blocks=st.integers(1, 6),
       seed=st.integers(0, 2**32 - 1))
def test_repack_equals_pack_of_the_codes(kind, n, blocks, seed):
    block_bytes, bits, _ = KINDS[kind]
    k = 32 * blocks
    raw = np.random.default_rng(seed).integers(0, 256, (n, blocks * block_bytes), np.uint8)
    codes, scales, mins = codes_and_params(raw, kind, n, k)
    want = quant.pack(codes, scales, mins, bits, 32)
    got = quant.from_gguf_blocks(raw, kind, (n, k))
    assert got.shape == want.shape and got.bits == want.bits and got.group == 32
    for name in ("qs", "scales", "mins"):
        a = getattr(got, name)
        b = getattr(want, name)
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape and a.flags.c_contiguous
        np.testing.assert_array_equal(bits_of(a), bits_of(b), err_msg=name)


def test_repack_reads_a_read_only_view_and_copies_it():
    """The loader passes a read-only view of the mapped file; the QTensor owns its arrays."""
    raw = np.random.default_rng(0).integers(0, 256, (17, 2 * 20), np.uint8)
    view = raw.view()
    view.flags.writeable = False
    t = quant.from_gguf_blocks(view, "Q4_1", (17, 64))
    for a in (t.qs, t.scales, t.mins):
        assert not np.shares_memory(a, raw)


def test_repack_refuses_a_size_that_does_not_match():
    raw = np.zeros((16, 34), np.uint8)
    with pytest.raises(ValueError):
        quant.from_gguf_blocks(raw, "Q8_0", (16, 64))
