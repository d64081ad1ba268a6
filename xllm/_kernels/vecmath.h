/* AVX2/FMA helpers shared by norm.pyx, attention.pyx and sampling.pyx.
 *
 * Everything here is written for this project: vectorised exp (float: ~1-2 ulp, double: < 1e-14
 * relative), reductions with several accumulators (gcc does not vectorise float reductions without
 * -ffast-math), and the two inner loops of attention (q.k dots for a block of keys, and the
 * p-weighted sum of a block of value rows).
 */
#ifndef XLLM_VECMATH_H
#define XLLM_VECMATH_H

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---------------- exp ---------------- */

/* exp(x) for 8 floats. Range reduction x = n*ln2 + r, |r| <= ln2/2, then a degree-7 Taylor
 * polynomial (truncation error < 6e-9 relative, below half an ulp); 2^n is built in two halves so
 * n may reach 128. Results below ~1.2e-38 (x < -87.33) flush to 0; x > 88.72 gives ~FLT_MAX. */
static inline __m256 xllm_exp_ps(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.7228f), lo = _mm256_set1_ps(-87.33f);
    __m256 underflow = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* ln2 split so n*ln2_hi is exact */
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i n1 = _mm256_srai_epi32(ni, 1);
    __m256i n2 = _mm256_sub_epi32(ni, n1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    p = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    return _mm256_andnot_ps(underflow, p);
}

/* exp(x) for 4 doubles, relative error < 1e-14 (enough for sampling weights): degree-11 Taylor
 * on |r| <= ln2/2. x < -708 gives 0 (true value < 3e-308: irrelevant for probabilities); x is
 * clamped at 709. */
static inline __m256d xllm_exp_pd(__m256d x) {
    const __m256d lo = _mm256_set1_pd(-708.0);
    __m256d underflow = _mm256_cmp_pd(x, lo, _CMP_LT_OQ);
    x = _mm256_min_pd(_mm256_max_pd(x, lo), _mm256_set1_pd(709.0));
    /* round x*log2(e) to an integer with the 1.5*2^52 trick: its low bits then hold n */
    const __m256d magic = _mm256_set1_pd(6755399441055744.0);
    __m256d t = _mm256_fmadd_pd(x, _mm256_set1_pd(1.4426950408889634074), magic);
    __m256i bits = _mm256_castpd_si256(t);
    __m256d n = _mm256_sub_pd(t, magic);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static const double c[12] = {1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
        1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0};
    __m256d p = _mm256_set1_pd(c[0]);
    for (int i = 1; i < 12; i++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[i]));
    __m256i e = _mm256_slli_epi64(_mm256_add_epi64(bits, _mm256_set1_epi64x(1023)), 52);
    p = _mm256_mul_pd(p, _mm256_castsi256_pd(e));
    return _mm256_andnot_pd(underflow, p);
}

/* ---------------- small helpers ---------------- */

static inline float xllm_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lane mask selecting the first r floats (all 8 if r >= 8), for masked loads/stores of tails. */
static inline __m256i xllm_tail_mask(int r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Largest value of x[0..n) (n >= 1) ignoring NaN; *has_nan set to 1 if any NaN was seen. */
static inline float xllm_max_f32(const float *x, ptrdiff_t n, int *has_nan) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, nan = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
        m0 = _mm256_max_ps(a, m0);  /* max_ps returns its 2nd operand (m0) if a is NaN */
        m1 = _mm256_max_ps(b, m1);
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m0), _mm256_extractf128_ps(m0, 1));
    h = _mm_max_ps(h, _mm256_castps256_ps128(m1));
    h = _mm_max_ps(h, _mm256_extractf128_ps(m1, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    int hn = _mm256_movemask_ps(nan) != 0;
    for (; i < n; i++) {
        if (x[i] != x[i]) hn = 1;
        else if (x[i] > m) m = x[i];
    }
    *has_nan = hn;
    return m;
}

/* First index i with x[i] == v, or with x[i] NaN when v is NaN; n if none. */
static inline ptrdiff_t xllm_find_first(const float *x, ptrdiff_t n, float v) {
    int want_nan = v != v;
    __m256 vv = _mm256_set1_ps(v);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i);
        __m256 c = want_nan ? _mm256_cmp_ps(a, a, _CMP_UNORD_Q) : _mm256_cmp_ps(a, vv, _CMP_EQ_OQ);
        int mask = _mm256_movemask_ps(c);
        if (mask) return i + __builtin_ctz(mask);
    }
    for (; i < n; i++)
        if (want_nan ? x[i] != x[i] : x[i] == v) return i;
    return n;
}

