/* Causal grouped-query attention over blocked KV caches, and the store of new keys and values
 * into them (included by attention.pyx, which splits the rows into work items and runs them on
 * several threads).
 *
 * Caches are stored in blocks of XA_BK rows, so that one KV head's part of a block is contiguous.
 * K transposed, [blocks][kv_dim][XA_BK]: element (key t, column c) at (t / XA_BK, c, t % XA_BK);
 * the scores of a query against a block are then XA_BK / W vectors of W keys built with broadcast
 * FMAs (no horizontal sums) by the same operations for one query row or many. V [blocks]
 * [n_kv_heads][XA_BK][head_dim]: value t of head g at (t / XA_BK, g, t % XA_BK). float32, or
 * float16 for both (widening float16 to float32 is exact, so where it happens changes nothing).
 *
 * Operation order. A row is one query head at one position, attending to keys lo .. nk-1: its
 * first nk keys, or with a sliding window of w keys (w > 0) the last w of them, lo = max(0,
 * nk - w) (w = 0: no window, lo = 0):
 *   1. qs = q * scale, acc[0..hd) = 0, running max m = -inf, running sum l = 0;
 *   2. for each block of XA_BK keys that holds a key of lo .. nk-1, in increasing order:
 *      a. scores: s[j] = sum over d = 0 .. hd-1, in increasing d, of qs[d] * K[d][j], one chain
 *         of FMAs from 0 per key j (one lane per key);
 *      b. softmax step (xa_softmax, 8 lanes on either path): with a = max(lo - block start, 0)
 *         and n = min(nk - block start, XA_BK), bm = the largest of scores a .. n-1; if bm > m,
 *         c = expf(m - bm) scales l and acc and m = bm; p[j] = xllm_exp_ps(s[j] - m) (0 for
 *         j < a and j >= n); l += the sum of the 4 vectors of p in order, then xllm_hsum256;
 *      c. acc[d] += sum over a <= j < n, in increasing j, of p[j] * V[j][d], one chain of FMAs
 *         per column d (one lane per column), continuing from acc;
 *   3. out[d] = acc[d] * (1 / l).
 * Blocks before the block of the smallest lo of a call are never read: a cache may have
 * released them (the caller passes the cache from its first block still held, and nk, lo
 * relative to it).
 * Batch invariance. Rows share a call, and a register tile, only to share the loads of the
 * blocks: each row keeps its own accumulators, a tile of MR rows runs the same chain for each
 * row whatever MR is (the rows of a tile in step 2c have the same a and n), and the AVX2 (W = 8)
 * and AVX-512 (W = 16) paths differ only in how many independent lanes one instruction runs
 * (columns past hd are masked: loaded as 0, never stored; scores outside a .. n-1 become -inf
 * before the exp). So a row's result does not depend on the other rows of its call, on how
 * attention.pyx splits the work, on the thread count or on the path: both paths give the same
 * bits.
 */
#ifndef XLLM_ATTENTION_H
#define XLLM_ATTENTION_H

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "vecmath.h"

#define XA_BK 32
#define XA_ROWBUF 4096   /* floats of queries (and of output accumulators) per work item */

/* One block of a row's online softmax: s holds its XA_BK scores, those of a .. n-1 valid
 * (0 <= a < n). Raises the running max *m (scaling *l and acc[0..hdp) by exp(old - new)), turns
 * s into p = exp(s - *m) (0 outside a .. n-1) and adds their sum to *l. */
