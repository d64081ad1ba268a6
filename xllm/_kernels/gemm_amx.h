/* AMX tile kernels of the quantized matrix multiply (included by qmatmul.pyx; docs/amx.rst).
 *
 * The same arithmetic as gemm_q.h and gemm_k.h, with the exact int32 dots of step 2 computed by
 * the tile unit and the float32 epilogue of step 3 run, per block and in increasing block order,
 * by the same macros as the AVX-512 VNNI micro-kernels (XQ_BLOCK_TERMS, XK_TERM,
 * XK_BLOCK_SCALES): every output element goes through the same operations as on the VNNI path,
 * so the results are bitwise those of the VNNI path (and of reference.qmatmul).
 *
 * The kernels are written once against the tile operations of tiles.h (the AMX instructions or
 * their scalar model, HW = 1 or 0) and instantiated for both; the HW = 1 instantiation runs only
 * when _cpu.features()["amx"] (CPUID, XCR0 and Linux's XTILEDATA permission, probed once per
 * process), so no other machine executes a tile instruction. A call: M rows of x (M >= 2; one
 * row stays on the vector path) against one panel of 16 rows of W. Tiles: C = [rows of x, 16
 * rows of W] int32, A = [rows of x, 32 values of one part of x] int8, B = [8 lines, 16 rows x 4
 * values] of W's codes, one 32-value block deep.
 *
 * The B tile is the panel layout of layout.py itself: a block of int8 weights is 8 lines of 64
 * bytes, line j holding values 4j..4j+3 of the 16 rows, which is the "VNNI" layout the tile dot
 * products read (tileloadd with a 64-byte stride, no copy). The unsigned codes (int8 + 128) are
 * multiplied by the signed parts of x with tdpbsud, and the offset correction is added to the
 * int32 sums afterwards (c128 etc., as the VNNI path starts from it: the sums are exact, so the
 * order does not matter). The 4-bit formats (int4, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) store two codes
 * per byte (and the bit planes of the codecs apart): each call converts its panel once into a
 * thread-local buffer of 512-byte tiles (line 4h + j: the low (h = 0) or high (h = 1) nibbles
 * of line j, plus the planes' bits), reused by every row tile of x; the repacked weights do not
 * change. The per-block scales of the panel (ws, the Q6_K second half's ws1, the minimums wm)
 * are formed there too, by the VNNI path's macros, so the epilogue only loads them (xp_prepare,
 * gemm_k.h, which the VNNI path also uses for Q6_K).
 *
 * Depth: the x of each 32-value block has its own scale dx, so the int32 sums of two blocks can
 * never be added before their float epilogue: a tile is one block (K = 32) deep, half of the
 * 64-byte maximum, whatever the format (docs/amx.rst gives what that costs).
 */
#ifndef XLLM_GEMM_AMX_H
#define XLLM_GEMM_AMX_H

#include "gemm_q.h"
#include "tiles.h"

/* The first value of the dot of part k of row xb (whose half sums are hb) with the codes: the
 * offset correction the VNNI path starts from (gemm_q.h, gemm_k.h), added here to the tile's
 * sum of the unsigned codes. */
static inline XQ_AI int32_t xa_offset(const int KIND, const int F, const xq_xb *xb,
                                      const xq_xh *hb, int k, int half)
{
    if (F)
        return F == XK_Q5_0 ? 2 * xb->c8[k] : F == XK_Q6_K ? (half ? hb->hi[k] : hb->lo[k]) : 0;
    return KIND == 0 ? xb->c128[k] : KIND == 1 ? xb->c8[k] : 0;
}

/* C tile TC = the dot of tile 0 (the codes) with the rows' part starting AOFF bytes into each
 * row's block (a part is 32 bytes: AOFF = 32 k, + 16 for values 16..31 of Q6_K's halves). One
 * statement (an `if` may guard it). */
#define XA_PART_DOT(TC, AOFF)                                                                    \
    do {                                                                                         \
        XA_ZERO(HW, TC);                                                                         \
        XA_LOAD(HW, 1, a0 + (AOFF), xstride);                                                    \
        XA_DPBSUD(HW, TC, 1, 0);                                                                 \
    } while (0);

/* One tile of MR rows of x (1 <= MR <= 16; a constant for MR = 16) against panel p, all blocks:
 * out rows [0, MR) (nr valid columns). */