/* sum of x[i]^2 in double precision */
static inline double xllm_sumsq_f64(const float *x, ptrdiff_t n) {
    __m256d a[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(),
                    _mm256_setzero_pd()};
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int u = 0; u < 4; u++) {
            __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * u));
            a[u] = _mm256_fmadd_pd(v, v, a[u]);
        }
    __m256d t = _mm256_add_pd(_mm256_add_pd(a[0], a[1]), _mm256_add_pd(a[2], a[3]));
    __m128d h = _mm_add_pd(_mm256_castpd256_pd128(t), _mm256_extractf128_pd(t, 1));
    double s = _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
    for (; i < n; i++) s += (double)x[i] * (double)x[i];
    return s;
}

/* out[i] = (float)((double)x[i] * inv) * w[i]: rmsnorm's scaling, rounded like the reference */
static inline void xllm_rms_scale(const float *x, const float *w, double inv, float *out,
                                  ptrdiff_t n) {
    __m256d vi = _mm256_set1_pd(inv);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128 a = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), vi));
        __m128 b = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i + 4)), vi));
        __m256 y = _mm256_insertf128_ps(_mm256_castps128_ps256(a), b, 1);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(y, _mm256_loadu_ps(w + i)));
    }
    for (; i < n; i++) out[i] = (float)((double)x[i] * inv) * w[i];
}

/* out[i] = exp(x[i] - shift); returns the sum of the outputs (float accumulators).
 * out may equal x. */
static inline float xllm_exp_shift(const float *x, float shift, float *out, ptrdiff_t n) {
    __m256 vs = _mm256_set1_ps(shift), s0 = _mm256_setzero_ps(), s1 = s0;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 e0 = xllm_exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        __m256 e1 = xllm_exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vs));
        _mm256_storeu_ps(out + i, e0);
        _mm256_storeu_ps(out + i + 8, e1);
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
    }
    for (; i < n; i += 8) {
        __m256i m = xllm_tail_mask((int)(n - i));
        __m256 e = xllm_exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, m), vs));
        e = _mm256_and_ps(e, _mm256_castsi256_ps(m));
        _mm256_maskstore_ps(out + i, m, e);
        s0 = _mm256_add_ps(s0, e);
    }
    return xllm_hsum_ps(_mm256_add_ps(s0, s1));
}

/* out = a / (1 + exp(-a)) * b; out may alias a or b */
static inline void xllm_silu_mul(const float *a, const float *b, float *out, ptrdiff_t n) {
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    for (; i < n; i += 8) {
        __m256i m = xllm_tail_mask(n - i >= 8 ? 8 : (int)(n - i));
        __m256 va = _mm256_maskload_ps(a + i, m), vb = _mm256_maskload_ps(b + i, m);
        __m256 e = xllm_exp_ps(_mm256_sub_ps(zero, va));
        __m256 y = _mm256_mul_ps(_mm256_div_ps(va, _mm256_add_ps(one, e)), vb);
        _mm256_maskstore_ps(out + i, m, y);
    }
}

/* ---------------- attention ---------------- */

/* Caches are stored in blocks of XA_BK rows, so that one KV head's part of a block is contiguous.
 * K transposed, [blocks][kv_dim][XA_BK]: element (key t, column c) at (t / XA_BK, c, t % XA_BK);
 * the scores of a query against a block are then XA_BK / W vectors of W keys built with broadcast
 * FMAs (no horizontal sums) by the same operations for one query row or many. V [blocks]
 * [n_kv_heads][XA_BK][head_dim]: value t of head g at (t / XA_BK, g, t % XA_BK). */
#define XA_BK 32
#define XA_ROWBUF 4096   /* floats of queries (and of output accumulators) per work item */

/* One block of a row's online softmax: s holds its XA_BK scores, the first n valid. Raises the
 * running max *m (scaling *l and acc[0..hdp) by exp(old - new)), turns s into p = exp(s - *m)
 * (0 past n) and adds their sum to *l. */
static inline void xa_softmax(float *s, int n, float *m, float *l, float *acc, int hdp) {
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 v[4], mx = ninf, sum = _mm256_setzero_ps();
    for (int u = 0; u < 4; u++) {
        __m256 keep = _mm256_castsi256_ps(xllm_tail_mask(n - 8 * u));
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
    *l += xllm_hsum_ps(sum);
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
 * xa_mm##W: C[r][0..NV*W) = (ZERO ? 0 : C[r][0..NV*W)) + sum over j < k of A[r][j] * B[j][d..
 *   d+NV*W) for MR rows (A rows lda apart, C rows ldc apart; B rows ldb apart, float16 if f16),
 *   j in increasing order; only the first w columns are read and written if w < NV*W.
 * xa_scores##W: s[r][0..XA_BK) = sum over d of qs[r][d] * K[d][0..XA_BK) for MR rows (qs rows hd
 *   apart, s rows XA_BK apart). xa_pv##W: acc[r][0..hd) += sum over j < n of p[r][j] *
 *   V[j][0..hd) for MR rows (acc rows hdp apart, p rows XA_BK apart, V rows ldv apart). */