static inline void xa_softmax(float *s, int a, int n, float *m, float *l, float *acc, int hdp) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 v[4], mx = ninf, sum = _mm256_setzero_ps();
    for (int u = 0; u < 4; u++) {
        __m256i valid = _mm256_andnot_si256(xllm_tail_mask(a - 8 * u), xllm_tail_mask(n - 8 * u));
        __m256 keep = _mm256_castsi256_ps(valid);
        v[u] = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + 8 * u), keep);
        mx = _mm256_max_ps(mx, v[u]);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float bm = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    if (bm > *m) {  /* from -inf the factor is 0: nothing accumulated yet */
        __m256 c = _mm256_set1_ps(expf(*m - bm));
        *l *= _mm256_cvtss_f32(c);
        for (int d = 0; d < hdp; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_mul_ps(_mm256_loadu_ps(acc + d), c));
        *m = bm;
    }
    for (int u = 0; u < 4; u++) {  /* exp(-inf) = 0 for the lanes past n */
        __m256 e = xllm_exp_ps(_mm256_sub_ps(v[u], _mm256_set1_ps(*m)));
        _mm256_storeu_ps(s + 8 * u, e);
        sum = _mm256_add_ps(sum, e);
    }
    *l += xllm_hsum256(sum);
}

/* The kernels come in two widths W: 8 lanes (AVX2) and 16 (AVX-512). Each lane runs the same
 * chain of FMAs at either width, so both paths give the same bits. Per width: the vector type
 * xa_v##W, the intrinsic f as XA_MM##W(f), the query rows of a register tile XA_MR##W;
 * xa_ld##W(p, i, f16, n): W values at element i of a float32 or (f16) float16 array, only the
 * first n when n < W; xa_st##W(p, x, n): stores the first n of the W floats x at p. */
#define XA_T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")))
#define xa_v8 __m256
#define xa_v16 __m512
#define XA_MM8(f) _mm256_##f
#define XA_MM16(f) _mm512_##f
#define XA_MR8 2    /* p*V: 2 x 4 accumulators (of 16 registers) */
#define XA_MR16 6   /* 6 x 4 (of 32) */
/* the mask of the first n lanes, without branches so that it is hoisted out of loops */
#define XA_MASK16(n) ((__mmask16)((1u << ((n) < 0 ? 0 : (n) > 16 ? 16 : (n))) - 1))

static inline __m256 xa_ld8(const void *p, ptrdiff_t i, int f16, int n) {
    if (n >= 8)
        return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)))
                   : _mm256_loadu_ps((const float *)p + i);
    if (!f16) return _mm256_maskload_ps((const float *)p + i, xllm_tail_mask(n));
    uint16_t t[8] = {0};
    memcpy(t, (const uint16_t *)p + i, 2 * (size_t)(n > 0 ? n : 0));
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)t));
}

static inline XA_T512 __m512 xa_ld16(const void *p, ptrdiff_t i, int f16, int n) {
    return f16 ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(XA_MASK16(n), (const uint16_t *)p + i))
               : _mm512_maskz_loadu_ps(XA_MASK16(n), (const float *)p + i);
}

#define xa_st8(p, x, n) \
    ((n) >= 8 ? _mm256_storeu_ps(p, x) : _mm256_maskstore_ps(p, xllm_tail_mask(n), x))
#define xa_st16(p, x, n) _mm512_mask_storeu_ps(p, XA_MASK16(n), x)

/* The kernels of width W (attributes ATTR), unrolled so that the NV x MR sums stay in registers.
 * xa_mm##W: C[r][0..NV*W) = (ZERO ? 0 : C[r][0..NV*W)) + sum over j0 <= j < k of A[r][j] *
 *   B[j][d..d+NV*W) for MR rows (A rows lda apart, C rows ldc apart; B rows ldb apart,
 *   float16 if f16), j in increasing order; only the first w columns are read and written if
 *   w < NV*W.
 * xa_scores##W: s[r][0..XA_BK) = sum over d of qs[r][d] * K[d][0..XA_BK) for MR rows (qs rows hd
 *   apart, s rows XA_BK apart). xa_pv##W: acc[r][0..hd) += sum over a <= j < n of p[r][j] *
 *   V[j][0..hd) for MR rows (acc rows hdp apart, p rows XA_BK apart, V rows ldv apart). */
