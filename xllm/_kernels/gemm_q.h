/* Group-quantized matrix multiply for xllm (included by qmatmul.pyx).
 *
 * out[M, N] (+)= x[M, K] @ W[N, K].T with W int8 (symmetric, groups of G >= 32) or int4 (groups
 * of 32, symmetric with an offset of 8, or asymmetric with a minimum) in the packed panel layout
 * described in xllm/_kernels/layout.py: 16 rows of W per panel, each 32-value block interleaved so that one
 * 64-byte row of the block holds 4 consecutive values of each of the 16 rows.
 *
 * Arithmetic (xllm/_kernels/reference.py qmatmul does exactly the same):
 *   1. each 32-value block of each row of x is quantized to three int8 parts (about 23 bits,
 *      close to float32; one int8 part alone moved SmolLM2's logits by up to 2):
 *      x ~ dx * (q1 + q2 / 256 + q3 / 65536), dx = amax / 127, t = x / dx, and for each part
 *      q = clamp(rint(t), -127, 127), t = (t - q) * 256. With PARTS = 2 (the weight's `parts`;
 *      the int8 default: their own rounding is far coarser) q3 = 0 (about 16 bits), with
 *      PARTS = 1 (the GGUF codecs' default, llama.cpp's precision) q2 = q3 = 0 (8 bits): the
 *      micro-kernels, compiled per PARTS, skip the dots of the parts past PARTS and their
 *      terms below, 0;
 *   2. per block, exact int32 dots c12 = 256 * (q1 . c) + (q2 . c) and c3 = q3 . c with the
 *      weight codes c (minus 8 for symmetric int4): on AVX-512 VNNI with vpdpbusd of the
 *      unsigned codes (int8 stored + 128), each part's dot starting from -128 (int8) or -8
 *      (int4) times the sum of its q's; on AVX2 with maddubs/madd;
 *   3. per output element, in increasing block order, float32, with fma(a, b, c) = a * b + c
 *      rounded once and dx' = dx / 256: v = (float)c12 + (float)c3 / 256 (exact products, so
 *      FMA or not is the same); acc = fma(dw * dx', v, acc); and for asymmetric W, with S the
 *      same combination of the sums of the q's: acc = fma(mw, dx' * S, acc);
 *   4. out = acc, or out = out + acc.
 * Each output element goes through the same operations whatever M, its row, the thread count or
 * the ISA path: results are bitwise batch-invariant.
 *
 * The codecs (GGUF Q5_0, Q5_1, Q4_K, Q5_K, Q6_K; xq_weights.fmt != 0) share step 1 and the work
 * split, and have their own steps 2 and 3: gemm_k.h states them. Their offset corrections per
 * 16 values (Q6_K) come from the half sums of x's parts (xq_xh, written beside each xq_xb).
 */
#ifndef XLLM_GEMM_Q_H
#define XLLM_GEMM_Q_H

#include <immintrin.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define XQ_AI __attribute__((always_inline))
#define XQ_T512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
/* Makes v opaque to the optimiser, so that GCC cannot contract the product that gives v and a
 * later sum into one FMA (the reference rounds the product first). */
#define XQ_NO_FMA(v) __asm__("" : "+x"(v))
/* Software prefetch along a panel when one tile of rows streams it (M <= 6): XQ_PF bytes ahead,
 * non-temporal (the lines are read once). A 1-row Q8_0 stream ran 5-10% faster so than 1024 bytes
 * ahead into L1 (T0); a second, farther prefetch into L2 (gemm_k.h's XK_PF2) made it slower.
 * Decode (M = 1) cost, AVX-512 on Zen 4, weights in L2: per panel and block, 16 vpdpbusd (2 parts,
 * at most one per cycle) and the block's step 3, 21-25 cycles (Q4_0, Q8_0) to 27-46 (the codecs,
 * gemm_k.h): one core computes 35-75 GB/s, so one thread is bound by how far ahead memory is
 * requested and two by the memory bandwidth (and its 4 KiB pages: huge pages read 30-40% faster
 * on this VM). Splitting a block's dot chains in two changed nothing (latency is not the limit). */
