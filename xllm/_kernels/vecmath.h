/* AVX2/FMA helpers shared by norm.pyx, attention.pyx and sampling.pyx.
 *
 * Everything here is written for this project: vectorised exp (float: ~1-2 ulp, double: a few
 * ulp), reductions with several accumulators (gcc does not vectorise float reductions without
 * -ffast-math), and the two inner loops of attention (q.k dots for a block of keys, and the
 * p-weighted sum of a block of value rows).
 */
#ifndef XLLM_VECMATH_H
#define XLLM_VECMATH_H

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

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

/* exp(x) for 4 doubles, a few ulp. Degree-13 Taylor on |r| <= ln2/2 (truncation < 5e-18).
 * x < -708 gives 0 (true value < 3e-308: irrelevant for probabilities); x is clamped at 709. */
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
    static const double c[14] = {
        1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
        1.0 / 362880.0, 1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
        1.0 / 6.0, 0.5, 1.0, 1.0};
    __m256d p = _mm256_set1_pd(c[0]);
    for (int i = 1; i < 14; i++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[i]));
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

static inline double xllm_hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
}

static inline float xllm_hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Lane mask selecting the first r (0..8) floats, for masked loads/stores of row tails. */
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
    float m = xllm_hmax_ps(_mm256_max_ps(m0, m1));
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
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256d v0 = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
        __m256d v1 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
        __m256d v2 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 8));
        __m256d v3 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 12));
        a0 = _mm256_fmadd_pd(v0, v0, a0);
        a1 = _mm256_fmadd_pd(v1, v1, a1);
        a2 = _mm256_fmadd_pd(v2, v2, a2);
        a3 = _mm256_fmadd_pd(v3, v3, a3);
    }
    double s = xllm_hsum_pd(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
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

/* x[i] *= a */
static inline void xllm_scale_f32(float *x, float a, ptrdiff_t n) {
    __m256 va = _mm256_set1_ps(a);
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), va));
    for (; i < n; i++) x[i] *= a;
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
    int full = hd & ~7, tail = hd & 7;
    __m256i tm = xllm_tail_mask(tail);
    int j = 0;
    for (; j + 8 <= n; j += 8) {
        const float *k0 = k + (ptrdiff_t)j * ldk;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
               a7 = a0;
        int d = 0;
        for (; d < full; d += 8) {
            __m256 qv = _mm256_loadu_ps(q + d);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + d), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + ldk + d), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * ldk + d), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * ldk + d), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 4 * ldk + d), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 5 * ldk + d), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 6 * ldk + d), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 7 * ldk + d), a7);
        }
        if (tail) {
            __m256 qv = _mm256_maskload_ps(q + d, tm);
            a0 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + d, tm), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + ldk + d, tm), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + 2 * ldk + d, tm), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + 3 * ldk + d, tm), a3);
            a4 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + 4 * ldk + d, tm), a4);
            a5 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + 5 * ldk + d, tm), a5);
            a6 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + 6 * ldk + d, tm), a6);
            a7 = _mm256_fmadd_ps(qv, _mm256_maskload_ps(k0 + 7 * ldk + d, tm), a7);
        }
        __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
        __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
        t0 = _mm256_hadd_ps(t0, t1);  /* lanes: s0 s1 s2 s3 | s0 s1 s2 s3 (low/high halves) */
        t2 = _mm256_hadd_ps(t2, t3);
        __m256 r = _mm256_add_ps(_mm256_permute2f128_ps(t0, t2, 0x20),
                                 _mm256_permute2f128_ps(t0, t2, 0x31));
        _mm256_storeu_ps(s + j, r);
    }
    for (; j < n; j++) {
        const float *k0 = k + (ptrdiff_t)j * ldk;
        __m256 a0 = _mm256_setzero_ps();
        int d = 0;
        for (; d < full; d += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k0 + d), a0);
        if (tail)
            a0 = _mm256_fmadd_ps(_mm256_maskload_ps(q + d, tm), _mm256_maskload_ps(k0 + d, tm), a0);
        s[j] = xllm_hsum_ps(a0);
    }
}