#define XA_KERNELS(W, ATTR)                                                                      \
static inline ATTR void xa_mm##W(const int MR, const int NV, const int ZERO, const int f16,      \
        float *c, int ldc, const float *a, ptrdiff_t lda, const void *b, ptrdiff_t ldb, int d,   \
        int j0, int k, int w) {                                                                  \
    xa_v##W s[4 * XA_MR##W], x[4];                                                               \
    const int nw[4] = {w, w - W, w - 2 * W, w - 3 * W};  /* valid columns per vector (>= W: all) */\
    _Pragma("GCC unroll 24")                                                                     \
    for (int i = 0; i < NV * MR; i++)                                                            \
        s[i] = ZERO ? XA_MM##W(setzero_ps)()                                                     \
                    : xa_ld##W(c + i / NV * ldc, W * (i % NV), 0, nw[i % NV]);                   \
    for (int j = j0; j < k; j++) {                                                               \
        _Pragma("GCC unroll 4")                                                                  \
        for (int u = 0; u < NV; u++) x[u] = xa_ld##W(b, j * ldb + d + W * u, f16, nw[u]);        \
        _Pragma("GCC unroll 24")                                                                 \
        for (int i = 0; i < NV * MR; i++)                                                        \
            s[i] = XA_MM##W(fmadd_ps)(XA_MM##W(set1_ps)(a[i / NV * lda + j]), x[i % NV], s[i]);  \
    }                                                                                            \
    _Pragma("GCC unroll 24")                                                                     \
    for (int i = 0; i < NV * MR; i++) xa_st##W(c + i / NV * ldc + W * (i % NV), s[i], nw[i % NV]);\
}                                                                                                \
static inline ATTR void xa_scores##W(const int MR, const int f16, const float *qs, int hd,       \
                                     const void *kb, float *s) {                                 \
    xa_mm##W(MR, XA_BK / W, 1, f16, s, XA_BK, qs, hd, kb, XA_BK, 0, 0, hd, XA_BK);               \
}                                                                                                \
static inline ATTR void xa_pv##W(const int MR, const int f16, float *acc, int hd, int hdp,       \
                                 const float *p, const void *v, ptrdiff_t ldv, int a, int n) {   \
    int d = 0;  /* 4W columns at a time, w a constant (no masks) but for the rest */              \
    for (; d + 4 * W <= hd; d += 4 * W)                                                          \
        xa_mm##W(MR, 4, 0, f16, acc + d, hdp, p, XA_BK, v, ldv, d, a, n, 4 * W);                 \
    if (d < hd) xa_mm##W(MR, 4, 0, f16, acc + d, hdp, p, XA_BK, v, ldv, d, a, n, hd - d);        \
}
XA_KERNELS(8, __attribute__((always_inline)))
XA_KERNELS(16, XA_T512)

/* F##W(MR, h, ...) for a tile of t (1 .. XA_MR##W) rows, with MR and h (0 or 1) constants. */
#define XA_TILE(W, t, h, F, ...)                                                                 \
    do {                                                                                         \
        if (h) XA_TILE_MR(W, t, F, 1, __VA_ARGS__); else XA_TILE_MR(W, t, F, 0, __VA_ARGS__);    \
    } while (0)
