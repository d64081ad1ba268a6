/* The vectorised passes of token sampling (included by sampling.pyx, which holds the selection
 * logic and its reasons).
 *
 * A token's weight is exp(-d), d = (top - logit) * inv_t its distance below the largest logit in
 * nats, computed in double precision (xllm_exp_pd, relative error < 1e-14) from the float32
 * logit, so that the compiled sampler and the float64 NumPy reference agree on the chosen token.
 * Its bucket, min(floor(d * per_nat), nb - 1), is monotone in the logit: bucket order is rank
 * order, so sums per bucket bound where the top-k, top-p, min-p and draw boundaries lie. Sums
 * per bucket are taken in increasing token index.
 */
#ifndef XLLM_SAMPLING_H
#define XLLM_SAMPLING_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "vecmath.h"

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

#endif /* XLLM_SAMPLING_H */
