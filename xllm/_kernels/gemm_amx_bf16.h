/* AMX tile kernel of the matrix multiply with bfloat16 weights (included by matmul.pyx;
 * docs/amx.rst): out[M, N] (+)= x[M, K] @ w[N, K].T, x float32, w bfloat16 (uint16), on
 * tdpbf16ps, with the tile operations of tiles.h (the AMX unit, HW = 1, or its model, HW = 0).
 *
 * Arithmetic:
 *   1. each value v of x is split into XB_PARTS = 2 bfloat16 parts: h1 = v with its low 16 bits
 *      cut (toward zero: it never overflows), h2 = v - h1 (exact in float32) rounded to nearest
 *      even; |v - h1 - h2| <= 2^-16 |v| (NaN stays NaN, an infinity is h1 alone). Rows of x are
 *      padded with zeros to a multiple of 32 values (Kp);
 *   2. for each 32-value chunk of k in increasing order, for each part, one tdpbf16ps adds the
 *      products of the chunk to the float32 sums C, in the order of the hardware (the model:
 *      tiles.h, xa_emu_dotbf16);
 *   3. out = C, or out = out + C.
 * The products are exact and C is float32, so the result is as accurate as the vector path's
 * (within 2^-16 relative for x's parts, plus float32 rounding), but the order of the sums is the
 * tile unit's: the bits differ from the vector path's. Each row is computed alone (tile rows
 * never mix), in the same order whatever M, its place in a tile, the thread count: the tile path
 * is batch-invariant by itself, so when it is on it serves every M, one row included.
 *
 * Tiles: C = tmm0 [rows of x (up to 16), 16 rows of w] float32; A = tmm1 [rows of x, 32 values of
 * a part] bf16; B = tmm2: 16 lines, line kk holding values 2kk and 2kk + 1 of the chunk for each
 * of 16 rows of w (the "VNNI" pair order), converted from w per panel into the caller's buffer.
 */
#ifndef XLLM_GEMM_AMX_BF16_H
#define XLLM_GEMM_AMX_BF16_H

#include "tiles.h"

#define XB_PARTS 2

/* The bfloat16 parts of x's rows [m0, m1): part e of row m at xs + (e * M + m) * kp, kp >= K
 * values per row (the rest 0). */
static void xb_split_rows(const float *x, size_t ldx, size_t m0, size_t m1, size_t K, size_t kp,
                          size_t M, uint16_t *xs)
{
    for (size_t m = m0; m < m1; m++) {
        uint16_t *h1 = xs + m * kp, *h2 = xs + (M + m) * kp;
        for (size_t k = 0; k < kp; k++) {
            const float v = k < K ? x[m * ldx + k] : 0.0f;
            uint32_t u;
            memcpy(&u, &v, 4);
            if (v != v) { /* NaN: a quiet NaN of its sign in the first part */
                h1[k] = (uint16_t)((u >> 16) | 0x0040);
                h2[k] = 0;
                continue;
            }
            h1[k] = (uint16_t)(u >> 16);
            const uint32_t t = u & 0xffff0000u;
            float high;
            memcpy(&high, &t, 4);
            const float r = __builtin_isinf(v) ? 0.0f : v - high; /* exact */
            uint32_t ur;
            memcpy(&ur, &r, 4);
            h2[k] = (uint16_t)((ur + 0x7fffu + ((ur >> 16) & 1u)) >> 16); /* |r| < 2^-7 |v| */
        }
    }
}

#define XB_AI __attribute__((always_inline))

/* Panel p (rows 16p .. 16p + 15 of w [N, K], row stride K) as kp / 32 B tiles of 1 KiB at b:
 * line kk of chunk c holds, for each row n of the panel, values 32c + 2kk and 32c + 2kk + 1
 * (0 past K or N). Per chunk: the 16 rows' 32 values (masked loads: nothing past K or N is
 * read), then a 16 x 16 transpose of their dwords (value pairs). */