#ifndef XQ_PF
#define XQ_PF 4096
#endif
#ifndef XQ_PF_HINT
#define XQ_PF_HINT _MM_HINT_NTA
#endif

#ifndef XQ_X_BYTES
#define XQ_X_BYTES (1 << 19) /* quantized x per work item, at most (qmatmul.pyx) */
#endif
#ifndef XQ_OWN_M
#define XQ_OWN_M 2 /* up to this many rows, every thread quantizes x itself (qmatmul.pyx) */
#endif
#define XQ_MR512 6 /* rows of x per AVX-512 micro-kernel call, at most: 24 of 32 zmm hold sums */
#define XQ_MR256 2 /* and per AVX2 call */

typedef struct {
    const uint8_t *qs;    /* [P][nb][512 (int8) or 256 (int4)] */
    const uint8_t *scales; /* [P][ng][16] float16 or float32 */
    const uint8_t *mins;  /* the same shape and type, or NULL (symmetric) */
    size_t nb, ng;        /* K / 32 blocks, K / G groups per row */
    int bits, gshift, f32, parts; /* 8 or 4; log2(G / 32); scales are float32; 1, 2 or 3 */
    int fmt;              /* 0: the int8/int4 formats above; else a codec of gemm_k.h (XK_*) */
    const uint8_t *high;  /* gemm_k.h: the bit planes above the low nibbles, or NULL */
    const uint8_t *sub;   /* gemm_k.h: the sub-block scales of the K-quants, or NULL */
} xq_weights;

/* One 32-value block of one row of x, quantized (step 1): 128 bytes, 2 cache lines. */
typedef struct {
    int8_t q[3][32];        /* the three parts (the third all 0 for 2 parts) */
    float d, ds;            /* dx / 256; d * S (S = 256 sum(q1) + sum(q2) + sum(q3) / 256) */
    int32_t c128[3], c8[3]; /* -128 and -8 times the sum of each part: the dots with unsigned
                             * codes start from these, so no offset is subtracted later */
} xq_xb;

/* Beside each xq_xb, for the codes whose offset applies per 16 values (gemm_k.h, Q6_K): -32 times
 * the sum of values 0..15 (lo) and 16..31 (hi) of each part. 32 bytes. */
typedef struct {
    int32_t lo[3], hi[3];
    int32_t pad[2];
} xq_xh;

/* Quantize rows [m0, m1) of x (row stride ldx) into qx (row m, block b at qx[m * K / 32 + b]),
 * and the half sums of each block into xh (the same index). */
