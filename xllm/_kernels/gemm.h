/* Matrix-multiply and embedding kernels for xllm (included by matmul.pyx).
 *
 * out[M, N] = x[M, K] @ w[N, K].T, w in float32, float16 or bfloat16 (stored as uint16).
 *
 * The translation unit is compiled with -mavx2 -mfma -mf16c, so the AVX2 path needs no
 * attribute. The AVX-512 path lives in functions with a target attribute and is only called
 * when the CPU has AVX-512F/BW/VL/DQ (checked by matmul.pyx), so one build runs anywhere.
 *
 * Batch invariance. Every output element is one dot product of a row of x with a row of w,
 * and every kernel shape below computes it in exactly the same order:
 *   1. one vector accumulator of V lanes (V = 8 for AVX2, 16 for AVX-512), zero-initialised;
 *   2. for each chunk of V consecutive k, in increasing k: acc = fma(x_chunk, w_chunk, acc);
 *      the last, partial chunk is loaded with a mask, so missing lanes contribute exactly
 *      fma(0, 0, acc) = acc (K blocking in the prefill path splits this loop at multiples of
 *      V and parks acc in memory in between, which changes nothing);
 *   3. a fixed horizontal reduction (hsum256 / hsum512);
 *   4. out = s, or out = out + s when accumulating.
 * Converting fp16/bf16 to fp32 is exact, so converting a panel of w to fp32 first (prefill)
 * or converting in registers (decode) gives the same bits. Hence the value of out[m, n] does
 * not depend on M, on m, on how tiles are grouped, or on the thread count - only on the ISA.
 */
#ifndef XLLM_GEMM_H
#define XLLM_GEMM_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "vecmath.h"

/* Weight types. XW_F32C is float32 already in cache (a converted prefill panel): the same
 * loads as XW_F32, minus the software prefetches meant for weights streaming from memory. */
enum { XW_F32 = 0, XW_F16 = 1, XW_BF16 = 2, XW_F32C = 3 };

#define XLLM_AI __attribute__((always_inline))
#define XLLM_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

/* Register tile (rows of x by rows of w) of the main micro-kernel of each path, in the
 * dot-product form (one accumulator per output element, so the summation order is fixed).
 * AVX2 has 16 ymm registers: 4x3 accumulators + 3 w vectors, x from a memory operand.
 * AVX-512 has 32 zmm registers: 8x3 accumulators + 3 w vectors + 1 x vector. Per 16 lanes of
 * k it loads 3 w vectors (the operand streamed from L2) and 8 x vectors (kept in L1 by the K
 * blocking) for 24 FMAs. Decoding (at most 4 rows of x, w streamed from memory), AVX-512 tiles
 * are up to 4x6 instead: 6 rows of w in flight per core read memory faster than 3. */
#define XLLM_MR2 4
#define XLLM_NR2 3
#define XLLM_MR5 8
#define XLLM_NR5 3
#define XLLM_NR5_DECODE 6
/* Software prefetch distance along each row of w, in bytes: helps a single core keep enough
 * loads in flight when w streams from memory (decode); prefetches never fault. */
#ifndef XLLM_PF
#define XLLM_PF 1024
#endif
/* Prefetch row p of w XLLM_PF bytes ahead of the current k (uses k and es of the caller). */
#define XLLM_PREFETCH(p) _mm_prefetch((p) + k * es + XLLM_PF, _MM_HINT_T0)

/* K block of the prefill path (a multiple of 16): 8 rows of x x 512 floats = 16 KiB of L1. */
#define XLLM_KC 512

/* Within a panel, the prefill path walks sub-panels of XLLM_SUB_TILES register tiles through
 * all K blocks, so their parked accumulators (XLLM_ACCBUF_FLOATS floats per thread, at most
 * 8 tiles x 8 rows x 4 columns x 16 lanes = 16 KiB) stay in L1 next to the x tile. */
#define XLLM_SUB_TILES 8
#define XLLM_ACCBUF_FLOATS (XLLM_SUB_TILES * 8 * 4 * 16)