static XA_T void xb_panel_tiles(const uint16_t *w, size_t N, size_t K, size_t kp, size_t p,
                                uint16_t *b)
{
    for (size_t c = 0; c < kp / 32; c++) {
        const size_t k0 = 32 * c, nk = K - k0 < 32 ? K - k0 : 32;
        const __mmask32 mask = nk == 32 ? 0xffffffffu : (((__mmask32)1 << nk) - 1);
        __m512i r[16], t[16], u[4][4];
        for (size_t n = 0; n < 16; n++) {
            const size_t row = 16 * p + n;
            r[n] = row < N ? _mm512_maskz_loadu_epi16(mask, w + row * K + k0)
                           : _mm512_setzero_si512();
        }
        /* lane L of r[n]: dwords 4L..4L+3 of row n. t: pairs of rows interleaved; u[g][j]:
         * lane L holds dword 4L + j of rows 4g..4g+3 */
        for (int i = 0; i < 8; i++) {
            t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
        }
        for (int g = 0; g < 4; g++) {
            u[g][0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
            u[g][1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
            u[g][2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
            u[g][3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
        }
        /* line 4L + j: lane L of u[0][j], u[1][j], u[2][j], u[3][j] */
        uint16_t *o = b + c * 512;
        for (int j = 0; j < 4; j++) {
            const __m512i lo01 = _mm512_shuffle_i32x4(u[0][j], u[1][j], 0x44);
            const __m512i hi01 = _mm512_shuffle_i32x4(u[0][j], u[1][j], 0xee);
            const __m512i lo23 = _mm512_shuffle_i32x4(u[2][j], u[3][j], 0x44);
            const __m512i hi23 = _mm512_shuffle_i32x4(u[2][j], u[3][j], 0xee);
            _mm512_storeu_si512(o + 32 * (0 + j), _mm512_shuffle_i32x4(lo01, lo23, 0x88));
            _mm512_storeu_si512(o + 32 * (4 + j), _mm512_shuffle_i32x4(lo01, lo23, 0xdd));
            _mm512_storeu_si512(o + 32 * (8 + j), _mm512_shuffle_i32x4(hi01, hi23, 0x88));
            _mm512_storeu_si512(o + 32 * (12 + j), _mm512_shuffle_i32x4(hi01, hi23, 0xdd));
        }
    }
}

/* Rows [m0, m1) of out against panel p (nr = its valid rows), from the B tiles bt of the panel
 * and the parts xs of x (M rows, kp values each). */
static inline XB_AI XA_T void xb_rows_f(const int HW, const uint16_t *xs, size_t M, size_t kp,
                                        size_t m0, size_t m1, const uint16_t *bt, float *out,
                                        size_t ldo, size_t nr, int accum)
{
    float c[16][16] __attribute__((aligned(64)));
    for (size_t m = m0; m < m1; m += 16) {
        const size_t rows = m1 - m < 16 ? m1 - m : 16;
        xa_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        cfg.rows[0] = (uint8_t)rows;
        cfg.colsb[0] = 64;
        cfg.rows[1] = (uint8_t)rows;
        cfg.colsb[1] = 64;
        cfg.rows[2] = 16;
        cfg.colsb[2] = 64;
        XA_CONFIG(HW, &cfg);
        XA_ZERO(HW, 0);
        for (size_t ch = 0; ch < kp / 32; ch++) {
            XA_LOAD(HW, 2, bt + ch * 512, 64);
            XA_LOAD(HW, 1, xs + m * kp + 32 * ch, 2 * kp);
            XA_DPBF16PS(HW, 0, 1, 2);
            XA_LOAD(HW, 1, xs + (M + m) * kp + 32 * ch, 2 * kp);
            XA_DPBF16PS(HW, 0, 1, 2);
        }
        XA_STORE(HW, 0, c, 64);
        for (size_t i = 0; i < rows; i++) {
            float *o = out + (m + i) * ldo;
            for (size_t j = 0; j < nr; j++)
                o[j] = accum ? o[j] + c[i][j] : c[i][j];
        }
    }
    XA_RELEASE(HW);
}

static XA_T void xb_rows_amx(const uint16_t *xs, size_t M, size_t kp, size_t m0, size_t m1,
                             const uint16_t *bt, float *out, size_t ldo, size_t nr, int accum)
{
    xb_rows_f(1, xs, M, kp, m0, m1, bt, out, ldo, nr, accum);
}

static XA_T void xb_rows_emulated(const uint16_t *xs, size_t M, size_t kp, size_t m0, size_t m1,
                                  const uint16_t *bt, float *out, size_t ldo, size_t nr,
                                  int accum)
{
    xb_rows_f(0, xs, M, kp, m0, m1, bt, out, ldo, nr, accum);
}

/* Work items of the tile kernel the emulation computed in this process (tests: the tile path
 * ran). */
static size_t xb_emulated_items;

static size_t xb_emulated_count(void)
{
    return __atomic_load_n(&xb_emulated_items, __ATOMIC_RELAXED);
}

/* One work item: rows [m0, m1) of x against panel p of w [N, K]; bt: this thread's buffer of
 * kp / 32 KiB for the panel's tiles. hw: 1 the AMX unit, 0 the model. */
static void xb_item(int hw, const uint16_t *xs, size_t M, size_t kp, size_t m0, size_t m1,
                    const uint16_t *w, size_t N, size_t K, size_t p, uint16_t *bt, float *out,
                    int accum)
{
    const size_t nr = N - 16 * p < 16 ? N - 16 * p : 16;
    xb_panel_tiles(w, N, K, kp, p, bt);
    if (hw) {
        xb_rows_amx(xs, M, kp, m0, m1, bt, out + 16 * p, N, nr, accum);
    } else {
        xb_rows_emulated(xs, M, kp, m0, m1, bt, out + 16 * p, N, nr, accum);
        __atomic_fetch_add(&xb_emulated_items, 1, __ATOMIC_RELAXED);
    }
}

#endif /* XLLM_GEMM_AMX_BF16_H */