static void xq_quantize_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K,
                             int parts, xq_xb *qx, xq_xh *xh)
{
    const size_t nb = K / 32;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    const __m256 k256 = _mm256_set1_ps(256.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t m = m0; m < m1; m++) {
        for (size_t b = 0; b < nb; b++) {
            const float *p = x + m * ldx + 32 * b;
            xq_xb *o = qx + m * nb + b;
            __m256 a = _mm256_setzero_ps();
            for (int j = 0; j < 4; j++)
                a = _mm256_max_ps(a, _mm256_and_ps(_mm256_loadu_ps(p + 8 * j), absmask));
            __m128 a4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            a4 = _mm_max_ps(a4, _mm_movehl_ps(a4, a4));
            a4 = _mm_max_ss(a4, _mm_movehdup_ps(a4));
            o->ds = _mm_cvtss_f32(a4) / 127.0f; /* d for now */
        }
        /* a second pass: with every d ready, the long dependency chains of the blocks can
         * overlap (one pass would wait on each block's amax before its divisions) */
        for (size_t b = 0; b < nb; b++) {
            const float *p = x + m * ldx + 32 * b;
            xq_xb *o = qx + m * nb + b;
            __m256 v[4];
            for (int j = 0; j < 4; j++)
                v[j] = _mm256_loadu_ps(p + 8 * j);
            const float d = o->ds;
            o->d = d * (1.0f / 256.0f);
            __m256i iq[3][4], s[3];
            for (int j = 0; j < 4; j++) {
                /* t = x / d; each part is the rounded remainder of the previous one, * 256 */
                __m256 t = d == 0.0f ? _mm256_setzero_ps() : _mm256_div_ps(v[j], _mm256_set1_ps(d));
                for (int k = 0; k < 3; k++) {
                    /* rint by the conversion, clamp as ints: |t| < 2^22 even for subnormal
                     * d, and NaN gives INT_MIN -> -127, as the float clamp did */
                    iq[k][j] = k >= parts ? _mm256_setzero_si256() :
                        _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(t), lo), hi);
                    t = _mm256_mul_ps(_mm256_sub_ps(t, _mm256_cvtepi32_ps(iq[k][j])), k256);
                    s[k] = j ? _mm256_add_epi32(s[k], iq[k][j]) : iq[k][j];
                }
            }
            int32_t sum[3];
            for (int k = 0; k < 3; k++) { /* packs work within 128-bit lanes: permute after */
                __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(s[k]),
                                           _mm256_extracti128_si256(s[k], 1));
                t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
                sum[k] = _mm_cvtsi128_si32(_mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1)));
                o->c128[k] = -128 * sum[k];
                o->c8[k] = -8 * sum[k];
                __m256i lo8 = _mm256_add_epi32(iq[k][0], iq[k][1]); /* values 0..15 */
                __m128i l4 = _mm_add_epi32(_mm256_castsi256_si128(lo8),
                                           _mm256_extracti128_si256(lo8, 1));
                l4 = _mm_add_epi32(l4, _mm_shuffle_epi32(l4, 0x4e));
                const int32_t lo = _mm_cvtsi128_si32(_mm_add_epi32(l4, _mm_shuffle_epi32(l4, 0xb1)));
                xh[m * nb + b].lo[k] = -32 * lo;
                xh[m * nb + b].hi[k] = -32 * (sum[k] - lo);
                __m256i b8 = _mm256_packs_epi16(_mm256_packs_epi32(iq[k][0], iq[k][1]),
                                                _mm256_packs_epi32(iq[k][2], iq[k][3]));
                _mm256_storeu_si256((__m256i *)o->q[k], _mm256_permutevar8x32_epi32(b8, perm));
            }
            /* exact product: FMA or not, same */
            o->ds = o->d * ((float)(256 * sum[0] + sum[1]) + (float)sum[2] * (1.0f / 256.0f));
        }
    }
}

static inline XQ_AI int32_t xq_load4(const int8_t *p)
{
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Store the first nr lanes of r (row i of an AVX2 tile) to o, or add them when accumulating. */
static inline void xq_store(float *o, const float *r, size_t nr, int accum)
{
    for (size_t j = 0; j < nr; j++)
        o[j] = accum ? o[j] + r[j] : r[j];
}

/* acc + dpbusd(w, 4 bytes at p broadcast): GCC does not fold the broadcast into the
 * instruction itself ({1to16}), and a separate vpbroadcastd per row and part competes with the
 * dots for issue slots (it shows from a few rows of x on). */
static inline XQ_AI XQ_T512 __m512i xq_dpbusd(__m512i acc, __m512i w, const int8_t *p)
{
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const int32_t *)p));
    return acc;
}

/* The scales (or mins) at p of one group for the rows of a tile as float32, from float32 (if
 * w->f32) or float16: 16 rows in a 512-bit register, 8 in a 256-bit one. (Macros, as is
 * XQ_BLOCK_TERMS: written as inline functions, they change how GCC schedules the micro-kernels.) */
#define XQ_SCALES512(p)                                                                          \
    (w->f32 ? _mm512_loadu_ps(p) : _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p))))
