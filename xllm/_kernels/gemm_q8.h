/* GGUF Q8_0 matrix multiply for xllm (included by qmatmul.pyx).
 *
 * out[M, N] (+)= x[M, K] @ W[N, K].T, W stored in GGUF Q8_0 layout: each row of W is K/32
 * blocks of 34 bytes, an fp16 scale d (little-endian) followed by 32 int8 quants q, and
 * W[n, 32b + i] = d * q[i].
 *
 * Arithmetic (the numpy reference in tests/test_kernels_q8.py does exactly the same):
 *   1. each 32-value block of each row of x is quantized to int8:
 *        amax = max |x|, dx = amax / 127 (float32), q = clamp(rint(x / dx), -127, 127)
 *      (q = 0 when dx == 0); rint rounds to nearest even (the default MXCSR mode);
 *   2. per block, an exact int32 dot product of the two int8 vectors;
 *   3. per output element, in increasing block order, in float32 without FMA contraction:
 *        s = dw * dx; t = s * (float)dot; acc = acc + t      (acc starts at +0.0f)
 *   4. out = acc, or out = out + acc when accumulating.
 * |dot| <= 32 * 128 * 127 < 2^24, so (float)dot is exact. Every output element goes through
 * the same sequence of float operations whatever M, its row, the tiling or the thread count,
 * so results are bitwise batch- and thread-invariant, and identical on the AVX2 and the
 * AVX-512 VNNI paths (the integer dot products are exact on both).
 *
 * Vectorisation: 8 rows of W at a time, one float lane per row of W, so the block loop stays
 * sequential per output element. The 8 int32 dot products of a block are produced by a
 * horizontal-add tree (exact integer arithmetic, any order gives the same value).
 * Behaviour with inf/NaN in x is unspecified.
 */
#ifndef XLLM_GEMM_Q8_H
#define XLLM_GEMM_Q8_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define XQ8_AI __attribute__((always_inline))
#define XQ8_TVNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#define XQ8_BLOCK_BYTES 34
/* Software prefetch distance along each row of W, in bytes (0: none); never faults. */
#ifndef XQ8_PF
#define XQ8_PF 512
#endif
/* Keep a value in a register: stops GCC from contracting t = s * dot; acc + t into an FMA. */
#define XQ8_BARRIER(v) __asm__("" : "+x"(v))

/* Quantize rows [m0, m1) of x (row stride ldx) to int8: qx row m at qx + m * K, scales at
 * dx + m * (K / 32). */
static void xq8_quantize_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K,
                              int8_t *qx, float *dx)
{
    const size_t nb = K / 32;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t m = m0; m < m1; m++) {
        const float *xr = x + m * ldx;
        for (size_t b = 0; b < nb; b++) {
            const float *p = xr + 32 * b;
            __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8);
            __m256 v2 = _mm256_loadu_ps(p + 16), v3 = _mm256_loadu_ps(p + 24);
            __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask),
                                                   _mm256_and_ps(v1, absmask)),
                                     _mm256_max_ps(_mm256_and_ps(v2, absmask),
                                                   _mm256_and_ps(v3, absmask)));
            __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
            float amax = _mm_cvtss_f32(a4);
            float d = amax / 127.0f;
            dx[m * nb + b] = d;
            int8_t *q = qx + m * K + 32 * b;
            if (d == 0.0f) {
                memset(q, 0, 32);
                continue;
            }
            __m256 dv = _mm256_set1_ps(d);
            /* rint(x / d), clamped (only matters when d is subnormal) */
            __m256i i0 = _mm256_cvtps_epi32(_mm256_div_ps(v0, dv));
            __m256i i1 = _mm256_cvtps_epi32(_mm256_div_ps(v1, dv));
            __m256i i2 = _mm256_cvtps_epi32(_mm256_div_ps(v2, dv));
            __m256i i3 = _mm256_cvtps_epi32(_mm256_div_ps(v3, dv));
            i0 = _mm256_min_epi32(_mm256_max_epi32(i0, lo), hi);
            i1 = _mm256_min_epi32(_mm256_max_epi32(i1, lo), hi);
            i2 = _mm256_min_epi32(_mm256_max_epi32(i2, lo), hi);
            i3 = _mm256_min_epi32(_mm256_max_epi32(i3, lo), hi);
            /* packs work within 128-bit lanes: [0-3 4-7 8-11 12-15 | ...] -> fix with perm */
            __m256i s01 = _mm256_packs_epi32(i0, i1); /* 0-3 8-11 | 4-7 12-15 (int16) */
            __m256i s23 = _mm256_packs_epi32(i2, i3);
            __m256i b8 = _mm256_packs_epi16(s01, s23); /* 0-3 8-11 16-19 24-27 | 4-7 ... */
            b8 = _mm256_permutevar8x32_epi32(b8, perm);
            _mm256_storeu_si256((__m256i *)q, b8);
        }
    }
}

