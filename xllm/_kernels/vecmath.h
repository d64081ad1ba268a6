/* AVX2/FMA vector helpers shared by the kernels, and the row loops of norm.pyx.
 *
 * Written for this project: vectorised exp (float: ~1-2 ulp, double: < 1e-14 relative), the
 * horizontal sum and the tail mask that gemm.h, attention.h and the row loops share, the OpenMP
 * barrier of attention.pyx and qmatmul.pyx, and reductions over a row with several accumulators
 * (gcc does not vectorise float reductions without -ffast-math). Each function fixes its order
 * of operations, so its result depends on its inputs only.
 *
 * The kernels built on these have headers of their own: gemm.h (float matmul), gemm_q.h
 * (quantized matmul), attention.h (attention over the KV caches), sampling.h (token weights).
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

/* ---------------- reductions, masks, threads ---------------- */

/* The sum of the 8 lanes of v in a fixed order: (lanes i and i+4), then (i and i+2), then the
 * last two. always_inline (as in gemm.h before it moved here): the micro-kernels that use it are
 * large functions, where GCC's size limits could otherwise leave a call. */
static inline __attribute__((always_inline)) float xllm_hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lane mask selecting the first r floats (none if r <= 0, all 8 if r >= 8), for masked loads
 * and stores of tails. r is a size_t, as gemm.h counts, and is compared as an int: a negative
 * int passed in comes back negative. */
static inline __attribute__((always_inline)) __m256i xllm_tail_mask(size_t r) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)r),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Wait for all the threads of the enclosing OpenMP parallel region (Cython's prange ends with
 * nowait, so a kernel that needs every thread's part of one loop before the next says so). */
static inline void xllm_barrier(void) { _Pragma("omp barrier") }

/* ---------------- row loops (norm.pyx, sampling.pyx) ---------------- */

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
    return xllm_hsum256(_mm256_add_ps(s0, s1));
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

#endif /* XLLM_VECMATH_H */