#define XQ_SCALES256(p)                                                                          \
    (w->f32 ? _mm256_loadu_ps((const float *)(p))                                                \
            : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))

/* The sums of a micro-kernel: acc[i] for its MR rows (at most MAX), in P-bit registers, zeroed
 * (step 3 starts from 0). */
#define XQ_ZEROED_ACC(P, MAX)                                                                    \
    __m##P acc[MAX];                                                                             \
    for (int i = 0; i < MR; i++)                                                                 \
        acc[i] = _mm##P##_setzero_ps()

/* v = c12 + c3 / 256 of row i from the dots d[k][i] of the parts (step 3): c12 = 256 d0 + d1
 * (d1 = 0 with one part, d2 = 0 with fewer than three: not computed). */
#define XQ_PARTS_VALUE(P, d, i)                                                                  \
    (PARTS == 1   ? _mm##P##_cvtepi32_ps(_mm##P##_slli_epi32(d[0][i], 8))                       \
     : PARTS == 2 ? _mm##P##_cvtepi32_ps(_mm##P##_add_epi32(_mm##P##_slli_epi32(d[0][i], 8),    \
                                                            d[1][i]))                            \
                  : _mm##P##_fmadd_ps(_mm##P##_cvtepi32_ps(d[2][i]), inv256,                     \
                                      _mm##P##_cvtepi32_ps(_mm##P##_add_epi32(                   \
                                          _mm##P##_slli_epi32(d[0][i], 8), d[1][i]))))

/* Step 3 for one block, in P-bit registers, for both micro-kernels: acc[i] (i < MR) gets the
 * block's terms from the dots d[k][i] of the parts, the scales ws (and the mins wm, if ASYM) of
 * its group, and row i's dx' (xb[i]->d) and dx' * S (xb[i]->ds). c12 + c3 / 256 is one FMA: the
 * product is exact, so it rounds as mul + add do. */
#define XQ_BLOCK_TERMS(P, ASYM)                                                                  \
    for (int i = 0; i < MR; i++) {                                                               \
        __m##P v = XQ_PARTS_VALUE(P, d, i);                                                      \
        acc[i] = _mm##P##_fmadd_ps(_mm##P##_mul_ps(ws, _mm##P##_set1_ps(xb[i]->d)), v, acc[i]); \
        if (ASYM)                                                                                \
            acc[i] = _mm##P##_fmadd_ps(wm, _mm##P##_set1_ps(xb[i]->ds), acc[i]);                 \
    }

/* Step 4 in 512-bit registers, for every micro-kernel of 16 columns: out rows 0..MR-1 (stride
 * ldo) get acc[i], or add it (accum); only the first nr columns, masked: no scalar stores. */
#define XQ_STORE_ACC512                                                                          \
    do {                                                                                         \
        const __mmask16 valid = (__mmask16)((1u << nr) - 1);                                     \
        for (int i = 0; i < MR; i++) {                                                           \
            float *o = out + i * ldo;                                                            \
            if (accum)                                                                           \
                acc[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(valid, o), acc[i]);                 \
            _mm512_mask_storeu_ps(o, valid, acc[i]);                                             \
        }                                                                                        \
    } while (0);