/* The 8 int32 lanes of v0..v7 summed: lane j of the result = sum of the lanes of vj. */
static inline XQ8_AI __m256i xq8_reduce8(__m256i v0, __m256i v1, __m256i v2, __m256i v3,
                                         __m256i v4, __m256i v5, __m256i v6, __m256i v7)
{
    __m256i h01 = _mm256_hadd_epi32(v0, v1), h23 = _mm256_hadd_epi32(v2, v3);
    __m256i h45 = _mm256_hadd_epi32(v4, v5), h67 = _mm256_hadd_epi32(v6, v7);
    __m256i h0123 = _mm256_hadd_epi32(h01, h23), h4567 = _mm256_hadd_epi32(h45, h67);
    __m256i lo = _mm256_permute2x128_si256(h0123, h4567, 0x20);
    __m256i hi = _mm256_permute2x128_si256(h0123, h4567, 0x31);
    return _mm256_add_epi32(lo, hi);
}

/* fp16 scales of block b of the 8 rows wp[0..7], as float32. */
static inline XQ8_AI __m256 xq8_scales8(const uint8_t *const *wp, size_t off)
{
    uint16_t h[8];
    for (int j = 0; j < 8; j++)
        memcpy(&h[j], wp[j] + off, 2);
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
}

/* The int32 dot products (as 8 lanes each summing to it) of x block xq with w block wq. */
#define XQ8_DOT_AVX2(xq, wq)                                                              \
    _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wq, wq),                      \
                                           _mm256_sign_epi8(xq, wq)), ones)
#define XQ8_DOT_VNNI(xq, wq)                                                              \
    _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(wq, wq),                 \
                        _mm256_sign_epi8(xq, wq))

/* Micro-kernel: MR (<= 4) rows of x against 8 rows of W (wp[0..7]; duplicates for a tail),
 * writing the first nr (<= 8) columns. */
#define XQ8_DEFINE_MK(NAME, ATTR, DOT)                                                    \
    static inline XQ8_AI ATTR void NAME(                                                  \
        const int MR, const int8_t *qx, const float *dx, size_t K,                        \
        const uint8_t *const *wp, size_t nr, float *out, size_t ldo, int accum)           \
    {                                                                                     \
        const size_t nb = K / 32;                                                         \
        const __m256i ones = _mm256_set1_epi16(1);                                        \
        (void)ones;                                                                       \
        __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;         \
        for (size_t b = 0; b < nb; b++) {                                                 \
            const size_t off = b * XQ8_BLOCK_BYTES;                                       \
            if (XQ8_PF && !(b & 1))                                                       \
                for (int j_ = 0; j_ < 8; j_++)                                            \
                    _mm_prefetch((const char *)wp[j_] + off + XQ8_PF, _MM_HINT_T0);       \
            __m256 dw = xq8_scales8(wp, off);                                             \
            __m256i w0 = _mm256_loadu_si256((const __m256i *)(wp[0] + off + 2));          \
            __m256i w1 = _mm256_loadu_si256((const __m256i *)(wp[1] + off + 2));          \
            __m256i w2 = _mm256_loadu_si256((const __m256i *)(wp[2] + off + 2));          \
            __m256i w3 = _mm256_loadu_si256((const __m256i *)(wp[3] + off + 2));          \
            __m256i w4 = _mm256_loadu_si256((const __m256i *)(wp[4] + off + 2));          \
            __m256i w5 = _mm256_loadu_si256((const __m256i *)(wp[5] + off + 2));          \
            __m256i w6 = _mm256_loadu_si256((const __m256i *)(wp[6] + off + 2));          \
            __m256i w7 = _mm256_loadu_si256((const __m256i *)(wp[7] + off + 2));          \
            for (int i = 0; i < MR; i++) {                                                \
                __m256i xq = _mm256_loadu_si256((const __m256i *)(qx + i * K + 32 * b));  \
                __m256i d = xq8_reduce8(DOT(xq, w0), DOT(xq, w1), DOT(xq, w2),            \
                                        DOT(xq, w3), DOT(xq, w4), DOT(xq, w5),            \
                                        DOT(xq, w6), DOT(xq, w7));                        \
                __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(dx[i * nb + b]));             \
                __m256 t = _mm256_mul_ps(s, _mm256_cvtepi32_ps(d));                       \
                XQ8_BARRIER(t);                                                           \
                if (i == 0) acc0 = _mm256_add_ps(acc0, t);                                \
                if (i == 1) acc1 = _mm256_add_ps(acc1, t);                                \
                if (i == 2) acc2 = _mm256_add_ps(acc2, t);                                \
                if (i == 3) acc3 = _mm256_add_ps(acc3, t);                                \
            }                                                                             \
        }                                                                                 \
        float r[4][8];                                                                    \
        _mm256_storeu_ps(r[0], acc0);                                                     \
        _mm256_storeu_ps(r[1], acc1);                                                     \
        _mm256_storeu_ps(r[2], acc2);                                                     \
        _mm256_storeu_ps(r[3], acc3);                                                     \
        for (int i = 0; i < MR; i++)                                                      \
            for (size_t j = 0; j < nr; j++) {                                             \
                float *o = out + i * ldo + j;                                             \
                *o = accum ? *o + r[i][j] : r[i][j];                                      \
            }                                                                             \
    }