/* acc[0..hd) += sum_j p[j] * v[j*ldv + 0..hd) for j < n. The output is walked in chunks held in
 * registers while the n value rows stream past; each chunk keeps at least 8 independent FMA
 * chains (FMA latency 4 x 2 per cycle), using two sets of accumulators for even and odd rows
 * when a chunk is narrower than 64 floats. */
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
    for (; d + 32 <= hd; d += 32) {
        __m256 c[4], e[4];
        for (int u = 0; u < 4; u++) {
            c[u] = _mm256_loadu_ps(acc + d + 8 * u);
            e[u] = _mm256_setzero_ps();
        }
        const float *vr = v + d;
        int j = 0;
        for (; j + 2 <= n; j += 2, vr += 2 * ldv) {
            __m256 p0 = _mm256_broadcast_ss(p + j), p1 = _mm256_broadcast_ss(p + j + 1);
            for (int u = 0; u < 4; u++) {
                c[u] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(vr + 8 * u), c[u]);
                e[u] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(vr + ldv + 8 * u), e[u]);
            }
        }
        if (j < n) {
            __m256 p0 = _mm256_broadcast_ss(p + j);
            for (int u = 0; u < 4; u++) c[u] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(vr + 8 * u), c[u]);
        }
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(acc + d + 8 * u, _mm256_add_ps(c[u], e[u]));
    }
    for (; d < hd; d += 8) {
        __m256i m = xllm_tail_mask(hd - d >= 8 ? 8 : hd - d);
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

/* Prefetch n rows (stride ld floats) of hd floats each into L1: attention reads K/V rows at a
 * stride of n_kv_heads*head_dim, a pattern the hardware prefetchers follow poorly. */
static inline void xllm_prefetch_rows(const float *p, ptrdiff_t ld, int n, int hd) {
    for (int j = 0; j < n; j++, p += ld)
        for (int d = 0; d < hd; d += 16) _mm_prefetch((const char *)(p + d), _MM_HINT_T0);
}

/* ---------------- sampling ---------------- */

/* For n logits l[i]: t = (m - l[i]) * scale, with scale = per_nat / temperature, is the distance
 * below the top in 1/per_nat-nat steps. bucket[i] = min(floor(t), nb - 1) and
 * w[i] = exp(-(t - bucket[i]) / per_nat), the token's weight relative to its bucket's upper edge,
 * so exp(-d) = exp(-bucket/per_nat) * w. As 0 <= t - bucket < 1, a degree-7 Taylor polynomial
 * in (t - bucket) / per_nat (<= 1/64) is exact to double precision; no range reduction needed.
 * Tokens clamped into the last bucket (more than (nb-1)/per_nat nats down) get w = 0.
 * NaN (callers reject it) also lands in the last bucket. */
static inline void xllm_bucket_weights(const float *l, ptrdiff_t n, float m, double scale,
                                       double per_nat, int nb, uint16_t *bucket, double *w) {
    const __m256d vm = _mm256_set1_pd((double)m), vs = _mm256_set1_pd(scale);
    const __m256d last = _mm256_set1_pd((double)(nb - 1));
    const double h = -1.0 / per_nat;  /* f = t - b; exp(h*f) = sum (h*f)^k / k! */
    const __m256d c7 = _mm256_set1_pd(h * h * h * h * h * h * h / 5040.0);
    const __m256d c6 = _mm256_set1_pd(h * h * h * h * h * h / 720.0);
    const __m256d c5 = _mm256_set1_pd(h * h * h * h * h / 120.0);
    const __m256d c4 = _mm256_set1_pd(h * h * h * h / 24.0);
    const __m256d c3 = _mm256_set1_pd(h * h * h / 6.0);
    const __m256d c2 = _mm256_set1_pd(h * h / 2.0);
    const __m256d c1 = _mm256_set1_pd(h), one = _mm256_set1_pd(1.0);
    ptrdiff_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d t = _mm256_mul_pd(_mm256_sub_pd(vm, _mm256_cvtps_pd(_mm_loadu_ps(l + i))), vs);
        /* min_pd returns its 2nd operand when the first is NaN, so NaN -> last bucket */
        __m256d b = _mm256_min_pd(_mm256_floor_pd(t), last);
        __m256d f = _mm256_sub_pd(t, b);
        __m256d p = _mm256_fmadd_pd(c7, f, c6);
        p = _mm256_fmadd_pd(p, f, c5);
        p = _mm256_fmadd_pd(p, f, c4);
        p = _mm256_fmadd_pd(p, f, c3);
        p = _mm256_fmadd_pd(p, f, c2);
        p = _mm256_fmadd_pd(p, f, c1);
        p = _mm256_fmadd_pd(p, f, one);
        p = _mm256_and_pd(p, _mm256_cmp_pd(b, last, _CMP_LT_OQ));
        _mm256_storeu_pd(w + i, p);
        __m128i bi = _mm256_cvttpd_epi32(b);
        _mm_storel_epi64((__m128i *)(bucket + i), _mm_packus_epi32(bi, bi));
    }
    for (; i < n; i++) {
        double t = ((double)m - (double)l[i]) * scale;
        double b = floor(t);
        if (b < (double)(nb - 1)) {
            bucket[i] = (uint16_t)(int)b;
            w[i] = exp(h * (t - b));
        } else {
            bucket[i] = (uint16_t)(nb - 1);
            w[i] = 0.0;
        }
    }
}

/* Writes the indices i < n with a[i] == v to out (ascending); returns how many. */
static inline ptrdiff_t xllm_find_u16(const uint16_t *a, ptrdiff_t n, uint16_t v, int32_t *out) {
    __m256i vv = _mm256_set1_epi16((short)v);
    ptrdiff_t i = 0, k = 0;
    for (; i + 16 <= n; i += 16) {
        unsigned mask = (unsigned)_mm256_movemask_epi8(
            _mm256_cmpeq_epi16(_mm256_loadu_si256((const __m256i *)(a + i)), vv));
        while (mask) {  /* two mask bits per 16-bit lane */
            out[k++] = (int32_t)(i + (__builtin_ctz(mask) >> 1));
            mask &= mask - 1;
            mask &= mask - 1;
        }
    }
    for (; i < n; i++)
        if (a[i] == v) out[k++] = (int32_t)i;
    return k;
}

#endif