#define XA_TILE_MR(W, t, F, ...)                                                                 \
    do {                                                                                         \
        if ((W) == 8) { if ((t) == 2) F##8(2, __VA_ARGS__); else F##8(1, __VA_ARGS__); }         \
        else if ((t) == 6) F##16(6, __VA_ARGS__);                                                \
        else if ((t) == 5) F##16(5, __VA_ARGS__);                                                \
        else if ((t) == 4) F##16(4, __VA_ARGS__);                                                \
        else if ((t) == 3) F##16(3, __VA_ARGS__);                                                \
        else if ((t) == 2) F##16(2, __VA_ARGS__);                                                \
        else F##16(1, __VA_ARGS__);                                                              \
    } while (0)

static inline void xa_prefetch(const void *p, int bytes) {
    for (int i = 0; i < bytes; i += 64) _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* The first of the keys 0 .. nk-1 that a window of w keys (0: no window) lets a row see. */
static inline int64_t xa_first_key(int64_t nk, int64_t w) {
    return w > 0 && nk > w ? nk - w : 0;
}

/* The keys of block b0 .. b0+XA_BK-1 that a row attending to keys lo .. nk-1 uses: a .. n-1
 * of the block (none when n <= a). */
static inline int xa_from(int64_t lo, int64_t b0) {
    return lo <= b0 ? 0 : lo - b0 < XA_BK ? (int)(lo - b0) : XA_BK;
}
static inline int xa_until(int64_t nk, int64_t b0) {
    return nk <= b0 ? 0 : nk - b0 < XA_BK ? (int)(nk - b0) : XA_BK;
}

/* Attention of nr query rows that read one KV head of one sequence, nr * round_up(hd, 32) <=
 * XA_ROWBUF: row r's query q[r] (hd floats, times scale) attends to keys lo .. nk[r]-1 (lo =
 * xa_first_key(nk[r], window)) and the result goes to out[r]. kt, vt: the head's part of K and
 * V block 0 (blocks ldb elements apart); f16: both caches hold float16. Each row goes through
 * the same operations whichever rows share its call (batch invariance). */
static inline __attribute__((always_inline)) void xa_attend(
        const int W, int nr, const float **q, float **out, const int64_t *nk, int64_t window,
        const void *kt, const void *vt, ptrdiff_t ldb, const int f16, int hd, float scale) {
    const int mrt = W == 8 ? XA_MR8 : XA_MR16;  /* rows per tile */
    float qs[XA_ROWBUF], acc[XA_ROWBUF], s[XA_ROWBUF / 32 * XA_BK], m[XA_ROWBUF / 32],
        l[XA_ROWBUF / 32], kw[256 * XA_BK], vw[256 * XA_BK + 8];  /* kw, vw: a widened block */
    int64_t lo[XA_ROWBUF / 32];  /* each row's first key */
    const int hdp = (hd + 31) & ~31, es = f16 ? 2 : 4;
    int64_t last = 0, first = INT64_MAX;
    for (int r = 0; r < nr; r++) {
        for (int d = 0; d < hd; d++) qs[r * hd + d] = q[r][d] * scale;
        memset(acc + r * hdp, 0, sizeof(float) * hdp);
        m[r] = -INFINITY;
        l[r] = 0.0f;
        lo[r] = xa_first_key(nk[r], window);
        last = nk[r] > last ? nk[r] : last;
        first = lo[r] < first ? lo[r] : first;
    }
    first -= first % XA_BK;  /* the first block any row reads */
    const int kbytes = hd * XA_BK * es, vrow = hd * es;  /* one head's K block; a V row */
    xa_prefetch((const char *)kt + (first / XA_BK) * ldb * es, kbytes);
    xa_prefetch((const char *)vt + (first / XA_BK) * ldb * es,
                (int)(last - first < XA_BK ? last - first : XA_BK) * vrow);
    for (int64_t b0 = first; b0 < last; b0 += XA_BK) {
        const char *kb = (const char *)kt + (b0 / XA_BK) * ldb * es;
        const char *vb = (const char *)vt + (b0 / XA_BK) * ldb * es;
        if (b0 + XA_BK < last) {  /* fetch the next block (its rows in use) meanwhile */
            const int64_t n = last - b0 - XA_BK;
            xa_prefetch(kb + ldb * es, kbytes);
            xa_prefetch(vb + ldb * es, (int)(n < XA_BK ? n : XA_BK) * vrow);
        }
        const int64_t nv = last - b0 < XA_BK ? last - b0 : XA_BK;  /* V rows in use */
        const int wide = f16 && nr > mrt;  /* several row tiles: widen the block once for all */
        const int kf16 = f16 && !wide;  /* the kernels read float16 */
        if (wide) {
            for (int i = 0; i < hd * XA_BK; i += 8) _mm256_storeu_ps(kw + i, xa_ld8(kb, i, 1, 8));
            for (int i = 0; i < nv * hd; i += 8)
                _mm256_storeu_ps(vw + i, xa_ld8(vb, i, 1, (int)(nv * hd - i)));
            kb = (const char *)kw;
            vb = (const char *)vw;
        }
        for (int r = 0, t; r < nr; r += t) {
            t = nr - r < mrt ? nr - r : mrt;
            XA_TILE(W, t, kf16, xa_scores, qs + r * hd, hd, kb, s + r * XA_BK);
        }
        for (int r = 0; r < nr; r++) {
            const int a = xa_from(lo[r], b0), n = xa_until(nk[r], b0);
            if (a < n) xa_softmax(s + r * XA_BK, a, n, m + r, l + r, acc + r * hdp, hdp);
        }
        for (int r = 0, t; r < nr; r += t) {  /* tiles of rows that use the same keys */
            const int a = xa_from(lo[r], b0), n = xa_until(nk[r], b0);
            for (t = 1; t < mrt && r + t < nr && xa_from(lo[r + t], b0) == a &&
                 xa_until(nk[r + t], b0) == n; t++) {}
            if (a < n)
                XA_TILE(W, t, kf16, xa_pv, acc + r * hdp, hd, hdp, s + r * XA_BK, vb, hd, a, n);
        }
    }
    for (int r = 0; r < nr; r++) {
        const float c = 1.0f / l[r];
        for (int d = 0; d < hd; d++) out[r][d] = acc[r * hdp + d] * c;
    }
}

/* flatten: every call inlined, so that the tiles get constant sizes */
XA_T512 __attribute__((flatten)) static void xa_attend512(
        int nr, const float **q, float **out, const int64_t *nk, int64_t window, const void *kt,
        const void *vt, ptrdiff_t ldb, int f16, int hd, float scale) {
    if (f16) xa_attend(16, nr, q, out, nk, window, kt, vt, ldb, 1, hd, scale);
    else xa_attend(16, nr, q, out, nk, window, kt, vt, ldb, 0, hd, scale);
}

/* isa: 0 AVX2, 1 AVX-512 (the same results). window: 0, or the keys a row sees (its own and
 * the window - 1 before it). */
static void xllm_attend(int isa, int nr, const float **q, float **out, const int64_t *nk,
                        int64_t window, const void *kt, const void *vt, ptrdiff_t ldb, int f16,
                        int hd, float scale) {
    if (isa) xa_attend512(nr, q, out, nk, window, kt, vt, ldb, f16, hd, scale);
    else if (f16)  /* one copy per type */
        xa_attend(8, nr, q, out, nk, window, kt, vt, ldb, 1, hd, scale);
    else xa_attend(8, nr, q, out, nk, window, kt, vt, ldb, 0, hd, scale);
}

/* dst[d] = float16(src[d]) for d < n, rounding to nearest even (as numpy's astype does). */
static inline void xllm_to_f16(const float *src, uint16_t *dst, ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm_storeu_si128((__m128i *)(dst + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
    for (; d < n; d++) dst[d] = _cvtss_sh(src[d], _MM_FROUND_TO_NEAREST_INT);
}

/* Store key row k and value row v (kvd floats each, heads of hd) as row t of blocked K and V
 * caches (float16 when f16). */
static inline void xllm_store_kv(const float *k, const float *v, void *kc, void *vc,
                                 ptrdiff_t kvd, ptrdiff_t hd, ptrdiff_t t, int f16) {
    const ptrdiff_t b = (t / XA_BK) * kvd * XA_BK, r = t % XA_BK;
    uint16_t h[8];
    for (ptrdiff_t c = 0; c < kvd; c += 8) {  /* K: column c + j of the block, row r */
        const int n = kvd - c < 8 ? (int)(kvd - c) : 8;
        if (f16) xllm_to_f16(k + c, h, n);
        for (int j = 0; j < n; j++) {
            if (f16) ((uint16_t *)kc)[b + (c + j) * XA_BK + r] = h[j];
            else ((float *)kc)[b + (c + j) * XA_BK + r] = k[c + j];
        }
    }
    for (ptrdiff_t g = 0; g < kvd / hd; g++) {  /* V: row r of head g's part of the block */
        const ptrdiff_t o = b + (g * XA_BK + r) * hd;
        if (f16) xllm_to_f16(v + g * hd, (uint16_t *)vc + o, hd);
        else memcpy((float *)vc + o, v + g * hd, hd * sizeof(float));
    }
}

#endif /* XLLM_ATTENTION_H */