/* AVX-512 VNNI micro-kernel: MR rows of x against panel p (16 rows of W, the first nr valid). */
/* KIND, PARTS (constants: each gets its own code): 0 int8, 1 int4 sym., 2 asym.; 1, 2 or 3 parts */
static inline XQ_AI XQ_T512 void xq_mk512(const int MR, const int KIND, const int PARTS,
                                          const xq_weights *w, size_t p, const xq_xb *x,
                                          float *out, size_t ldo, size_t nr, int accum,
                                          size_t t, size_t nt)
{
    const size_t nb = w->nb, qb = KIND ? 256 : 512, ss = w->f32 ? 64 : 32;
    const uint8_t *wq = w->qs + p * nb * qb, *sc = w->scales + p * w->ng * ss;
    const uint8_t *mn = KIND == 2 ? w->mins + p * w->ng * ss : NULL;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512 inv256 = _mm512_set1_ps(1.0f / 256.0f);
    XQ_ZEROED_ACC(512, XQ_MR512);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wq + b * qb;
        if (nt == 1) { /* stream this panel, XQ_PF bytes ahead */
            for (size_t i = 0; i < qb; i += 64)
                _mm_prefetch((const char *)blk + XQ_PF + i, XQ_PF_HINT);
        } else /* row tile t of nt: its share of the next panel's lines (a panel is in cache
              * before its first tile starts) */
            for (size_t l = (t * nb + b) * qb / 64 / nt; l < (t * nb + b + 1) * qb / 64 / nt; l++)
                _mm_prefetch((const char *)wq + nb * qb + 64 * l, _MM_HINT_T0);
        const xq_xb *xb[XQ_MR512];
        __m512i d[3][XQ_MR512]; /* dots of the parts, from the offset corrections (loads) */
        for (int i = 0; i < MR; i++) {
            xb[i] = x + i * nb + b;
            for (int k = 0; k < PARTS; k++)
                d[k][i] = KIND == 2 ? _mm512_setzero_si512()
                                    : _mm512_set1_epi32(KIND ? xb[i]->c8[k] : xb[i]->c128[k]);
        }
#define XQ_DP512(W, o)                                                                    \
    for (int i = 0; i < MR; i++)                                                          \
        for (int k = 0; k < PARTS; k++)                                                   \
            d[k][i] = xq_dpbusd(d[k][i], W, xb[i]->q[k] + (o));
        if (KIND == 0) {
#pragma GCC unroll 8 /* else the accumulators are shuffled between registers and spilled */
            for (int j = 0; j < 8; j++) {
                __m512i W = _mm512_loadu_si512(blk + 64 * j);
                XQ_DP512(W, 4 * j)
            }
        } else {
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                __m512i P = _mm512_loadu_si512(blk + 64 * j);
                __m512i L = _mm512_and_si512(P, low4);
                __m512i H = _mm512_and_si512(_mm512_srli_epi16(P, 4), low4);
                XQ_DP512(L, 4 * j)
                XQ_DP512(H, 16 + 4 * j)
            }
        }
        const size_t g = (b >> w->gshift) * ss;
        __m512 ws = XQ_SCALES512(sc + g);
        __m512 wm = KIND != 2 ? ws : XQ_SCALES512(mn + g);
        XQ_BLOCK_TERMS(512, KIND == 2)
    }
    XQ_STORE_ACC512
}

/* AVX2 micro-kernel: MR rows of x (PARTS parts) against half h (rows 8h..8h+7) of panel p; if
 * stream (h = 0), it prefetches the panel XQ_PF bytes ahead. */
