"""NumPy reference for every kernel: same names, signatures and semantics as the compiled
kernels; tests run the same cases through both. Conventions shared by all kernels:

- activations are float32, C-contiguous; results go into a caller-provided ``out``;
- weights are float32, float16, or uint16 arrays holding bfloat16 bit patterns (numpy has no
  bfloat16 dtype; ``uint16`` always means bf16 in xllm);
- a matrix ``w`` of shape [N, K] is used as ``x @ w.T`` (the layout of ``torch.nn.Linear``);
- bad input raises what the compiled kernels raise where that is practical: TypeError for arrays
  in non-native byte order, IndexError for ids and positions out of range, ValueError for a
  start past the cache (the compiled kernels also insist on C-contiguous aligned arrays)."""
import operator

import numpy as np

from .layout import (BLOCK, CODECS, K_SCALE_BYTES, KV_BLOCK, PANEL, SUPER, codec_block_params,
                     dequantize_codec_rows, dequantize_rows, to_float32, unpack_codec_codes,
                     unpack_codes, unpack_group_params)


def _native(*arrays):
    """TypeError for an array in non-native byte order: the compiled kernels would read its
    bytes swapped, so they refuse it, and so does the reference (numpy would convert it)."""
    for a in arrays:
        if isinstance(a, np.ndarray) and not a.dtype.isnative:
            raise TypeError(f"arrays must be in native byte order, got dtype {a.dtype}")


def _ids(ids, n, what="token ids"):
    """ids as an integer array, each in [0, n) (IndexError; no negative wrap-around)."""
    ids = np.asarray(ids)
    _native(ids)
    if not ids.size:  # (an empty list is float64 to numpy)
        return ids.astype(np.int64)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"{what} must be integers, got dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= n:
        raise IndexError(f"{what} must lie in [0, {n})")
    return ids


def matmul(x, w, out, accumulate=False):
    """out[M, N] = x[M, K] @ w[N, K].T  (``+=`` when accumulate)."""
    _native(x, w, out)
    y = (x.astype(np.float64) @ to_float32(w).astype(np.float64).T).astype(np.float32)
    if accumulate:
        out += y
    else:
        out[...] = y


def embedding(table, ids, out):
    """out[i] = table[ids[i]] as float32 (table: [V, D] in any weight dtype)."""
    _native(table, out)
    out[...] = to_float32(table[_ids(ids, table.shape[0])])


def rmsnorm(x, weight, eps, out):
    """out = x / sqrt(mean(x^2) + eps) * weight, per row; out may be x."""
    _native(x, weight, out)
    ms = np.mean(np.square(x.astype(np.float64)), axis=-1, keepdims=True)
    out[...] = (x / np.sqrt(ms + eps)).astype(np.float32) * weight


def rope(x, positions, cos, sin, n_heads, interleaved):
    """Rotate each head of x[M, n_heads*head_dim] in place by its row's position.

    interleaved=True rotates adjacent pairs (2i, 2i+1) (Meta, llama2.c, GGUF); False rotates
    (i, i + head_dim/2) ("rotate_half", Hugging Face).
    """
    _native(x, cos, sin)
    rows = x.shape[0]
    half = cos.shape[1]  # pairs rotated per head
    n_heads = operator.index(n_heads)
    if n_heads < 1 or x.shape[1] != n_heads * 2 * half:
        raise ValueError(f"x has {x.shape[1]} columns; expected n_heads ({n_heads}) * 2 * "
                         f"cos.shape[1] ({half})")
    heads = x.reshape(rows, n_heads, 2 * half)
    positions = _ids(positions, cos.shape[0], "positions")
    c = cos[positions][:, None, :]
    s = sin[positions][:, None, :]
    if interleaved:  # pairs (2i, 2i+1)
        first = heads[..., 0::2]
        second = heads[..., 1::2]
    else:  # pairs (i, i + half)
        first = heads[..., :half]
        second = heads[..., half:]
    first_before = first.copy()
    second_before = second.copy()
    first[...] = first_before * c - second_before * s
    second[...] = first_before * s + second_before * c