static inline XQ_AI XA_T void xa_tile_rows(const int HW, const int KIND, const int F,
                                           const int PARTS, const int MR, const xq_weights *w,
                                           size_t p, const xp_block *buf, const xq_xb *x,
                                           const xq_xh *xh, float *out, size_t ldo, size_t nr,
                                           int accum)
{
    const size_t nb = w->nb;
    const size_t xstride = nb * sizeof(xq_xb); /* from a row of x to the next, same block */
    const int q6 = F == XK_Q6_K;
    /* tiles: 0 B (the codes), 1 A (a part of x), 2..4 C (the parts' sums; Q6_K: half 0), 5..7
     * (Q6_K: half 1). Q6_K's halves are separate dots of 16 values: B 4 lines, A 16 bytes. */
    xa_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = q6 ? 4 : 8;
    cfg.colsb[0] = 64;
    cfg.rows[1] = (uint8_t)MR;
    cfg.colsb[1] = q6 ? 16 : 32;
    for (int t = 2; t < (q6 ? 8 : 5); t++) {
        cfg.rows[t] = (uint8_t)MR;
        cfg.colsb[t] = 64;
    }
    XA_CONFIG(HW, &cfg);
    const __m512 inv256 = _mm512_set1_ps(1.0f / 256.0f);
    int32_t sums[2][3][16][16] __attribute__((aligned(64))); /* [half][part][row][column] */
    XQ_ZEROED_ACC(512, 16);
    for (size_t b = 0; b < nb; b++) {
        const int8_t *a0 = x[b].q[0]; /* part k of the tile's rows: a0 + 32 k, stride xstride */
        const uint8_t *codes = F || KIND ? buf[b].codes : w->qs + (p * nb + b) * 512;
/* The dots of every part with tile 0 into C tiles T0, T1, T2 (one per part), stored into the
 * sums S[k]; AOFF the first part's offset. Tile numbers are literals: GCC's AMX intrinsics
 * paste them into the instruction's text. */
#define XA_PARTS_DOTS(T0, T1, T2, AOFF, S)                                                       \
    XA_PART_DOT(T0, AOFF)                                                                        \
    if (PARTS >= 2)                                                                              \
        XA_PART_DOT(T1, AOFF + 32)                                                               \
    if (PARTS == 3)                                                                              \
        XA_PART_DOT(T2, AOFF + 64)                                                               \
    XA_STORE(HW, T0, S[0], 64);                                                                  \
    if (PARTS >= 2)                                                                              \
        XA_STORE(HW, T1, S[1], 64);                                                              \
    if (PARTS == 3)                                                                              \
        XA_STORE(HW, T2, S[2], 64);
        XA_LOAD(HW, 0, codes, 64); /* Q6_K: lines 0..3, values 0..15; else the whole block */
        XA_PARTS_DOTS(2, 3, 4, 0, sums[0])
        if (q6) {
            XA_LOAD(HW, 0, codes + 256, 64); /* lines 4..7: values 16..31 */
            XA_PARTS_DOTS(5, 6, 7, 16, sums[1])
        }
        /* step 3 for this block, by the VNNI path's own macros: d[k][i] the dots of row i */
        const xq_xb *xb[16];
        __m512i d[3][16];
        for (int i = 0; i < MR; i++)
            xb[i] = x + i * nb + b;
        const __m512 ws = _mm512_load_ps(buf[b].ws), wm = _mm512_load_ps(buf[b].wm);
        for (int half = 0; half < (q6 ? 2 : 1); half++) {
            for (int i = 0; i < MR; i++)
                for (int k = 0; k < PARTS; k++)
                    d[k][i] = _mm512_add_epi32(
                        _mm512_load_si512(sums[half][k][i]),
                        _mm512_set1_epi32(xa_offset(KIND, F, xb[i], xh + i * nb + b, k, half)));
            if (!F) {
                XQ_BLOCK_TERMS(512, KIND == 2)
            } else if (half == 0) {
                XK_TERM(512, d, ws)
            } else {
                const __m512 ws1 = _mm512_load_ps(buf[b].ws1);
                XK_TERM(512, d, ws1)
            }
        }
        if (F && XK_ASYM(F))
            for (int i = 0; i < MR; i++)
                acc[i] = _mm512_fmadd_ps(wm, _mm512_set1_ps(xb[i]->ds), acc[i]);
    }
    XQ_STORE_ACC512
}

/* All M rows of x against panel p: tiles of 16 rows, then one of the rest. 0 if done, -1 if the
 * buffer could not be allocated (nothing written: the caller runs the vector path). */
static inline XQ_AI XA_T int xa_panel_f(const int HW, const int KIND, const int F,
                                        const int PARTS, const xq_weights *w, size_t p,
                                        const xq_xb *x, const xq_xh *xh, size_t M, float *out,
                                        size_t ldo, size_t nr, int accum)
{
    xp_block *buf = xp_blocks(w->nb);
    if (buf == NULL)
        return -1;
    xp_prepare(KIND, F, w, p, buf);
    size_t m = 0;
    for (; m + 16 <= M; m += 16)
        xa_tile_rows(HW, KIND, F, PARTS, 16, w, p, buf, x + m * w->nb, xh + m * w->nb,
                     out + m * ldo, ldo, nr, accum);
    if (m < M)
        xa_tile_rows(HW, KIND, F, PARTS, (int)(M - m), w, p, buf, x + m * w->nb, xh + m * w->nb,
                     out + m * ldo, ldo, nr, accum);
    XA_RELEASE(HW);
    return 0;
}