static inline XQ_AI void xq_mk256(const int MR, const int PARTS, const xq_weights *w, size_t p,
                                  int h, const xq_xb *x, float *out, size_t ldo, size_t nr,
                                  int accum, int stream)
{
    const size_t nb = w->nb, qb = w->bits == 8 ? 512 : 256, ss = w->f32 ? 64 : 32;
    const int sym4 = w->bits == 4 && !w->mins; /* only these dots need an offset correction */
    const uint8_t *wq = w->qs + p * nb * qb + 32 * h, *sc = w->scales + p * w->ng * ss;
    const uint8_t *mn = w->mins ? w->mins + p * w->ng * ss : NULL;
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    const __m256 inv256 = _mm256_set1_ps(1.0f / 256.0f);
    XQ_ZEROED_ACC(256, XQ_MR256);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wq + b * qb;
        if (stream)
            for (size_t i = 0; i < qb; i += 64)
                _mm_prefetch((const char *)blk + XQ_PF + i, XQ_PF_HINT);
        const xq_xb *xb[XQ_MR256];
        __m256i d[3][XQ_MR256];
        for (int i = 0; i < MR; i++) {
            xb[i] = x + i * nb + b;
            for (int k = 0; k < PARTS; k++)
                d[k][i] = _mm256_set1_epi32(sym4 ? xb[i]->c8[k] : 0); /* int8: signed dot */
        }
#define XQ_X256(i, k, o) _mm256_set1_epi32(xq_load4(xb[i]->q[k] + (o)))
        for (int j = 0; j < (w->bits == 8 ? 8 : 4); j++) {
            __m256i P = _mm256_loadu_si256((const __m256i *)(blk + 64 * j));
            __m256i W = _mm256_xor_si256(P, flip), A = _mm256_sign_epi8(W, W);
            __m256i L = _mm256_and_si256(P, low4);
            __m256i H = _mm256_and_si256(_mm256_srli_epi16(P, 4), low4);
            for (int i = 0; i < MR; i++)
                for (int k = 0; k < PARTS; k++) {
                    __m256i s16 = w->bits == 8
                        ? _mm256_maddubs_epi16(A, _mm256_sign_epi8(XQ_X256(i, k, 4 * j), W))
                        : _mm256_add_epi16(_mm256_maddubs_epi16(L, XQ_X256(i, k, 4 * j)),
                                           _mm256_maddubs_epi16(H, XQ_X256(i, k, 16 + 4 * j)));
                    d[k][i] = _mm256_add_epi32(d[k][i], _mm256_madd_epi16(s16, ones));
                }
        }
        const size_t g = (b >> w->gshift) * ss + h * ss / 2;
        __m256 ws = XQ_SCALES256(sc + g);
        __m256 wm = !mn ? ws : XQ_SCALES256(mn + g);
        XQ_BLOCK_TERMS(256, mn)
    }
    for (int i = 0; i < MR; i++) {
        float r[8];
        _mm256_storeu_ps(r, acc[i]);
        xq_store(out + i * ldo + 8 * h, r, nr, accum);
    }
}

/* MACRO(A, PARTS) with PARTS the weight's parts as a constant: each count gets its own code. */
#define XQ_BY_PARTS(MACRO, A)                                                                    \
    (w->parts == 1 ? MACRO(A, 1) : w->parts == 2 ? MACRO(A, 2) : MACRO(A, 3))

/* The M rows in near-equal tiles of at most XQ_MR512 (13 = 5 + 4 + 4: no 1-row tile, which
 * would cost almost as much as a full one). */
static inline XQ_AI XQ_T512 void xq_rows512(const int KIND, const int PARTS, const xq_weights *w,
                                            size_t p, const xq_xb *x, size_t M, float *out,
                                            size_t ldo, size_t nr, int accum)
{
    const size_t nt = (M + XQ_MR512 - 1) / XQ_MR512;
    for (size_t t = 0, m = 0, r; t < nt; t++, m += r) {
        r = M / nt + (t < M % nt);
        /* tiles of 1 or 2 rows occur only when M <= 2, as the one tile (t = 0, nt = 1): the
         * constants let their micro-kernels drop the prefetch of the other case */
#define XQ_CASE512(R, T, NT) case R: xq_mk512(R, KIND, PARTS, w, p, x + m * w->nb, out + m * ldo, \
                                              ldo, nr, accum, T, NT); break;
        switch (r) {
        XQ_CASE512(1, 0, 1) XQ_CASE512(2, 0, 1)
        XQ_CASE512(3, t, nt) XQ_CASE512(4, t, nt) XQ_CASE512(5, t, nt) XQ_CASE512(6, t, nt)
        default: break;
        }
    }
}

static XQ_T512 void xq_panel512(const xq_weights *w, size_t p, const xq_xb *x, size_t M,
                                float *out, size_t ldo, size_t nr, int accum)
{
#define XQ_ROWS512(K, P) xq_rows512(K, P, w, p, x, M, out, ldo, nr, accum)
    if (w->bits == 8)
        XQ_BY_PARTS(XQ_ROWS512, 0);
    else if (!w->mins)
        XQ_BY_PARTS(XQ_ROWS512, 1);
    else
        XQ_BY_PARTS(XQ_ROWS512, 2);
}