XQ8_DEFINE_MK(xq8_mk_avx2, , XQ8_DOT_AVX2)
XQ8_DEFINE_MK(xq8_mk_vnni, XQ8_TVNNI, XQ8_DOT_VNNI)

/* Rows [n0, n1) of out (all M rows of x): W rows in groups of 8, x rows in groups of 4. */
#define XQ8_DEFINE_PANEL(NAME, ATTR, MK)                                                  \
    static ATTR void NAME(const int8_t *qx, const float *dx, size_t M, size_t K,          \
                          const uint8_t *w, size_t n0, size_t n1, float *out, size_t ldo, \
                          int accum)                                                      \
    {                                                                                     \
        const size_t rb = K / 32 * XQ8_BLOCK_BYTES, nb = K / 32;                          \
        for (size_t n = n0; n < n1; n += 8) {                                             \
            size_t nr = n1 - n < 8 ? n1 - n : 8;                                          \
            const uint8_t *wp[8];                                                         \
            for (size_t j = 0; j < 8; j++)                                                \
                wp[j] = w + (n + (j < nr ? j : nr - 1)) * rb;                             \
            size_t m = 0;                                                                 \
            for (; m + 4 <= M; m += 4)                                                    \
                MK(4, qx + m * K, dx + m * nb, K, wp, nr, out + m * ldo + n, ldo, accum); \
            switch (M - m) {                                                              \
            case 3: MK(3, qx + m * K, dx + m * nb, K, wp, nr, out + m * ldo + n, ldo,     \
                       accum); break;                                                     \
            case 2: MK(2, qx + m * K, dx + m * nb, K, wp, nr, out + m * ldo + n, ldo,     \
                       accum); break;                                                     \
            case 1: MK(1, qx + m * K, dx + m * nb, K, wp, nr, out + m * ldo + n, ldo,     \
                       accum); break;                                                     \
            default: break;                                                               \
            }                                                                             \
        }                                                                                 \
    }

XQ8_DEFINE_PANEL(xq8_panel_avx2, , xq8_mk_avx2)
XQ8_DEFINE_PANEL(xq8_panel_vnni, XQ8_TVNNI, xq8_mk_vnni)

/* isa: 0 = AVX2, 1 = AVX-512 VNNI (caller checks the CPU has avx512vnni). */
static void xq8_panel(int isa, const int8_t *qx, const float *dx, size_t M, size_t K,
                      const uint8_t *w, size_t n0, size_t n1, float *out, size_t ldo, int accum)
{
    if (isa)
        xq8_panel_vnni(qx, dx, M, K, w, n0, n1, out, ldo, accum);
    else
        xq8_panel_avx2(qx, dx, M, K, w, n0, n1, out, ldo, accum);
}

#endif /* XLLM_GEMM_Q8_H */