/* The format dispatch of one instantiation (HW constant). */
#define XA_FORMATS(HW)                                                                           \
    {                                                                                            \
        switch (w->fmt) {                                                                        \
        case 0: {                                                                                \
            const int kind = w->bits == 8 ? 0 : !w->mins ? 1 : 2;                                \
            if (kind == 0) return XA_BY_PARTS(HW, 0, 0);                                         \
            if (kind == 1) return XA_BY_PARTS(HW, 1, 0);                                         \
            return XA_BY_PARTS(HW, 2, 0);                                                        \
        }                                                                                        \
        case XK_Q5_0: return XA_BY_PARTS(HW, 0, XK_Q5_0);                                        \
        case XK_Q5_1: return XA_BY_PARTS(HW, 0, XK_Q5_1);                                        \
        case XK_Q4_K: return XA_BY_PARTS(HW, 0, XK_Q4_K);                                        \
        case XK_Q5_K: return XA_BY_PARTS(HW, 0, XK_Q5_K);                                        \
        case XK_Q6_K: return XA_BY_PARTS(HW, 0, XK_Q6_K);                                        \
        default: return -1;                                                                      \
        }                                                                                        \
    }
#define XA_BY_PARTS(HW, KIND, F)                                                                 \
    (w->parts == 1   ? XA_PANEL(HW, KIND, F, 1)                                                  \
     : w->parts == 2 ? XA_PANEL(HW, KIND, F, 2)                                                  \
                     : XA_PANEL(HW, KIND, F, 3))
#define XA_PANEL(HW, KIND, F, PARTS)                                                             \
    xa_panel_f(HW, KIND, F, PARTS, w, p, x, xh, M, out, ldo, nr, accum)

/* Panel p on the AMX unit (run only where _cpu.features()["amx"]). */
static XA_T int xa_panel_amx(const xq_weights *w, size_t p, const xq_xb *x, const xq_xh *xh,
                             size_t M, float *out, size_t ldo, size_t nr, int accum)
XA_FORMATS(1)

/* Panel p on the scalar model of the tiles (any CPU with AVX-512 VNNI). */
static XA_T int xa_panel_emulated(const xq_weights *w, size_t p, const xq_xb *x,
                                  const xq_xh *xh, size_t M, float *out, size_t ldo, size_t nr,
                                  int accum)
XA_FORMATS(0)

/* Panels the emulated tile kernels computed in this process: the tests' proof that the tile
 * path ran (rather than the VNNI path it falls back to). */
static size_t xa_emulated_panels;

static size_t xa_emulated_count(void)
{
    return __atomic_load_n(&xa_emulated_panels, __ATOMIC_RELAXED);
}

/* Panels [p0, p1) of out on the tile kernels (M >= 2; isa 2 the model, 3 the AMX unit). */
static __attribute__((noinline)) void xa_tile_panels(int isa, const xq_weights *w, size_t p0,
                                                     size_t p1, const xq_xb *x, const xq_xh *xh,
                                                     size_t M, size_t N, float *out, int accum)
{
    for (size_t p = p0; p < p1; p++) {
        const size_t nr = N - 16 * p < 16 ? N - 16 * p : 16;
        float *o = out + 16 * p;
        const int done = isa == 3 ? xa_panel_amx(w, p, x, xh, M, o, N, nr, accum)
                                  : xa_panel_emulated(w, p, x, xh, M, o, N, nr, accum);
        if (done != 0)
            xq_panels(1, w, p, p + 1, x, xh, M, N, out, accum);
        else if (isa == 2)
            __atomic_fetch_add(&xa_emulated_panels, 1, __ATOMIC_RELAXED);
    }
}

/* The entry of qmatmul.pyx, in place of xq_panels (same arguments): isa 0 AVX2, 1 AVX-512
 * VNNI, 2 the tile kernels on the model ("amx-emulated"), 3 on the AMX unit ("amx"). The tile
 * kernels take M >= 2 rows; one row (memory-bound: the tiles would idle) takes the VNNI path,
 * with the same bits. Inlined: the vector paths cost one comparison more than before. */
static inline void xa_panels(int isa, const xq_weights *w, size_t p0, size_t p1,
                             const xq_xb *x, const xq_xh *xh, size_t M, size_t N, float *out,
                             int accum)
{
    if (isa >= 2 && M >= 2)
        xa_tile_panels(isa, w, p0, p1, x, xh, M, N, out, accum);
    else
        xq_panels(isa ? 1 : 0, w, p0, p1, x, xh, M, N, out, accum);
}

#endif /* XLLM_GEMM_AMX_H */