static void xq_panel256(const xq_weights *w, size_t p, const xq_xb *x, size_t M, float *out,
                        size_t ldo, size_t nr, int accum)
{
    for (int h = 0; h < 2 && nr > (size_t)(8 * h); h++) {
        const size_t nh = nr - 8 * h < 8 ? nr - 8 * h : 8;
        size_t m = 0;
#define XQ_MK256(R, P) xq_mk256(R, P, w, p, h, x + m * w->nb, out + m * ldo, ldo, nh, accum, \
                                h == 0 && m == 0)
        for (; m + XQ_MR256 <= M; m += XQ_MR256)
            XQ_BY_PARTS(XQ_MK256, XQ_MR256);
        if (M > m)
            XQ_BY_PARTS(XQ_MK256, 1);
    }
}

#include "gemm_k.h" /* the codecs (Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) */

/* Panels [p0, p1) of out (all M rows); N = rows of W. isa: 0 = AVX2, 1 = AVX-512 VNNI. x and xh:
 * the quantized rows of x and their half sums (xq_quantize_rows). */
static void xq_panels(int isa, const xq_weights *w, size_t p0, size_t p1, const xq_xb *x,
                      const xq_xh *xh, size_t M, size_t N, float *out, int accum)
{
    for (size_t p = p0; p < p1; p++) {
        const size_t nr = N - 16 * p < 16 ? N - 16 * p : 16;
        if (w->fmt)
            xk_panel(isa, w, p, x, xh, M, out + 16 * p, N, nr, accum);
        else if (isa)
            xq_panel512(w, p, x, M, out + 16 * p, N, nr, accum);
        else
            xq_panel256(w, p, x, M, out + 16 * p, N, nr, accum);
    }
}

/* Row r of W dequantized into o[K] (float32, the same operations as layout.dequantize_rows). */
static void xq_dequant_row(const xq_weights *w, size_t r, float *o)
{
    const size_t p = r / 16, lane = r % 16, qb = w->bits == 8 ? 512 : 256;
    const size_t ss = w->f32 ? 64 : 32, es = w->f32 ? 4 : 2;
    if (w->fmt) {
        xk_dequant_row(w, r, o);
        return;
    }
    for (size_t b = 0; b < w->nb; b++) {
        const uint8_t *blk = w->qs + (p * w->nb + b) * qb + 4 * lane;
        const size_t g = (p * w->ng + (b >> w->gshift)) * ss + lane * es;
        float d, m = 0.0f;
        if (w->f32) {
            memcpy(&d, w->scales + g, 4);
            if (w->mins) memcpy(&m, w->mins + g, 4);
        } else {
            uint16_t h;
            memcpy(&h, w->scales + g, 2);
            d = _cvtsh_ss(h);
            if (w->mins) { memcpy(&h, w->mins + g, 2); m = _cvtsh_ss(h); }
        }
        float *ob = o + 32 * b;
        for (int j = 0; j < (w->bits == 8 ? 8 : 4); j++)
            for (int t = 0; t < 4; t++) {
                const uint8_t c = blk[64 * j + t];
                if (w->bits == 8) {
                    ob[4 * j + t] = d * (float)((int)c - 128);
                } else if (!w->mins) {
                    ob[4 * j + t] = d * (float)((int)(c & 15) - 8);
                    ob[16 + 4 * j + t] = d * (float)((int)(c >> 4) - 8);
                } else {
                    float lo = d * (float)(c & 15), hi = d * (float)(c >> 4);
                    XQ_NO_FMA(lo);
                    XQ_NO_FMA(hi);
                    ob[4 * j + t] = lo + m;
                    ob[16 + 4 * j + t] = hi + m;
                }
            }
    }
}

#endif /* XLLM_GEMM_Q_H */