/* XLLM_PIN<P>(v) keeps the x vector v in a register. Without it, GCC folds each x load into
 * every FMA that uses it (NR loads instead of one), and the AVX-512 loop becomes load-port
 * bound. (The AVX2 tile has no register to spare, and 256-bit loads are cheaper, so it lets
 * GCC fold them.) */
#define XLLM_PIN512(v) __asm__("" : "+v"(v))
#define XLLM_PIN256(v) ((void)0)

static const float xllm_zeros[8 * 4 * 16] __attribute__((aligned(64))) = {0};

static inline size_t xllm_wsize(int wt) { return wt == XW_F16 || wt == XW_BF16 ? 2 : 4; }

/* ------------------------------------------------------------------------------------------ */
/* Loads and reductions; the number in a name is the register width (256: AVX2, 512: AVX-512) */
/* ------------------------------------------------------------------------------------------ */

/* xllm_hsum256 (the AVX2 reduction) and xllm_tail_mask: vecmath.h. */

static inline XLLM_AI XLLM_T512 float xllm_hsum512(__m512 v)
{
    return xllm_hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)));
}

/* 8 weights at p (bytes) as float32. */
static inline XLLM_AI __m256 xllm_ld256(int wt, const char *p)
{
    if (wt == XW_F32 || wt == XW_F32C)
        return _mm256_loadu_ps((const float *)p);
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (wt == XW_F16)
        return _mm256_cvtph_ps(h);
    /* bf16 is the high half of a float32: zero-extend to 32 bits and shift up. */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The first n (< 8) weights at p, zeros in the other lanes; never reads past element n. */
static inline XLLM_AI __m256 xllm_ld256_tail(int wt, const char *p, size_t n)
{
    if (wt == XW_F32 || wt == XW_F32C)
        return _mm256_maskload_ps((const float *)p, xllm_tail_mask(n));
    uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    memcpy(buf, p, n * 2);
    return xllm_ld256(wt, (const char *)buf);
}

static inline XLLM_AI XLLM_T512 __m512 xllm_cvt512(int wt, __m256i h)
{
    if (wt == XW_F16)
        return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline XLLM_AI XLLM_T512 __m512 xllm_ld512(int wt, const char *p)
{
    if (wt == XW_F32 || wt == XW_F32C)
        return _mm512_loadu_ps((const float *)p);
    return xllm_cvt512(wt, _mm256_loadu_si256((const __m256i *)p));
}

/* n < 16. Masked loads do not touch (or fault on) the masked-out elements. */
static inline XLLM_AI XLLM_T512 __m512 xllm_ld512_tail(int wt, const char *p, size_t n)
{
    __mmask16 m = (__mmask16)((1u << n) - 1u);
    if (wt == XW_F32 || wt == XW_F32C)
        return _mm512_maskz_loadu_ps(m, p);
    return xllm_cvt512(wt, _mm256_maskz_loadu_epi16(m, p));
}

/* Row of n weights -> float32. The conversion is exact, so both paths use this one. */
static void xllm_cvt_row(int wt, const char *src, float *dst, size_t n)
{
    size_t k = 0;
    if (wt == XW_F32) {
        memcpy(dst, src, n * 4);
        return;
    }
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(dst + k, xllm_ld256(wt, src + 2 * k));
    if (k < n)
        _mm256_maskstore_ps(dst + k, xllm_tail_mask(n - k),
                            xllm_ld256_tail(wt, src + 2 * k, n - k));
}

/* ------------------------------------------------------------------------------------------ */
/* Micro-kernel: one register tile, written once for both widths                               */
/* ------------------------------------------------------------------------------------------ */

/* Flags of a micro-kernel call that covers k0 <= k < k1 of the dot products (K blocking). */
#define XLLM_FIRST 1 /* k0 == 0: start from zero accumulators, else reload them from buf */
#define XLLM_LAST 2  /* k1 == K: reduce and write out, else save the accumulators to buf */

/* The micro-kernel keeps one named accumulator per (row of x, row of w) pair, c<i><j> with
 * i < 8 and j < 6, and the current chunk of row j of w in w<j>, generated by these X-macros
 * (F(i, j, A) for each j, F(i, P, A) for each i, F(i, j, P) for each pair); the ones outside
 * the MR x NR tile are dead code. (With arrays of vectors, GCC spills the accumulators to the
 * stack around the loops.) */
#define XLLM_COLS(F, i, A) F(i, 0, A) F(i, 1, A) F(i, 2, A) F(i, 3, A) F(i, 4, A) F(i, 5, A)
#define XLLM_ROWS(F, P, A)                                                                \
    F(0, P, A) F(1, P, A) F(2, P, A) F(3, P, A) F(4, P, A) F(5, P, A) F(6, P, A) F(7, P, A)
#define XLLM_GRID(F, P)                                                                   \
    XLLM_COLS(F, 0, P) XLLM_COLS(F, 1, P) XLLM_COLS(F, 2, P) XLLM_COLS(F, 3, P)           \
    XLLM_COLS(F, 4, P) XLLM_COLS(F, 5, P) XLLM_COLS(F, 6, P) XLLM_COLS(F, 7, P)

/* The pieces of the micro-kernel, for P-bit registers; they use its variables. */
#define XLLM_DECL(i, j, P)                                                                \
    __m##P c##i##j = i < MR && j < NR ? _mm##P##_loadu_ps(src + (i * NR + j) * V)         \
                                      : _mm##P##_setzero_ps();
/* Row j of the tile: rows past NR alias row 0 and are never loaded. (Computed once: with the
 * address computed in the loop, GCC spends more instructions on the prefetches.) */
#define XLLM_WROW(_, j, P) const char *w##j##p = w + (j < NR ? j : 0) * ldw;
/* LD(P, wt, p) loads the chunk at p: a whole one (V elements), or the last, partial one. */
#define XLLM_FULL(P, wt, p) xllm_ld##P(wt, p)
#define XLLM_TAIL(P, wt, p) xllm_ld##P##_tail(wt, p, k1 - k)
#define XLLM_LDW(LD, j, P)                                                                \
    __m##P w##j = j < NR ? LD(P, wt, w##j##p + k * es) : _mm##P##_setzero_ps();
/* Weights streaming from memory (not a converted panel): prefetch each row of the tile. */
#define XLLM_PFW(_, j, P)                                                                 \
    if (j < NR && wt != XW_F32C)                                                          \
        XLLM_PREFETCH(w##j##p);
#define XLLM_ROW(i, P, LD)                                                                \
    if (i < MR) {                                                                         \
        __m##P xv = LD(P, XW_F32, (const char *)(x + i * ldx + (k - k0)));                \
        XLLM_PIN##P(xv);                                                                  \
        XLLM_COLS(XLLM_FMA, i, P)                                                         \
    }
#define XLLM_FMA(i, j, P)                                                                 \
    if (j < NR)                                                                           \
        c##i##j = _mm##P##_fmadd_ps(xv, w##j, c##i##j);
/* out[i][j] = s, or out[i][j] + s when accumulating. */
#define XLLM_PUT(i, j, s)                                                                 \
    do {                                                                                  \
        float *o_ = out + (i) * ldo + (j);                                                \
        float s_ = (s);                                                                   \
        *o_ = accum ? *o_ + s_ : s_;                                                      \
    } while (0)
#define XLLM_FIN(i, j, P)                                                                 \
    if (i < MR && j < NR) {                                                               \
        if (flags & XLLM_LAST)                                                            \
            XLLM_PUT(i, j, xllm_hsum##P(c##i##j));                                        \
        else                                                                              \
            _mm##P##_storeu_ps(buf + (i * NR + j) * V, c##i##j);                          \
    }

/* MR rows of x times NR rows of w (stride ldw bytes, starting at k = 0), over k0 <= k < k1,
 * in P-bit registers of V lanes; x points at element k0 of its first row, rows ldx floats
 * apart. Inlined with constant MR, NR, wt: MR <= 4 and NR <= 3 (AVX2), MR <= 8 and NR <= 3
 * or, decoding, MR <= 4 and NR <= 6 (AVX-512). k0 is a multiple of V, so chunk boundaries (and
 * the summation order) never depend on the K blocking; parking accumulators in buf between
 * blocks is exact. flags: XLLM_FIRST starts from zero, else from buf; XLLM_LAST reduces and
 * writes out, else parks the accumulators in buf. */
#define XLLM_MK_BODY(P)                                                                   \
    /* loading zeros (no branch) on the first K block keeps accumulators in registers */  \
    const float *src = (flags & XLLM_FIRST) ? xllm_zeros : buf;                           \
    const size_t V = P / 32, es = xllm_wsize(wt);                                         \
    XLLM_GRID(XLLM_DECL, P)                                                               \
    XLLM_COLS(XLLM_WROW, _, P)                                                            \
    size_t k = k0;                                                                        \
    for (; k + V <= k1; k += V) {                                                         \
        XLLM_COLS(XLLM_LDW, XLLM_FULL, P)                                                 \
        XLLM_COLS(XLLM_PFW, _, P)                                                         \
        XLLM_ROWS(XLLM_ROW, P, XLLM_FULL)                                                 \
    }                                                                                     \
    if (k < k1) { /* the last, partial chunk of the row: zeros in the missing lanes */    \
        XLLM_COLS(XLLM_LDW, XLLM_TAIL, P)                                                 \
        XLLM_ROWS(XLLM_ROW, P, XLLM_TAIL)                                                 \
    }                                                                                     \
    XLLM_GRID(XLLM_FIN, P)

#define XLLM_MK_PARAMS                                                                    \
    const float *x, size_t ldx, const char *w, size_t ldw, size_t k0, size_t k1,          \
        float *buf, int flags, float *out, size_t ldo, int accum
#define XLLM_MK_ARGS x, ldx, w, ldw, k0, k1, buf, flags, out, ldo, accum

static inline XLLM_AI void xllm_mk256(const int MR, const int NR, const int wt, XLLM_MK_PARAMS)
{
    XLLM_MK_BODY(256)
}

static inline XLLM_AI XLLM_T512 void xllm_mk512(const int MR, const int NR, const int wt,
                                                XLLM_MK_PARAMS)
{
    XLLM_MK_BODY(512)
}

/* A tile of mr rows of x by nr rows of w: the micro-kernel inlined with constant wt, mr, nr.
 * Case labels 0xMN: mr = M, nr = N. */
#define XLLM_CASES3(MK, WT, M)                                                            \
    case 0x##M##1: MK(M, 1, WT, XLLM_MK_ARGS); break;                                     \
    case 0x##M##2: MK(M, 2, WT, XLLM_MK_ARGS); break;                                     \
    case 0x##M##3: MK(M, 3, WT, XLLM_MK_ARGS); break;
#define XLLM_CASES6(MK, WT, M)                                                            \
    XLLM_CASES3(MK, WT, M)                                                                \
    case 0x##M##4: MK(M, 4, WT, XLLM_MK_ARGS); break;                                     \
    case 0x##M##5: MK(M, 5, WT, XLLM_MK_ARGS); break;                                     \
    case 0x##M##6: MK(M, 6, WT, XLLM_MK_ARGS); break;
/* AVX2 tiles: up to 4 x 3. */
#define XLLM_TILE256_CASES(WT)                                                            \
    switch (mr * 16 + nr) {                                                               \
        XLLM_CASES3(xllm_mk256, WT, 1) XLLM_CASES3(xllm_mk256, WT, 2)                     \
        XLLM_CASES3(xllm_mk256, WT, 3) XLLM_CASES3(xllm_mk256, WT, 4)                     \
    }
/* AVX-512 tiles: up to 8 x 3, and up to 4 x 6 for decode. */
#define XLLM_TILE512_CASES(WT)                                                            \
    switch (mr * 16 + nr) {                                                               \
        XLLM_CASES6(xllm_mk512, WT, 1) XLLM_CASES6(xllm_mk512, WT, 2)                     \
        XLLM_CASES6(xllm_mk512, WT, 3) XLLM_CASES6(xllm_mk512, WT, 4)                     \
        XLLM_CASES3(xllm_mk512, WT, 5) XLLM_CASES3(xllm_mk512, WT, 6)                     \
        XLLM_CASES3(xllm_mk512, WT, 7) XLLM_CASES3(xllm_mk512, WT, 8)                     \
    }
/* One function per path and weight type: merged into one function, the tiles lose registers
 * (GCC then spills the addresses of the rows of x in the 8 x 3 loop). */
#define XLLM_TILE_PARAMS int mr, int nr, XLLM_MK_PARAMS
static void xllm_tile256_f32(XLLM_TILE_PARAMS) { XLLM_TILE256_CASES(XW_F32) }
static void xllm_tile256_f16(XLLM_TILE_PARAMS) { XLLM_TILE256_CASES(XW_F16) }
static void xllm_tile256_bf16(XLLM_TILE_PARAMS) { XLLM_TILE256_CASES(XW_BF16) }
static void xllm_tile256_f32c(XLLM_TILE_PARAMS) { XLLM_TILE256_CASES(XW_F32C) }
static XLLM_T512 void xllm_tile512_f32(XLLM_TILE_PARAMS) { XLLM_TILE512_CASES(XW_F32) }
static XLLM_T512 void xllm_tile512_f16(XLLM_TILE_PARAMS) { XLLM_TILE512_CASES(XW_F16) }
static XLLM_T512 void xllm_tile512_bf16(XLLM_TILE_PARAMS) { XLLM_TILE512_CASES(XW_BF16) }
static XLLM_T512 void xllm_tile512_f32c(XLLM_TILE_PARAMS) { XLLM_TILE512_CASES(XW_F32C) }

/* ------------------------------------------------------------------------------------------ */
/* Panels: rows n0..n1 of w against all M rows of x                                             */
/* ------------------------------------------------------------------------------------------ */

typedef void (*xllm_tile_fn)(XLLM_TILE_PARAMS);
/* By path and weight type (the enum order). */
static const xllm_tile_fn xllm_tiles[2][4] = {
    {xllm_tile256_f32, xllm_tile256_f16, xllm_tile256_bf16, xllm_tile256_f32c},
    {xllm_tile512_f32, xllm_tile512_f16, xllm_tile512_bf16, xllm_tile512_f32c}};

/* Row-tile height of the given path. */
static inline size_t xllm_mr(int isa) { return isa ? XLLM_MR5 : XLLM_MR2; }

/* Packed x for the prefill path: for each group g of MR rows and each K block [k0, k1), the
 * rows g*MR .. g*MR+mr-1, elements k0 .. k1-1, stored contiguously (row stride k1 - k0) at
 * xpk + g*MR*K + MR*k0. Rows of x are usually a multiple of 4 KiB apart, so unpacked they
 * would all fall in the same L1 sets and evict each other; packed, a tile is one contiguous
 * block that stays in L1 while a whole panel of w streams past it. */
static void xllm_pack_x(int isa, const float *x, size_t ldx, size_t M, size_t K, size_t kc,
                        size_t g, float *xpk)
{
    const size_t MR = xllm_mr(isa), m0 = g * MR;
    const size_t mr = M - m0 < MR ? M - m0 : MR;
    for (size_t k0 = 0; k0 < K; k0 += kc) {
        size_t len = K - k0 < kc ? K - k0 : kc;
        float *dst = xpk + g * MR * K + MR * k0;
        for (size_t i = 0; i < mr; i++)
            memcpy(dst + i * len, x + (m0 + i) * ldx + k0, len * sizeof(float));
    }
}

/* One panel of w (rows n0 <= n < n1) against all M rows of x.
 *
 * isa: 0 = AVX2, 1 = AVX-512. ldw: row stride of w in elements.
 * Decode (xpk == NULL): x is used in place, no K blocking, and a 16-bit w is converted in
 *   registers as it streams by (each row of w is read once; nothing to reuse).
 * Prefill (xpk = x packed by xllm_pack_x with block kc, a multiple of 16): the panel is first
 *   converted to float32 in scratch (row stride ldk floats) and reused by every row of x (for
 *   float32 w too: the padded stride keeps the rows out of each other's L1 sets);
 *   the K blocks of each row tile stay in L1 while the panel streams from L2, and the
 *   accumulators of a sub-panel's tiles wait in accbuf (XLLM_ACCBUF_FLOATS floats) between
 *   K blocks. */
static void xllm_gemm_panel(int isa, const float *x, size_t ldx, const float *xpk, size_t M,
                            size_t K, const void *w, int wt, size_t ldw, size_t n0, size_t n1,
                            float *out, size_t ldo, int accum, float *scratch, size_t ldk,
                            float *accbuf, size_t kc)
{
    const char *wp = (const char *)w + n0 * ldw * xllm_wsize(wt);
    size_t ldwb = ldw * xllm_wsize(wt);
    if (xpk != NULL) {
        for (size_t n = n0; n < n1; n++)
            xllm_cvt_row(wt, wp + (n - n0) * ldwb, scratch + (n - n0) * ldk, K);
        wp = (const char *)scratch;
        ldwb = ldk * 4;
        wt = XW_F32C;
    }
    const xllm_tile_fn tile = xllm_tiles[isa][wt];
    const size_t MR = xllm_mr(isa), V = isa ? 16 : 8;
    /* AVX-512 decode with few rows: 6 rows of w at a time, more loads in flight per core. */
    const size_t NR = !isa ? XLLM_NR2 : xpk == NULL && M <= 4 ? XLLM_NR5_DECODE : XLLM_NR5;
    if (xpk == NULL || kc >= K)
        kc = K;
    const size_t sub = xpk ? XLLM_SUB_TILES * NR : n1 - n0;
    for (size_t m = 0; m < M; m += MR) {
        int mr = (int)(M - m < MR ? M - m : MR);
        for (size_t ns = n0; ns < n1; ns += sub) {
            size_t ne = n1 - ns < sub ? n1 : ns + sub;
            /* K == 0 still makes one pass, writing zeros (or leaving out unchanged). */
            for (size_t k0 = 0;; k0 += kc) {
                size_t k1 = K - k0 <= kc ? K : k0 + kc;
                int flags = (k0 == 0 ? XLLM_FIRST : 0) | (k1 == K ? XLLM_LAST : 0);
                const float *xt = xpk ? xpk + m * K + MR * k0 : x + m * ldx;
                size_t ldxt = xpk ? k1 - k0 : ldx;
                float *buf = accbuf;
                for (size_t n = ns; n < ne; n += NR) {
                    int nr = (int)(ne - n < NR ? ne - n : NR);
                    tile(mr, nr, xt, ldxt, wp + (n - n0) * ldwb, ldwb, k0, k1, buf, flags,
                         out + m * ldo + n, ldo, accum);
                    if (buf)
                        buf += MR * NR * V;
                }
                if (k1 == K)
                    break;
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Embedding: out[i] = float32(table[ids[i]]); ids already range-checked by the caller.         */
/* ------------------------------------------------------------------------------------------ */

static void xllm_embedding(const void *table, int wt, size_t D, const int64_t *ids, size_t n,
                           float *out)
{
    const size_t rb = D * xllm_wsize(wt);
    for (size_t i = 0; i < n; i++)
        xllm_cvt_row(wt, (const char *)table + (size_t)ids[i] * rb, out + i * D, D);
}

#endif /* XLLM_GEMM_H */