def softmax(x, out):
    """Row-wise softmax; out may be x."""
    _native(x, out)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    out[...] = e / e.sum(axis=-1, keepdims=True)


def silu_mul(a, b, out):
    """out = silu(a) * b = a / (1 + exp(-a)) * b; out may be a or b."""
    _native(a, b, out)
    out[...] = (a / (1.0 + np.exp(-a.astype(np.float64)))).astype(np.float32) * b


def _blocks(rows, capacity):
    """Rows [T, kv_dim] zero-padded to [ceil(capacity / KV_BLOCK), KV_BLOCK, kv_dim]."""
    t, kvd = rows.shape
    nb = -(-(t if capacity is None else capacity) // KV_BLOCK)
    padded = np.zeros((nb * KV_BLOCK, kvd), rows.dtype)
    padded[:t] = rows
    return padded.reshape(nb, KV_BLOCK, kvd)


def k_blocks(k_rows, capacity=None):
    """Key rows [T, kv_dim] as a K cache [ceil(capacity / KV_BLOCK), kv_dim, KV_BLOCK] (zeros
    past T; capacity defaults to T)."""
    return np.ascontiguousarray(_blocks(k_rows, capacity).transpose(0, 2, 1))


def k_rows(k_cache):
    """The key rows [blocks * KV_BLOCK, kv_dim] of a K cache (the inverse of k_blocks)."""
    return k_cache.transpose(0, 2, 1).reshape(-1, k_cache.shape[1])


def v_blocks(v_rows, n_kv_heads, capacity=None):
    """Value rows [T, kv_dim] as a V cache [ceil(capacity / KV_BLOCK), n_kv_heads, KV_BLOCK,
    head_dim] (zeros past T; capacity defaults to T)."""
    b = _blocks(v_rows, capacity)
    return np.ascontiguousarray(b.reshape(*b.shape[:2], n_kv_heads, -1).transpose(0, 2, 1, 3))


def v_rows(v_cache):
    """The value rows [blocks * KV_BLOCK, kv_dim] of a V cache (the inverse of v_blocks)."""
    nb, nkv, bk, hd = v_cache.shape
    return v_cache.transpose(0, 2, 1, 3).reshape(nb * bk, nkv * hd)


def attention(q, k_cache, v_cache, out, start_pos, n_heads, n_kv_heads, scale, window=0):
    """Causal grouped-query attention of M new queries over the cache.

    q, out: [M, n_heads*head_dim]; k_cache: [blocks, n_kv_heads*head_dim, KV_BLOCK] (k_blocks),
    v_cache: [blocks, n_kv_heads, KV_BLOCK, head_dim] (v_blocks), holding the first start_pos + M
    keys and values. Query row i sits at position start_pos + i and attends to keys
    0 .. start_pos + i, or with a sliding window (window > 0) to the last `window` of them,
    start_pos + i + 1 - window .. start_pos + i. Query head h reads KV head
    h // (n_heads // n_kv_heads).
    """
    _native(q, k_cache, v_cache, out)
    start_pos = operator.index(start_pos)
    n_heads = operator.index(n_heads)
    n_kv_heads = operator.index(n_kv_heads)
    window = operator.index(window)
    if window < 0:
        raise ValueError(f"window must be 0 (none) or positive, got {window}")
    if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise ValueError(f"n_heads ({n_heads}) must be a positive multiple of n_kv_heads "
                         f"({n_kv_heads})")
    m = q.shape[0]  # new query rows
    hd = q.shape[1] // n_heads  # head_dim
    if not 0 <= start_pos <= k_cache.shape[0] * KV_BLOCK - m:
        raise ValueError(f"start_pos {start_pos} + {m} rows exceeds the cache capacity "
                         f"{k_cache.shape[0] * KV_BLOCK} (or is negative)")
    if m == 0:
        return
    t = start_pos + m
    qh = q.reshape(m, n_heads, hd).astype(np.float64)
    k = k_rows(k_cache)[:t].reshape(t, n_kv_heads, hd).astype(np.float64)
    v = v_rows(v_cache)[:t].reshape(t, n_kv_heads, hd).astype(np.float64)
    o = out.reshape(m, n_heads, hd)
    position = start_pos + np.arange(m)[:, None]  # of each query row
    masked = np.arange(t)[None, :] > position
    if window:
        masked |= np.arange(t)[None, :] <= position - window
    group = n_heads // n_kv_heads
    for h in range(n_heads):
        s = (qh[:, h, :] @ k[:, h // group, :].T) * scale
        s[masked] = -np.inf
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        o[:, h, :] = p @ v[:, h // group, :]


def attention_batch(q, k_new, v_new, k_caches, v_caches, bounds, starts, out, n_heads,
                    n_kv_heads, scale, window=0):
    """Rows bounds[s]..bounds[s+1]-1 of q belong to sequence s (caches k_caches[s], v_caches[s]
    holding starts[s] rows before them): store the new rows k_new, v_new there (when given),
    then ``attention`` per sequence (with the sliding `window`, if any)."""
    _native(q, k_new, v_new, out, bounds, starts, *k_caches, *v_caches)
    bounds = [operator.index(b) for b in bounds]
    starts = [operator.index(s) for s in starts]
    n = len(k_caches)
    if (len(v_caches), len(bounds), len(starts)) != (n, n + 1, n):
        raise ValueError("need S caches of each kind, S + 1 bounds and S starts")
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(np.diff(bounds) < 0):
        raise ValueError(f"bounds must rise from 0 to the {q.shape[0]} rows of q")
    for s, kc in enumerate(k_caches):  # before anything is stored
        if not 0 <= starts[s] <= kc.shape[0] * KV_BLOCK - (bounds[s + 1] - bounds[s]):
            raise ValueError(f"start_pos {starts[s]} + {bounds[s + 1] - bounds[s]} rows exceeds "
                             f"the cache capacity {kc.shape[0] * KV_BLOCK} (or is negative)")
    for s, (kc, vc) in enumerate(zip(k_caches, v_caches)):
        first = bounds[s]  # the sequence's rows of q: first .. end-1
        end = bounds[s + 1]
        start = starts[s]  # the rows in its cache before them
        if k_new is not None:
            for i in range(end - first):
                t = start + i
                kc[t // KV_BLOCK, :, t % KV_BLOCK] = k_new[first + i]
                vc[t // KV_BLOCK, :, t % KV_BLOCK] = v_new[first + i].reshape(vc.shape[1], -1)
        if end > first:
            attention(q[first:end], kc, vc, out[first:end], start, n_heads, n_kv_heads, scale,
                      window)


# ---- sampling (float64 throughout so the compiled kernel can agree on the chosen token) ----

def argmax(x):
    """Index of the largest value of a 1-D array (the first one on ties)."""
    _native(x)
    return int(np.argmax(x))


def apply_repetition_penalty(logits, token_ids, penalty):
    """In place, once per distinct id in token_ids: logit / penalty if > 0 else logit * penalty."""
    _native(logits)
    ids = np.unique(_ids(token_ids, logits.shape[0]))
    sel = logits[ids]
    logits[ids] = np.where(sel > 0, sel / penalty, sel * penalty)


def sample(logits, temperature, top_k, top_p, min_p, u):
    """Draw a token from logits[V] with uniform number u in [0, 1).

    temperature <= 0 is greedy. Otherwise, in this order: divide by temperature; keep the top_k
    largest (top_k <= 0: all); keep the shortest prefix, by descending probability, whose
    probability mass reaches top_p; keep tokens whose probability is >= min_p times the largest;
    renormalise and return the first candidate (descending order, ties by lower id) at which the
    cumulative probability exceeds u. Like top_p, min_p always keeps the top token (min_p > 1).
    ValueError if temperature is NaN, or if (temperature > 0) logits hold NaN or +inf or are all
    -inf: there is no distribution to draw from.
    """
    _native(logits)
    if temperature != temperature:
        raise ValueError("temperature is NaN")
    if temperature <= 0:
        return argmax(logits)
    if not np.isfinite(np.max(logits)):
        raise ValueError("logits must not hold NaN or +inf, and must not all be -inf")
    z = logits.astype(np.float64) / temperature
    order = np.lexsort((np.arange(z.size), -z))  # descending value, ascending id
    if 0 < top_k < z.size:
        order = order[:top_k]
    zs = z[order]
    p = np.exp(zs - zs[0])
    p /= p.sum()
    if top_p < 1.0:
        before = np.cumsum(p) - p  # mass of the candidates ranked above
        keep = max(int(np.count_nonzero(before < top_p)), 1)
        order = order[:keep]
        p = p[:keep]
        p = p / p.sum()
    if min_p > 0.0:
        keep = max(int(np.count_nonzero(p >= min_p * p[0])), 1)
        order = order[:keep]
        p = p[:keep]
        p = p / p.sum()
    c = np.cumsum(p)
    i = int(np.searchsorted(c, u, side="right"))
    return int(order[min(i, order.size - 1)])


def quantize_activations(x, parts):
    """Step 1 of gemm_q.h: (q [3, M, K/32, 32] int64, the parts past `parts` 0; dx / 256 float32
    [M, K/32]) of x [M, K]."""
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    d = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(d[:, :, None] == 0, np.float32(0), xb / d[:, :, None])
    q = np.zeros((3, m, k // 32, 32), np.int64)
    for i in range(parts):
        q[i] = np.clip(np.rint(t), -127, 127)
        t = (t - q[i]) * np.float32(256)
    return q, d * np.float32(1 / 256)


def fma(a, b, c):
    """a * b + c rounded once to float32 (as an FMA instruction) for float32 arrays."""
    p = a.astype(np.float64) * b  # exact
    s = p + c
    e = (p - (s - (s - p))) + (c - (s - p))  # s + e == p + c exactly (TwoSum)
    r = s.astype(np.float32)
    # rounding s again to float32 is wrong only when s is a tie and p + c is not
    other = np.nextafter(r, np.where(s > r, np.float32(np.inf), np.float32(-np.inf)))
    tie = (e != 0) & (2 * s == r.astype(np.float64) + other)
    return np.where(tie & ((e > 0) == (other > r)), other, r)


def qmatmul(x, w, out, accumulate=False):
    """out (+)= x @ W.T for packed quantized weights W (or tuples of W and out): gemm_q.h's exact
    arithmetic, and gemm_k.h's for a codec. W is read through its fields (shape, bits, group,
    parts, codec, and the arrays qs, scales, mins, high, sub of layout.py), as the compiled
    kernel reads them."""
    if type(w) is tuple:
        if len({wi.parts for wi in w}) > 1:
            raise ValueError("weights sharing x need equal parts")
        for wi, oi in zip(w, out):
            qmatmul(x, wi, oi, accumulate)
        return
    _native(x, out, w.scales, w.mins)
    if w.shape[1] == 0:  # (no blocks: the product is 0)
        if not accumulate:
            out[...] = 0
        return
    q, dx = quantize_activations(np.asarray(x, np.float32), w.parts)
    if getattr(w, "codec", None) is not None:
        acc = _codec_products(q, dx, w)
    else:
        acc = _group_products(q, dx, w, x.shape[0])
    if accumulate:
        out += acc
    else:
        out[...] = acc


def _group_products(q, dx, w, m):
    """The products of gemm_q.h's int8 / int4 formats (steps 2 and 3)."""
    n, k = w.shape
    qw = unpack_codes(w.qs, w.bits, w.shape).reshape(n, k // 32, 32).astype(np.int64)
    if w.bits == 4 and w.mins is None:  # symmetric int4: codes minus 8
        qw -= 8
    c12 = np.einsum("mbi,nbi->mnb", 256 * q[0] + q[1], qw).astype(np.float32)
    c3 = np.einsum("mbi,nbi->mnb", q[2], qw).astype(np.float32)
    v = c12 + c3 * np.float32(1 / 256)
    s = (256 * q[0] + q[1]).sum(axis=2).astype(np.float32) + \
        q[2].sum(axis=2).astype(np.float32) * np.float32(1 / 256)
    dw, mw = unpack_group_params(w.scales, w.mins, w.shape)
    per = w.group // 32
    acc = np.zeros((m, n), np.float32)
    for b in range(k // 32):
        acc = fma(dw[None, :, b // per] * dx[:, b, None], v[:, :, b], acc)
        if mw is not None:
            acc = fma(mw[None, :, b // per], (dx[:, b] * s[:, b])[:, None], acc)
    return acc


def _codec_products(q, dx, w):
    """The products of gemm_k.h's codecs (steps 2 and 3): exact integer dots per block (per half
    for Q6_K), then per block in increasing order the scale term(s) (half 0, then half 1) and
    the minimum's."""
    n, k = w.shape
    m = q.shape[1]
    codec = CODECS[w.codec]
    qw = unpack_codec_codes(w.qs, w.high, w.shape).astype(np.int64) - codec.offset
    qw = qw.reshape(n, k // 32, 2, 16)
    qx = q.reshape(3, m, k // 32, 2, 16)
    c12 = np.einsum("mbhi,nbhi->mnbh", 256 * qx[0] + qx[1], qw)
    c3 = np.einsum("mbhi,nbhi->mnbh", qx[2], qw)
    halves = 2 if codec.name == "Q6_K" else 1
    if halves == 1:  # one dot over the whole block
        c12 = c12.sum(axis=3, keepdims=True)
        c3 = c3.sum(axis=3, keepdims=True)
    v = c12.astype(np.float32) + c3.astype(np.float32) * np.float32(1 / 256)
    s = (256 * q[0] + q[1]).sum(axis=2).astype(np.float32) + \
        q[2].sum(axis=2).astype(np.float32) * np.float32(1 / 256)
    ws, wm = codec_block_params(w)
    acc = np.zeros((m, n), np.float32)
    for b in range(k // 32):
        for h in range(halves):
            acc = fma(ws[None, :, b, h] * dx[:, b, None], v[:, :, b, h], acc)
        if wm is not None:
            acc = fma(wm[None, :, b], (dx[:, b] * s[:, b])[:, None], acc)
    return acc


def qembedding(table, ids, out):
    """out[i] = row ids[i] of the packed quantized `table`, dequantized to float32."""
    _native(out, table.scales, table.mins)
    rows = _ids(ids, table.shape[0])
    if getattr(table, "codec", None) is not None:
        out[...] = dequantize_codec_rows(table, rows)
        return
    out[...] = dequantize_rows(table.qs, table.scales, table.mins, table.bits, table.group,
                               table.shape, rows)


# ---- repacking GGUF blocks into a codec's layout (layout.py) ----

def repack_codec(raw, codec, shape, qs, scales, mins, high, sub, rows=1024):
    """Fill the arrays of a [N, K] weight of `codec` (layout.py's shapes, None where the codec
    has none; every byte is written, the rows that pad the last panel 0) from its rows of GGUF
    blocks ``raw`` (uint8 [N, K / group * bytes per block]), `rows` rows at a time."""
    c = CODECS[codec]
    n, k = shape
    blocks = raw.reshape(n, k // c.group, c.gguf_bytes)
    for r0 in range(0, n, rows):  # rows is a multiple of PANEL
        r1 = min(n, r0 + rows)
        codes, d, m, s = _codec_fields(blocks[r0:r1], codec)
        p0 = r0 // PANEL
        p1 = -(-r1 // PANEL)
        qs[p0:p1], planes = _pack_codes(codes, c.planes)
        if high is not None:
            high[p0:p1] = planes
        scales[p0:p1] = _panels(d)
        if mins is not None:
            mins[p0:p1] = _panels(m)
        if sub is not None:
            sub[p0:p1] = _panels(s.reshape(len(s), -1)).reshape(sub[p0:p1].shape)


def _codec_fields(blocks, name):
    """(codes [R, K] uint8, scales [R, K/G] float16, mins or None, sub [R, K/256, 12 or 16] or
    None) of rows of GGUF blocks [R, K/block, block bytes] of codec `name` (the layouts of
    ggml's block_q5_0 ... block_q6_K)."""
    r, nb, _ = blocks.shape

    def f16(offset):
        return np.ascontiguousarray(blocks[:, :, offset:offset + 2]).view(np.float16)[:, :, 0]

    def bits_of(field, count):
        """The bits of `field` [R, nb, bytes], little-endian, as [R, nb, count]."""
        return np.unpackbits(field, axis=2, bitorder="little")[:, :, :count]

    if name in ("Q5_0", "Q5_1"):  # d, (m,) qh (32 bits), qs: value i low nibble, 16 + i high
        start = 2 if name == "Q5_0" else 4
        qs = blocks[:, :, start + 4:start + 20]
        low = np.concatenate([qs & 15, qs >> 4], axis=2)
        codes = low | (bits_of(blocks[:, :, start:start + 4], 32) << 4)
        mins = f16(2) if name == "Q5_1" else None
        return codes.reshape(r, -1), f16(0), mins, None
    if name in ("Q4_K", "Q5_K"):  # d, dmin, 12 bytes of scales, (qh,) qs
        start = 16 if name == "Q4_K" else 48
        qs = blocks[:, :, start:start + 128].reshape(r, nb, 4, 1, 32)
        codes = np.concatenate([qs & 15, qs >> 4], axis=3).reshape(r, nb, SUPER)  # 64c + 32h + i
        if name == "Q5_K":  # bit s of qh[i]: value 32s + i
            qh = blocks[:, :, 16:48]
            high = np.unpackbits(qh[:, :, None, :], axis=2, bitorder="little")
            codes = codes | (high.reshape(r, nb, SUPER) << 4)
        return codes.reshape(r, -1), f16(0), f16(2), blocks[:, :, 4:4 + K_SCALE_BYTES]
    # Q6_K: ql [128], qh [64], int8 scales [16], d; halves of 128 values
    ql = blocks[:, :, 0:128].reshape(r, nb, 2, 1, 64)
    low = np.concatenate([ql & 15, ql >> 4], axis=3).reshape(r, nb, 2, 128)  # 64 s + i
    qh = blocks[:, :, 128:192].reshape(r, nb, 2, 1, 32)
    high = (qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3  # [.., half, s, i]: 32 s + i
    codes = low | (high.reshape(r, nb, 2, 128) << 4)
    sub = np.ascontiguousarray(blocks[:, :, 192:208]).view(np.int8)
    return codes.reshape(r, -1), f16(208), None, sub


def _panels(a):
    """Per-row values [R, C] (R a multiple of PANEL but for the last rows) as [panels, C, PANEL],
    rows padded with zeros."""
    padded = np.pad(a, ((0, -len(a) % PANEL), (0, 0)))
    return padded.reshape(len(padded) // PANEL, PANEL, a.shape[1]).transpose(0, 2, 1)


def _pack_codes(codes, planes):
    """(qs [panels, K/32, 256], high [panels, K/32, 64 * planes] or None) of unsigned codes
    [R, K] (layout.py's codec layout; rows padded with zeros to whole panels)."""
    r, k = codes.shape
    codes = np.pad(codes, ((0, -r % PANEL), (0, 0)))
    # [panel, row, block, half, line, t] -> [panel, block, half, line, row, t]
    q = codes.reshape(len(codes) // PANEL, PANEL, k // BLOCK, 2, 4, 4).transpose(0, 2, 3, 4, 1, 5)
    low = q & 15
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(len(q), k // BLOCK, 256)
    if not planes:
        return qs, None
    high = np.empty((len(q), k // BLOCK, 64 * planes), np.uint8)
    lines = q.reshape(len(q), k // BLOCK, 8, 64)  # the 8 lines of a block, byte 4 r + t
    for e in range(planes):
        bits = (lines >> (4 + e)) & 1
        masks = np.packbits(bits, axis=3, bitorder="little")  # [panel, block, line, 8]
        high[:, :, 64 * e:64 * e + 64] = masks.reshape(len(q), k // BLOCK, 64)
    return qs, high


