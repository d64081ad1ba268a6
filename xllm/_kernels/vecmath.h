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

/* ---------------- attention inner loops ---------------- */

/* s[j] = dot(q, k + j*ldk) over hd floats, for j < n. Eight keys at a time share each load of q
 * and are reduced together with a horizontal-add tree. */
static inline void xllm_dots(const float *q, const float *k, ptrdiff_t ldk, int hd, int n,
                             float *s) {
    int full = hd & ~7, tail = hd & 7, j = 0;
    __m256i tm = xllm_tail_mask(tail);
    for (; j + 8 <= n; j += 8) {
        const float *k0 = k + (ptrdiff_t)j * ldk;
        __m256 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm256_setzero_ps();
        for (int d = 0; d < full; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            for (int r = 0; r < 8; r++) a[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + r * ldk + d), a[r]);
        }
        if (tail) {
            __m256 qv = _mm256_maskload_ps(q + full, tm);
            for (int r = 0; r < 8; r++)
                a[r] = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + r * ldk + full, tm), a[r]);
        }
        __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        /* t0 lanes: s0 s1 s2 s3 | s0 s1 s2 s3 (partial sums of the low and high halves) */
        _mm256_storeu_ps(s + j, _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                                              _mm256_permute2f128_ps(t0, t1, 0x31)));
    }
    for (; j < n; j++) {  /* the last n % 8 keys one at a time */
        const float *k0 = k + (ptrdiff_t)j * ldk;
        __m256 a0 = _mm256_mul_ps(_mm256_maskload_ps(q + full, tm), _mm256_maskload_ps(k0 + full, tm));
        for (int d = 0; d < full; d += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k0 + d), a0);
        s[j] = xllm_hsum_ps(a0);
    }
}

/* acc[0..hd) += sum_j p[j] * v[j*ldv + 0..hd) for j < n. The output is walked in chunks of 64
 * floats held in 8 registers (8 independent FMA chains) while the n value rows stream past; the
 * rest, 8 floats at a time, with two chains for even and odd rows. */
static inline void xllm_accum_pv(float *acc, const float *p, const float *v, ptrdiff_t ldv,
                                 int hd, int n) {
    int d = 0;
    for (; d + 64 <= hd; d += 64) {
        __m256 c[8];
        for (int u = 0; u < 8; u++) c[u] = _mm256_loadu_ps(acc + d + 8 * u);
        const float *vr = v + d;
        for (int j = 0; j < n; j++, vr += ldv) {
            __m256 pj = _mm256_broadcast_ss(p + j);
            for (int u = 0; u < 8; u++) c[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vr + 8 * u), c[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(acc + d + 8 * u, c[u]);
    }
    for (; d < hd; d += 8) {
        __m256i m = xllm_tail_mask(hd - d);
        __m256 c0 = _mm256_maskload_ps(acc + d, m), c1 = _mm256_setzero_ps();
        const float *vr = v + d;
        int j = 0;
        for (; j + 2 <= n; j += 2, vr += 2 * ldv) {
            c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_maskload_ps(vr, m), c0);
            c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j + 1), _mm256_maskload_ps(vr + ldv, m), c1);
        }
        if (j < n) c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), _mm256_maskload_ps(vr, m), c0);
        _mm256_maskstore_ps(acc + d, m, _mm256_add_ps(c0, c1));
    }
}

/* AVX-512 versions of the two attention loops, for hd a multiple of 64 (the callers check the CPU
 * and hd): the same arithmetic in 16-lane registers (rounding order differs from AVX2). */
#define XLLM_T512 __attribute__((target("avx2,fma,avx512f")))
static inline XLLM_T512 __m256 xllm_fold512(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

static inline XLLM_T512 void xllm_dots16(const float *q, const float *k, ptrdiff_t ldk, int hd,
                                         int n, float *s) {
    for (int j = 0; j < n; j += 8) {
        const float *k0 = k + (ptrdiff_t)j * ldk;
        const int nr = n - j < 8 ? n - j : 8;
        __m512 a[8];
        for (int r = 0; r < 8; r++) a[r] = _mm512_setzero_ps();
        for (int d = 0; d < hd; d += 16) {
            __m512 qv = _mm512_loadu_ps(q + d);
            for (int r = 0; r < nr; r++)
                a[r] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + r * ldk + d), a[r]);
        }
        __m256 h[8];
        for (int r = 0; r < 8; r++) h[r] = xllm_fold512(a[r]);
        __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
        __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
        __m256 t = _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20),
                                 _mm256_permute2f128_ps(t0, t1, 0x31));
        _mm256_maskstore_ps(s + j, xllm_tail_mask(nr), t);
    }
}

static inline XLLM_T512 void xllm_accum_pv16(float *acc, const float *p, const float *v,
                                             ptrdiff_t ldv, int hd, int n) {
    for (int d = 0; d < hd; d += 64) {  /* 4 registers of output, two rows of V per step */
        __m512 c0[4], c1[4];
        for (int u = 0; u < 4; u++) {
            c0[u] = _mm512_loadu_ps(acc + d + 16 * u);
            c1[u] = _mm512_setzero_ps();
        }
        const float *vr = v + d;
        int j = 0;
        for (; j + 2 <= n; j += 2, vr += 2 * ldv) {
            __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
            for (int u = 0; u < 4; u++) {
                c0[u] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(vr + 16 * u), c0[u]);
                c1[u] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(vr + ldv + 16 * u), c1[u]);
            }
        }
        if (j < n)
            for (int u = 0; u < 4; u++)
                c0[u] = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), _mm512_loadu_ps(vr + 16 * u), c0[u]);
        for (int u = 0; u < 4; u++) _mm512_storeu_ps(acc + d + 16 * u, _mm512_add_ps(c0[u], c1[u]));
    }
}

/* dst[j*hd + d] = float(src[j*ld + d]) for n rows of hd float16 values (a block of a float16
 * KV cache, widened once and then read by every head of the group). */
static inline void xllm_f16_rows(const uint16_t *src, ptrdiff_t ld, int n, int hd, float *dst) {
    for (int j = 0; j < n; j++, src += ld, dst += hd) {
        int d = 0;
        for (; d + 8 <= hd; d += 8)
            _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + d))));
        for (; d < hd; d++) dst[d] = _cvtsh_ss(src[d]);
    }
}

/* dst[d] = float16(src[d]) for d < n, rounding to nearest even (as numpy's astype does). */
static inline void xllm_to_f16(const float *src, uint16_t *dst, ptrdiff_t n) {
    ptrdiff_t d = 0;
    for (; d + 8 <= n; d += 8)
        _mm_storeu_si128((__m128i *)(dst + d),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
    for (; d < n; d++) dst[d] = _cvtss_sh(src[d], _MM_FROUND_TO_NEAREST_INT);
}

/* Prefetch n rows (stride ld floats) of hd floats each into L1: attention reads K/V rows at a
 * stride of n_kv_heads*head_dim, a pattern the hardware prefetchers follow poorly. */
static inline void xllm_prefetch_rows(const float *p, ptrdiff_t ld, int n, int hd) {
    for (int j = 0; j < n; j++, p += ld)
        for (int d = 0; d < hd; d += 16) _mm_prefetch((const char *)(p + d), _MM_HINT_T0);
}

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