#define XA_KERNELS(W, ATTR)                                                                      \
static inline ATTR void xa_mm##W(const int MR, const int NV, const int ZERO, const int f16,      \
        float *c, int ldc, const float *a, ptrdiff_t lda, const void *b, ptrdiff_t ldb, int d,   \
        int k, int w) {                                                                          \
    xa_v##W s[4 * XA_MR##W], x[4];                                                               \
    const int nw[4] = {w, w - W, w - 2 * W, w - 3 * W};  /* valid columns per vector (>= W: all) */\
    _Pragma("GCC unroll 24")                                                                     \
    for (int i = 0; i < NV * MR; i++)                                                            \
        s[i] = ZERO ? XA_MM##W(setzero_ps)()                                                     \
                    : xa_ld##W(c + i / NV * ldc, W * (i % NV), 0, nw[i % NV]);                   \
    for (int j = 0; j < k; j++) {                                                                \
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
    xa_mm##W(MR, XA_BK / W, 1, f16, s, XA_BK, qs, hd, kb, XA_BK, 0, hd, XA_BK);                  \
}                                                                                                \
static inline ATTR void xa_pv##W(const int MR, const int f16, float *acc, int hd, int hdp,       \
                                 const float *p, const void *v, ptrdiff_t ldv, int n) {          \
    int d = 0;  /* 4W columns at a time, w a constant (no masks) but for the rest */              \
    for (; d + 4 * W <= hd; d += 4 * W)                                                          \
        xa_mm##W(MR, 4, 0, f16, acc + d, hdp, p, XA_BK, v, ldv, d, n, 4 * W);                    \
    if (d < hd) xa_mm##W(MR, 4, 0, f16, acc + d, hdp, p, XA_BK, v, ldv, d, n, hd - d);           \
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

/* Attention of nr query rows that read one KV head of one sequence, nr * round_up(hd, 32) <=
 * XA_ROWBUF: row r's query q[r] (hd floats, times scale) attends to keys 0 .. nk[r]-1 and the
 * result goes to out[r]. kt, vt: the head's part of K and V block 0 (blocks ldb elements
 * apart); f16: both caches hold float16. Each row goes through the same operations whichever
 * rows share its call (batch invariance). */
static inline __attribute__((always_inline)) void xa_attend(
        const int W, int nr, const float **q, float **out, const int64_t *nk, const void *kt,
        const void *vt, ptrdiff_t ldb, const int f16, int hd, float scale) {
    const int mrt = W == 8 ? XA_MR8 : XA_MR16;  /* rows per tile */
    float qs[XA_ROWBUF], acc[XA_ROWBUF], s[XA_ROWBUF / 32 * XA_BK], m[XA_ROWBUF / 32],
        l[XA_ROWBUF / 32], kw[256 * XA_BK], vw[256 * XA_BK + 8];  /* kw, vw: a widened block */
    const int hdp = (hd + 31) & ~31, es = f16 ? 2 : 4;
    int64_t last = 0;
    for (int r = 0; r < nr; r++) {
        for (int d = 0; d < hd; d++) qs[r * hd + d] = q[r][d] * scale;
        memset(acc + r * hdp, 0, sizeof(float) * hdp);
        m[r] = -INFINITY;
        l[r] = 0.0f;
        last = nk[r] > last ? nk[r] : last;
    }
    const int kbytes = hd * XA_BK * es, vrow = hd * es;  /* one head's K block; a V row */
    xa_prefetch(kt, kbytes);
    xa_prefetch(vt, (int)(last < XA_BK ? last : XA_BK) * vrow);
    for (int64_t b0 = 0; b0 < last; b0 += XA_BK) {
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
        for (int r = 0; r < nr; r++)
            if (nk[r] > b0)
                xa_softmax(s + r * XA_BK, (int)(nk[r] - b0 < XA_BK ? nk[r] - b0 : XA_BK), m + r,
                           l + r, acc + r * hdp, hdp);
        for (int r = 0, t; r < nr; r += t) {  /* tiles of rows that use the same keys */
            const int n = (int)(nk[r] - b0 < XA_BK ? nk[r] - b0 : XA_BK);
            for (t = 1; t < mrt && r + t < nr && (nk[r + t] - b0 < XA_BK ? nk[r + t] - b0 : XA_BK)
                 == n; t++) {}
            if (n > 0) XA_TILE(W, t, kf16, xa_pv, acc + r * hdp, hd, hdp, s + r * XA_BK, vb, hd, n);
        }
    }
    for (int r = 0; r < nr; r++) {
        const float c = 1.0f / l[r];
        for (int d = 0; d < hd; d++) out[r][d] = acc[r * hdp + d] * c;
    }
}

/* flatten: every call inlined, so that the tiles get constant sizes */
XA_T512 __attribute__((flatten)) static void xa_attend512(
        int nr, const float **q, float **out, const int64_t *nk, const void *kt, const void *vt,
        ptrdiff_t ldb, int f16, int hd, float scale) {
    if (f16) xa_attend(16, nr, q, out, nk, kt, vt, ldb, 1, hd, scale);
    else xa_attend(16, nr, q, out, nk, kt, vt, ldb, 0, hd, scale);
}

/* isa: 0 AVX2, 1 AVX-512 (the same results). */
static void xllm_attend(int isa, int nr, const float **q, float **out, const int64_t *nk,
                        const void *kt, const void *vt, ptrdiff_t ldb, int f16, int hd,
                        float scale) {
    if (isa) xa_attend512(nr, q, out, nk, kt, vt, ldb, f16, hd, scale);
    else if (f16) xa_attend(8, nr, q, out, nk, kt, vt, ldb, 1, hd, scale);  /* one copy per type */
    else xa_attend(8, nr, q, out, nk, kt, vt, ldb, 0, hd, scale);
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

/* Wait for all the threads of the enclosing OpenMP parallel region. */
static inline void xllm_barrier(void) { _Pragma("omp barrier") }

/* ---------------- sampling ---------------- */

/* For n logits: d = (top - l[i]) * inv_t is the distance below the top in nats, bucket
 * min(floor(d * per_nat), nb - 1) is monotone in the logit (NaN, which callers reject, goes to
 * the last: min_pd returns its 2nd operand then). Stores the buckets (if bucket) and w[i] =
 * exp(-d) (if w), or else adds 1 and exp(-d) per token to cnt and mass of its bucket. */
static inline void xllm_weights(const float *l, ptrdiff_t n, double top, double inv_t,
                                double per_nat, int nb, uint16_t *bucket, double *w,
                                ptrdiff_t *cnt, double *mass) {
    const __m256d vt = _mm256_set1_pd(top), vi = _mm256_set1_pd(inv_t);
    const __m256d vp = _mm256_set1_pd(per_nat), last = _mm256_set1_pd((double)(nb - 1));
    double e[256];
    int32_t bi[256];
    for (ptrdiff_t i0 = 0; i0 < n; i0 += 256) {  /* blocks: exp in SIMD, then scattered sums */
        int m = n - i0 < 256 ? (int)(n - i0) : 256;
        for (int i = 0; i < m; i += 4) {
            __m128i lanes = _mm256_castsi256_si128(xllm_tail_mask(m - i));
            __m256d x = _mm256_cvtps_pd(_mm_maskload_ps(l + i0 + i, lanes));
            __m256d d = _mm256_mul_pd(_mm256_sub_pd(vt, x), vi);
            _mm256_storeu_pd(e + i, xllm_exp_pd(_mm256_sub_pd(_mm256_setzero_pd(), d)));
            _mm_storeu_si128((__m128i *)(bi + i), _mm256_cvttpd_epi32(
                _mm256_min_pd(_mm256_floor_pd(_mm256_mul_pd(d, vp)), last)));
        }
        if (bucket) for (int j = 0; j < m; j++) bucket[i0 + j] = (uint16_t)bi[j];
        if (w) memcpy(w + i0, e, m * sizeof(double));
        else for (int j = 0; j < m; j++) cnt[bi[j]]++, mass[bi[j]] += e[j];
    }
}

/* Writes the indices i < n with lo <= a[i] <= hi to out (ascending); returns how many. */
static inline ptrdiff_t xllm_find_u16(const uint16_t *a, ptrdiff_t n, uint16_t lo, uint16_t hi,
                                      int32_t *out) {
    __m256i vl = _mm256_set1_epi16((short)lo), vh = _mm256_set1_epi16((short)hi);
    ptrdiff_t i = 0, k = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i x = _mm256_loadu_si256((const __m256i *)(a + i));
        unsigned mask = (unsigned)_mm256_movemask_epi8(  /* in range iff clamping keeps it */
            _mm256_cmpeq_epi16(_mm256_min_epu16(_mm256_max_epu16(x, vl), vh), x));
        for (; mask; mask &= mask - 1, mask &= mask - 1)  /* two mask bits per 16-bit lane */
            out[k++] = (int32_t)(i + (__builtin_ctz(mask) >> 1));
    }
    for (; i < n; i++)
        if (a[i] >= lo && a[i] <= hi) out[k++] = (int32_t)i;
    return k;
}

#endif
