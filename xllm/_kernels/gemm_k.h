/* The codecs of the quantized matrix multiply (included by gemm_q.h): GGUF Q5_0, Q5_1, Q4_K,
 * Q5_K and Q6_K run from their own blocks, repacked at load at the same size
 * (xllm/_kernels/layout.py, "codecs"). x is quantized per 32-value block as for the other formats
 * (gemm_q.h, step 1); the weight codes are 4, 5 or 6-bit unsigned integers c:
 *
 *   qs    the low 4 bits of c, in the int4 panel layout of gemm_q.h (one 64-byte line per 4
 *         values of the 16 rows, low nibbles values 0..15 of the block, high nibbles 16..31);
 *   high  1 (5-bit) or 2 (6-bit) bit planes per block and panel: plane e holds bit 4 + e of the
 *         codes of the 8 lines (4 of low nibbles, then 4 of high nibbles) as one 64-bit mask per
 *         line, bit i for byte i of the line: 64 bytes per plane;
 *   per 32-value block b of a row, a scale ws (float32) and, for the asymmetric codecs, a minimum
 *   wm (float32), formed exactly (the products below fit in float32's 24 bits):
 *     Q5_0  ws = d (float16 per block), W = ws * (c - 16);
 *     Q5_1  ws = d, wm = m (float16 per block), W = ws * c + wm;
 *     Q4_K, Q5_K  super-blocks of 256 values (8 blocks) with float16 D and DMIN and, per block j,
 *           6-bit sc_j and m_j packed in 12 bytes as in GGUF: ws = D * sc_j,
 *           wm = -(DMIN * m_j), W = ws * c + wm;
 *     Q6_K  super-blocks of 256 values with float16 D and one int8 scale s per 16 values: a block
 *           has two halves (values 0..15, 16..31) with ws_h = D * s_{2j+h}, W = ws_h * (c - 32).
 *
 * Arithmetic (reference.py qmatmul does exactly the same), per block and row of x:
 *   2. exact int32 dots of each part of x with the codes minus their offset, over the block
 *      (Q6_K: over each half): c12 = 256 * (q1 . c') + (q2 . c'), c3 = q3 . c'. The dots with
 *      unsigned codes start from -16 sum(q) (Q5_0) or -32 sum(q over the half) (Q6_K; xq_xh);
 *   3. in increasing block order, float32, dx' = dx / 256:
 *      v = (float)c12 + (float)c3 / 256 (one FMA, exact product); acc = fma(ws * dx', v, acc);
 *      Q6_K: the half 0 term, then the half 1 term, each so;
 *      asymmetric: then acc = fma(wm, dx' * S, acc) (S as in gemm_q.h);
 *   4. out = acc, or out = out + acc.
 * Every output element goes through the same operations whatever M, its row, the thread count or
 * the ISA path: results are bitwise batch-invariant.
 */
#ifndef XLLM_GEMM_K_H
#define XLLM_GEMM_K_H

enum { XK_Q5_0 = 1, XK_Q5_1 = 2, XK_Q4_K = 3, XK_Q5_K = 4, XK_Q6_K = 5 };

/* Software prefetch when one tile of rows streams a panel (M <= 6): the low nibbles and bit
 * planes XK_PF bytes of qs ahead (into L1) and again XK_PF2 bytes ahead (into L2), the small
 * streams (scales, mins, sub-block scales) about XK_PFS blocks ahead. One row of
 * Q4_K, Q6_K or Q5_0 streamed 12-19% faster so than with the first prefetch alone. */
#ifndef XK_PF
#define XK_PF 1024
#endif
#ifndef XK_PF_HINT
#define XK_PF_HINT _MM_HINT_T0
#endif
#ifndef XK_PF2
#define XK_PF2 8192
#endif
#ifndef XK_PF2_HINT
#define XK_PF2_HINT _MM_HINT_T1
#endif
#ifndef XK_PFS
#define XK_PFS 32
#endif

/* From this many rows of x, the AVX-512 path rebuilds a Q6_K panel's codes and scales once into
 * a per-thread buffer (xp_prepare) that every row tile then reads (xk_mk512p), instead of once
 * per tile of 6 rows from the nibbles and two bit planes. One thread, 2048 x 2048, GOP/s with
 * one activation part (two): M = 512 167-179 -> 180-234 (122-125 -> 149-153), M = 12 108-145
 * -> 180-186; M = 7 (two tiles) 181 -> 133-145, hence 12. The other codecs rebuild a line in
 * one or two operations more than a load: for them the buffer, twice the bytes of their
 * nibbles, was slower (Q4_K at M = 18: 290 -> 213) or the same (M = 512), and is not used. */
#ifndef XK_PREP_M
#define XK_PREP_M 12
#endif

/* Properties of codec F (compile-time constants in the micro-kernels). */
#define XK_PLANES(F) ((F) == XK_Q6_K ? 2 : (F) == XK_Q4_K ? 0 : 1)
#define XK_ASYM(F) ((F) == XK_Q5_1 || (F) == XK_Q4_K || (F) == XK_Q5_K)
#define XK_SUPER(F) ((F) >= XK_Q4_K) /* super-blocks of 256 values */
#define XK_SUB_BYTES(F) ((F) == XK_Q6_K ? 256 : 192) /* sub-scales per super-block and panel */

/* Loads 16 bytes (the rows of a panel) or, for an AVX2 half, 8 (the rest of the vector is 0):
 * a half never reads past its own rows. */
static inline XQ_AI __m128i xk_load_rows(const uint8_t *p, int n)
{
    return n == 16 ? _mm_loadu_si128((const __m128i *)p) : _mm_loadl_epi64((const __m128i *)p);
}

/* The 6-bit scale (sc) and minimum (m) codes of block j (0..7) of a super-block for the rows of a
 * tile (n = 16 or 8 of them), from its 12 bytes of packed codes s[12][16] (GGUF's encoding, byte
 * i of the 16 rows at s + 16i; s already offset to the tile's first row). */
static inline XQ_AI void xk_scale_min(const uint8_t *s, int n, int j, __m128i *sc, __m128i *m)
{
    const __m128i m6 = _mm_set1_epi8(63), m4 = _mm_set1_epi8(15), hi2 = _mm_set1_epi8(0x30);
#define XK_LD(i) xk_load_rows(s + 16 * (i), n)
    if (j < 4) {
        *sc = _mm_and_si128(XK_LD(j), m6);
        *m = _mm_and_si128(XK_LD(j + 4), m6);
    } else {
        const __m128i a = XK_LD(j + 4);
        /* the top 2 bits of byte j - 4 (or j) become bits 4..5: (x >> 2) & 0x30 */
        *sc = _mm_or_si128(_mm_and_si128(a, m4),
                           _mm_and_si128(_mm_srli_epi16(XK_LD(j - 4), 2), hi2));
        *m = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), m4),
                          _mm_and_si128(_mm_srli_epi16(XK_LD(j), 2), hi2));
    }
#undef XK_LD
}

/* -x, exactly (the sign bit flipped; 0 - x would give +0 for x = +0). */
#define XK_NEG512(x) _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x),              \
                                                          _mm512_set1_epi32(INT32_MIN)))
#define XK_NEG256(x) _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(x),              \
                                                          _mm256_set1_epi32(INT32_MIN)))

/* The scales ws (and ws1, the second half's, for Q6_K) and minimums wm of block b for the rows of
 * a tile, in P-bit registers: 16 rows (P = 512) or rows 8h..8h+7 (P = 256, CVT8 takes the low 8
 * bytes of a 16-byte vector). sc, mn, sub: the panel's arrays. */
#define XK_BLOCK_SCALES(P, F, HALF, CVT8U, CVT8S)                                                \
    __m##P ws, ws1, wm;                                                                          \
    if (XK_SUPER(F)) {                                                                           \
        const size_t sb = b >> 3;                                                                \
        const int j8 = (int)(b & 7);                                                             \
        const __m##P D = XK_F16_##P(sc + sb * 32 + (HALF));                                      \
        if ((F) == XK_Q6_K) {                                                                    \
            const uint8_t *s = sub + sb * 256 + 32 * j8 + (HALF) / 2;                            \
            __m128i s0 = xk_load_rows(s, 16 - (HALF) / 2);                                       \
            __m128i s1 = xk_load_rows(s + 16, 16 - (HALF) / 2);                                  \
            ws = _mm##P##_mul_ps(D, _mm##P##_cvtepi32_ps(CVT8S(s0)));                            \
            ws1 = _mm##P##_mul_ps(D, _mm##P##_cvtepi32_ps(CVT8S(s1)));                           \
            wm = ws;                                                                             \
        } else {                                                                                 \
            __m128i c6, m6;                                                                      \
            xk_scale_min(sub + sb * 192 + (HALF) / 2, 16 - (HALF) / 2, j8, &c6, &m6);            \
            ws = _mm##P##_mul_ps(D, _mm##P##_cvtepi32_ps(CVT8U(c6)));                            \
            const __m##P DM = XK_F16_##P(mn + sb * 32 + (HALF));                                 \
            wm = XK_NEG##P(_mm##P##_mul_ps(DM, _mm##P##_cvtepi32_ps(CVT8U(m6))));                \
            ws1 = ws;                                                                            \
        }                                                                                        \
    } else {                                                                                     \
        ws = XK_F16_##P(sc + b * 32 + (HALF));                                                   \
        wm = XK_ASYM(F) ? XK_F16_##P(mn + b * 32 + (HALF)) : ws;                                 \
        ws1 = ws;                                                                                \
    }
#define XK_F16_512(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define XK_F16_256(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))

/* Step 3, one block term (dots D[k][i], scale WS) for the MR rows. */
#define XK_TERM(P, D, WS)                                                                        \
    for (int i = 0; i < MR; i++) {                                                               \
        __m##P v = XQ_PARTS_VALUE(P, D, i);                                                      \
        acc[i] = _mm##P##_fmadd_ps(_mm##P##_mul_ps(WS, _mm##P##_set1_ps(xb[i]->d)), v, acc[i]); \
    }
/* The first dot values of part k of row i (the offset corrections) into d: for the block, or
 * for half HALF of it (Q6_K). */
#define XK_DOT_INIT(P, F, HALF)                                                                  \
    for (int i = 0; i < MR; i++) {                                                               \
        const xq_xh *hb = xh + i * nb + b;                                                       \
        for (int k = 0; k < PARTS; k++)                                                          \
            d[k][i] = (F) == XK_Q5_0   ? _mm##P##_set1_epi32(2 * xb[i]->c8[k])                   \
                      : (F) == XK_Q6_K ? _mm##P##_set1_epi32((HALF) ? hb->hi[k] : hb->lo[k])     \
                                       : _mm##P##_setzero_si##P();                               \
    }

/* The prefetches of block b when one tile streams the panel (XK_PF, XK_PF2, XK_PFS): blk, hbk
 * the block's low nibbles and bit planes (at a line start), hb the bytes of its planes. */
#define XK_STREAM_PREFETCH()                                                                     \
    for (size_t i = 0; i < 256; i += 64)                                                         \
        _mm_prefetch((const char *)blk + XK_PF + i, XK_PF_HINT);                                 \
    for (size_t i = 0; i < hb; i += 64)                                                          \
        _mm_prefetch((const char *)hbk + XK_PF / 4 * XK_PLANES(F) + i, XK_PF_HINT);              \
    for (size_t i = 0; i < 256; i += 64)                                                         \
        _mm_prefetch((const char *)blk + XK_PF2 + i, XK_PF2_HINT);                               \
    for (size_t i = 0; i < hb; i += 64)                                                          \
        _mm_prefetch((const char *)hbk + XK_PF2 / 4 * XK_PLANES(F) + i, XK_PF2_HINT);            \
    if (!XK_SUPER(F)) { /* the small streams */                                                  \
        _mm_prefetch((const char *)sc + (b + XK_PFS) * 32, XK_PF_HINT);                          \
        if (XK_ASYM(F))                                                                          \
            _mm_prefetch((const char *)mn + (b + XK_PFS) * 32, XK_PF_HINT);                      \
    } else if ((b & 7) == 0) { /* once per super-block */                                        \
        const size_t sa = (b >> 3) + (XK_PFS + 7) / 8;                                           \
        for (size_t i = 0; i < XK_SUB_BYTES(F); i += 64)                                         \
            _mm_prefetch((const char *)sub + sa * XK_SUB_BYTES(F) + i, XK_PF_HINT);              \
        _mm_prefetch((const char *)sc + sa * 32, XK_PF_HINT);                                    \
        if (XK_ASYM(F))                                                                          \
            _mm_prefetch((const char *)mn + sa * 32, XK_PF_HINT);                                \
    }

/* AVX-512 VNNI micro-kernel of codec F: MR rows of x against panel p (16 rows, nr valid). */
static inline XQ_AI XQ_T512 void xk_mk512(const int MR, const int F, const int PARTS,
                                          const xq_weights *w, size_t p, const xq_xb *x,
                                          const xq_xh *xh, float *out, size_t ldo, size_t nr,
                                          int accum, size_t t, size_t nt)
{
    const size_t nb = w->nb, hb = 64 * XK_PLANES(F);
    const uint8_t *wq = w->qs + p * nb * 256;
    const uint8_t *wh = XK_PLANES(F) ? w->high + p * nb * hb : NULL;
    const uint8_t *sc = w->scales + p * w->ng * 32;
    const uint8_t *mn = XK_ASYM(F) ? w->mins + p * w->ng * 32 : NULL;
    const uint8_t *sub = XK_SUPER(F) ? w->sub + p * w->ng * XK_SUB_BYTES(F) : NULL;
    const __m512i low4 = _mm512_set1_epi8(0x0f), c16 = _mm512_set1_epi8(16);
    const __m512i c32 = _mm512_set1_epi8(32);
    const __m512 inv256 = _mm512_set1_ps(1.0f / 256.0f);
    XQ_ZEROED_ACC(512, XQ_MR512);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wq + b * 256;
        const uint8_t *hbk = XK_PLANES(F) ? wh + b * hb : NULL;
        if (nt == 1) {
            XK_STREAM_PREFETCH()
        } else { /* row tile t of nt: its share of the next panel's lines */
            for (size_t l = (t * nb + b) * 4 / nt; l < (t * nb + b + 1) * 4 / nt; l++)
                _mm_prefetch((const char *)wq + nb * 256 + 64 * l, _MM_HINT_T0);
            if (XK_PLANES(F))
                for (size_t l = (t * nb + b) * hb / 64 / nt; l < (t * nb + b + 1) * hb / 64 / nt;
                     l++)
                    _mm_prefetch((const char *)wh + nb * hb + 64 * l, _MM_HINT_T0);
        }
        const xq_xb *xb[XQ_MR512];
        for (int i = 0; i < MR; i++)
            xb[i] = x + i * nb + b;
        XK_BLOCK_SCALES(512, F, 0, _mm512_cvtepu8_epi32, _mm512_cvtepi8_epi32)
        __m512i d[3][XQ_MR512];
/* Line j of the block's low (H = 0) or high (H = 1) nibbles with their bit planes, as bytes. */
#define XK_LINE512(j, H)                                                                         \
    __m512i W = _mm512_loadu_si512(blk + 64 * (j));                                              \
    W = _mm512_and_si512((H) ? _mm512_srli_epi16(W, 4) : W, low4);                              \
    if (XK_PLANES(F)) {                                                                          \
        uint64_t m0;                                                                             \
        memcpy(&m0, hbk + 32 * (H) + 8 * (j), 8);                                                \
        W = _mm512_mask_add_epi8(W, _cvtu64_mask64(m0), W, c16);                                 \
    }                                                                                            \
    if (XK_PLANES(F) == 2) {                                                                     \
        uint64_t m1;                                                                             \
        memcpy(&m1, hbk + 64 + 32 * (H) + 8 * (j), 8);                                           \
        W = _mm512_mask_add_epi8(W, _cvtu64_mask64(m1), W, c32);                                 \
    }
#define XK_DOTS512(W, o)                                                                         \
    for (int i = 0; i < MR; i++)                                                                 \
        for (int k = 0; k < PARTS; k++)                                                          \
            d[k][i] = xq_dpbusd(d[k][i], W, xb[i]->q[k] + (o));
        if (F == XK_Q6_K) { /* each half on its own: half 0 (low nibbles), then half 1 */
            for (int half = 0; half < 2; half++) {
                XK_DOT_INIT(512, F, half)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    XK_LINE512(j, half)
                    XK_DOTS512(W, 16 * half + 4 * j)
                }
                if (half == 0) {
                    XK_TERM(512, d, ws)
                } else {
                    XK_TERM(512, d, ws1)
                }
            }
        } else {
            XK_DOT_INIT(512, F, 0)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                {
                    XK_LINE512(j, 0)
                    XK_DOTS512(W, 4 * j)
                }
                {
                    XK_LINE512(j, 1)
                    XK_DOTS512(W, 16 + 4 * j)
                }
            }
            XK_TERM(512, d, ws)
            if (XK_ASYM(F))
                for (int i = 0; i < MR; i++)
                    acc[i] = _mm512_fmadd_ps(wm, _mm512_set1_ps(xb[i]->ds), acc[i]);
        }
    }
    XQ_STORE_ACC512
}

/* 32 bytes (AVX2) of 0 or 16 from 32 bits of a plane's mask: byte i is 16 where bit i is set. */
static inline XQ_AI __m256i xk_plane256(const uint8_t *p, __m256i v)
{
    uint32_t bits;
    memcpy(&bits, p, 4);
    const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i m = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), sel);
    m = _mm256_cmpeq_epi8(_mm256_and_si256(m, bit), bit);
    return _mm256_and_si256(m, v);
}

#define XK_CVT8U_256(v) _mm256_cvtepu8_epi32(v)
#define XK_CVT8S_256(v) _mm256_cvtepi8_epi32(v)

/* AVX2 micro-kernel of codec F: MR rows of x against half h (rows 8h..8h+7) of panel p; if
 * stream (h = 0), it prefetches the panel ahead as xk_mk512 does for one tile. */
static inline XQ_AI void xk_mk256(const int MR, const int F, const int PARTS, const xq_weights *w,
                                  size_t p, int h, const xq_xb *x, const xq_xh *xh, float *out,
                                  size_t ldo, size_t nr, int accum, int stream)
{
    const size_t nb = w->nb, hb = 64 * XK_PLANES(F);
    const uint8_t *wq = w->qs + p * nb * 256 + 32 * h;
    const uint8_t *wh = XK_PLANES(F) ? w->high + p * nb * hb + 4 * h : NULL;
    const uint8_t *sc = w->scales + p * w->ng * 32;
    const uint8_t *mn = XK_ASYM(F) ? w->mins + p * w->ng * 32 : NULL;
    const uint8_t *sub = XK_SUPER(F) ? w->sub + p * w->ng * XK_SUB_BYTES(F) : NULL;
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const __m256i c16 = _mm256_set1_epi8(16), c32 = _mm256_set1_epi8(32);
    const __m256 inv256 = _mm256_set1_ps(1.0f / 256.0f);
    XQ_ZEROED_ACC(256, XQ_MR256);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = wq + b * 256;
        const uint8_t *hbk = XK_PLANES(F) ? wh + b * hb : NULL;
        if (stream) {
            XK_STREAM_PREFETCH()
        }
        const xq_xb *xb[XQ_MR256];
        for (int i = 0; i < MR; i++)
            xb[i] = x + i * nb + b;
        XK_BLOCK_SCALES(256, F, 16 * h, XK_CVT8U_256, XK_CVT8S_256)
        __m256i d[3][XQ_MR256];
#define XK_LINE256(j, H)                                                                         \
    __m256i W = _mm256_loadu_si256((const __m256i *)(blk + 64 * (j)));                           \
    W = _mm256_and_si256((H) ? _mm256_srli_epi16(W, 4) : W, low4);                              \
    if (XK_PLANES(F))                                                                            \
        W = _mm256_or_si256(W, xk_plane256(hbk + 32 * (H) + 8 * (j), c16));                      \
    if (XK_PLANES(F) == 2)                                                                       \
        W = _mm256_or_si256(W, xk_plane256(hbk + 64 + 32 * (H) + 8 * (j), c32));
        if (F == XK_Q6_K) { /* each half on its own: half 0 (low nibbles), then half 1 */
            for (int half = 0; half < 2; half++) {
                XK_DOT_INIT(256, F, half)
                for (int j = 0; j < 4; j++) {
                    XK_LINE256(j, half)
                    for (int i = 0; i < MR; i++)
                        for (int k = 0; k < PARTS; k++) {
                            /* codes <= 63, |q| <= 127: a pair sums to at most 16002 */
                            __m256i s16 = _mm256_maddubs_epi16(W, XQ_X256(i, k, 16 * half + 4 * j));
                            d[k][i] = _mm256_add_epi32(d[k][i], _mm256_madd_epi16(s16, ones));
                        }
                }
                if (half == 0) {
                    XK_TERM(256, d, ws)
                } else {
                    XK_TERM(256, d, ws1)
                }
            }
        } else {
            XK_DOT_INIT(256, F, 0)
            for (int j = 0; j < 4; j++) {
                __m256i L, H;
                {
                    XK_LINE256(j, 0)
                    L = W;
                }
                {
                    XK_LINE256(j, 1)
                    H = W;
                }
                for (int i = 0; i < MR; i++)
                    for (int k = 0; k < PARTS; k++) {
                        /* codes <= 31, |q| <= 127: two pairs sum to at most 15748 */
                        __m256i s16 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(L, XQ_X256(i, k, 4 * j)),
                            _mm256_maddubs_epi16(H, XQ_X256(i, k, 16 + 4 * j)));
                        d[k][i] = _mm256_add_epi32(d[k][i], _mm256_madd_epi16(s16, ones));
                    }
            }
            XK_TERM(256, d, ws)
            if (XK_ASYM(F))
                for (int i = 0; i < MR; i++)
                    acc[i] = _mm256_fmadd_ps(wm, _mm256_set1_ps(xb[i]->ds), acc[i]);
        }
    }
    for (int i = 0; i < MR; i++) {
        float r[8];
        _mm256_storeu_ps(r, acc[i]);
        xq_store(out + i * ldo + 8 * h, r, nr, accum);
    }
}

static inline XQ_AI XQ_T512 void xk_rows512(const int F, const int PARTS, const xq_weights *w,
                                            size_t p, const xq_xb *x, const xq_xh *xh, size_t M,
                                            float *out, size_t ldo, size_t nr, int accum)
{
    const size_t nt = (M + XQ_MR512 - 1) / XQ_MR512;
    for (size_t t = 0, m = 0, r; t < nt; t++, m += r) {
        r = M / nt + (t < M % nt);
        /* tiles of 1 or 2 rows: only as the one tile of M <= 2 (as in xq_rows512) */
#define XK_CASE512(R, T, NT)                                                                     \
    case R:                                                                                      \
        xk_mk512(R, F, PARTS, w, p, x + m * w->nb, xh + m * w->nb, out + m * ldo, ldo, nr,      \
                 accum, T, NT);                                                                  \
        break;
        switch (r) {
        XK_CASE512(1, 0, 1) XK_CASE512(2, 0, 1)
        XK_CASE512(3, t, nt) XK_CASE512(4, t, nt) XK_CASE512(5, t, nt) XK_CASE512(6, t, nt)
        default: break;
        }
    }
}

/* A panel prepared once per work item, for the row tiles that follow (the AMX kernels of
 * gemm_amx.h for every format; xk_mk512p below for Q6_K): per 32-value block, the codes as
 * bytes in the int8 panel layout, which is also the AMX B tile (not for int8, whose blocks are
 * in it already), and the float32 scales of the 16 rows. */
typedef struct {
    uint8_t codes[512];
    float ws[16], ws1[16], wm[16];
} xp_block;

static __thread xp_block *xp_buf;
static __thread size_t xp_buf_blocks;
static pthread_key_t xp_buf_key; /* frees a thread's buffer when the thread exits */
static pthread_once_t xp_buf_once = PTHREAD_ONCE_INIT;

static void xp_buf_key_init(void)
{
    pthread_key_create(&xp_buf_key, free);
}

/* The thread's buffer for nb blocks (grown as needed, kept for the thread's next call, freed
 * when the thread exits), or NULL if memory is short. */
static xp_block *xp_blocks(size_t nb)
{
    if (nb > xp_buf_blocks) {
        pthread_once(&xp_buf_once, xp_buf_key_init);
        free(xp_buf);
        xp_buf_blocks = 0;
        xp_buf = (xp_block *)aligned_alloc(64, nb * sizeof(xp_block));
        pthread_setspecific(xp_buf_key, xp_buf);
        if (xp_buf == NULL)
            return NULL;
        xp_buf_blocks = nb;
    }
    return xp_buf;
}

/* Rows of the codes of a block for the 4-bit formats: line j of the low (H = 0) or high (H = 1)
 * nibbles of the packed block at q (64 bytes), with the bit planes of the codecs (planes e = 0,
 * 1 at hb + 64 e, one 64-bit mask per line): the codes 0..63 as bytes. */
static inline XQ_AI XQ_T512 __m512i xp_line(int planes, const uint8_t *q, const uint8_t *hb,
                                            int j, int H)
{
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    __m512i v = _mm512_loadu_si512(q + 64 * j);
    v = _mm512_and_si512(H ? _mm512_srli_epi16(v, 4) : v, low4);
    for (int e = 0; e < planes; e++) {
        uint64_t m;
        memcpy(&m, hb + 64 * e + 8 * (4 * H + j), 8);
        v = _mm512_mask_add_epi8(v, _cvtu64_mask64(m), v, _mm512_set1_epi8((char)(16 << e)));
    }
    return v;
}

/* Fill the buffer for panel p: codes (4-bit formats) and scales of every block. KIND (F = 0):
 * 0 int8, 1 int4 symmetric, 2 int4 asymmetric; F: the codec (gemm_k.h) or 0. */
static inline XQ_AI XQ_T512 void xp_prepare(const int KIND, const int F, const xq_weights *w,
                                            size_t p, xp_block *buf)
{
    const size_t nb = w->nb;
    const int planes = F ? XK_PLANES(F) : 0;
    const size_t ss = w->f32 ? 64 : 32; /* bytes of 16 scales */
    const uint8_t *sc = F ? w->scales + p * w->ng * 32 : w->scales + p * w->ng * ss;
    const uint8_t *mn = (F ? XK_ASYM(F) : KIND == 2) ? w->mins + p * w->ng * (F ? 32 : ss) : NULL;
    const uint8_t *sub = F && XK_SUPER(F) ? w->sub + p * w->ng * XK_SUB_BYTES(F) : NULL;
    const uint8_t *wq = w->qs + p * nb * (F || KIND ? 256 : 512);
    const uint8_t *wh = planes ? w->high + p * nb * 64 * (size_t)planes : NULL;
    for (size_t b = 0; b < nb; b++) {
        xp_block *o = buf + b;
        if (F || KIND) {
            const uint8_t *q = wq + b * 256;
            const uint8_t *hb = planes ? wh + b * 64 * (size_t)planes : NULL;
            for (int H = 0; H < 2; H++)
                for (int j = 0; j < 4; j++)
                    _mm512_storeu_si512(o->codes + 64 * (4 * H + j), xp_line(planes, q, hb, j, H));
        }
        if (F) {
            XK_BLOCK_SCALES(512, F, 0, _mm512_cvtepu8_epi32, _mm512_cvtepi8_epi32)
            _mm512_storeu_ps(o->ws, ws);
            _mm512_storeu_ps(o->ws1, ws1);
            _mm512_storeu_ps(o->wm, wm);
        } else {
            const size_t g = (b >> w->gshift) * ss;
            const __m512 ws = XQ_SCALES512(sc + g);
            _mm512_storeu_ps(o->ws, ws);
            _mm512_storeu_ps(o->wm, KIND == 2 ? XQ_SCALES512(mn + g) : ws);
        }
    }
}

/* AVX-512 VNNI micro-kernel of Q6_K on a prepared panel (xp_prepare: the codes as bytes, the
 * scales as float32): MR rows of x, the same dots and block terms as xk_mk512, so the same
 * bits; only the codes and scales are read from the buffer instead of being rebuilt per tile. */
static inline XQ_AI XQ_T512 void xk_mk512p(const int MR, const int PARTS, const xp_block *buf,
                                           size_t nb, const xq_xb *x, const xq_xh *xh,
                                           float *out, size_t ldo, size_t nr, int accum)
{
    const int F = XK_Q6_K;
    const __m512 inv256 = _mm512_set1_ps(1.0f / 256.0f);
    XQ_ZEROED_ACC(512, XQ_MR512);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *codes = buf[b].codes; /* line 4 half + j: values 16 half + 4j.. */
        const xq_xb *xb[XQ_MR512];
        for (int i = 0; i < MR; i++)
            xb[i] = x + i * nb + b;
        __m512i d[3][XQ_MR512];
        for (int half = 0; half < 2; half++) {
            XK_DOT_INIT(512, F, half)
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                const __m512i W = _mm512_load_si512(codes + 64 * (4 * half + j));
                XK_DOTS512(W, 16 * half + 4 * j)
            }
            const __m512 ws = _mm512_load_ps(half ? buf[b].ws1 : buf[b].ws);
            XK_TERM(512, d, ws)
        }
    }
    XQ_STORE_ACC512
}

/* All M rows against a prepared Q6_K panel, in near-equal tiles of at most XQ_MR512 rows. */
static inline XQ_AI XQ_T512 void xk_rows512p(const int PARTS, const xp_block *buf,
                                             size_t nb, const xq_xb *x, const xq_xh *xh,
                                             size_t M, float *out, size_t ldo, size_t nr,
                                             int accum)
{
    const size_t nt = (M + XQ_MR512 - 1) / XQ_MR512;
    for (size_t t = 0, m = 0, r; t < nt; t++, m += r) {
        r = M / nt + (t < M % nt);
#define XK_CASE512P(R)                                                                           \
    case R:                                                                                      \
        xk_mk512p(R, PARTS, buf, nb, x + m * nb, xh + m * nb, out + m * ldo, ldo, nr, accum);    \
        break;
        switch (r) {
        XK_CASE512P(1) XK_CASE512P(2) XK_CASE512P(3) XK_CASE512P(4) XK_CASE512P(5)
        XK_CASE512P(6)
        default: break;
        }
    }
}

static XQ_T512 void xk_panel512(const xq_weights *w, size_t p, const xq_xb *x, const xq_xh *xh,
                                size_t M, float *out, size_t ldo, size_t nr, int accum)
{
    if (w->fmt == XK_Q6_K && M >= XK_PREP_M) { /* rebuild the codes once, not per row tile */
        xp_block *buf = xp_blocks(w->nb);
        if (buf != NULL) {
#define XK_ROWS512P_P(A, PARTS) xk_rows512p(PARTS, buf, w->nb, x, xh, M, out, ldo, nr, accum)
            xp_prepare(0, XK_Q6_K, w, p, buf);
            XQ_BY_PARTS(XK_ROWS512P_P, 0);
            return;
        }
    }
#define XK_ROWS512_P(F, PARTS) xk_rows512(F, PARTS, w, p, x, xh, M, out, ldo, nr, accum)
#define XK_ROWS512(F) XQ_BY_PARTS(XK_ROWS512_P, F)
    switch (w->fmt) {
    case XK_Q5_0: XK_ROWS512(XK_Q5_0); break;
    case XK_Q5_1: XK_ROWS512(XK_Q5_1); break;
    case XK_Q4_K: XK_ROWS512(XK_Q4_K); break;
    case XK_Q5_K: XK_ROWS512(XK_Q5_K); break;
    case XK_Q6_K: XK_ROWS512(XK_Q6_K); break;
    default: break;
    }
}

static inline XQ_AI void xk_rows256(const int F, const int PARTS, const xq_weights *w, size_t p,
                                    const xq_xb *x, const xq_xh *xh, size_t M, float *out,
                                    size_t ldo, size_t nr, int accum)
{
    for (int h = 0; h < 2 && nr > (size_t)(8 * h); h++) {
        const size_t nh = nr - 8 * h < 8 ? nr - 8 * h : 8;
        size_t m = 0;
#define XK_MK256(R)                                                                              \
    xk_mk256(R, F, PARTS, w, p, h, x + m * w->nb, xh + m * w->nb, out + m * ldo, ldo, nh, accum, \
             h == 0 && m == 0)
        for (; m + XQ_MR256 <= M; m += XQ_MR256)
            XK_MK256(XQ_MR256);
        if (M > m)
            XK_MK256(1);
    }
}

static void xk_panel256(const xq_weights *w, size_t p, const xq_xb *x, const xq_xh *xh, size_t M,
                        float *out, size_t ldo, size_t nr, int accum)
{
#define XK_ROWS256_P(F, PARTS) xk_rows256(F, PARTS, w, p, x, xh, M, out, ldo, nr, accum)
#define XK_ROWS256(F) XQ_BY_PARTS(XK_ROWS256_P, F)
    switch (w->fmt) {
    case XK_Q5_0: XK_ROWS256(XK_Q5_0); break;
    case XK_Q5_1: XK_ROWS256(XK_Q5_1); break;
    case XK_Q4_K: XK_ROWS256(XK_Q4_K); break;
    case XK_Q5_K: XK_ROWS256(XK_Q5_K); break;
    case XK_Q6_K: XK_ROWS256(XK_Q6_K); break;
    default: break;
    }
}

/* Panel p of out for a codec weight (all M rows). */
static void xk_panel(int isa, const xq_weights *w, size_t p, const xq_xb *x, const xq_xh *xh,
                     size_t M, float *out, size_t ldo, size_t nr, int accum)
{
    if (isa)
        xk_panel512(w, p, x, xh, M, out, ldo, nr, accum);
    else
        xk_panel256(w, p, x, xh, M, out, ldo, nr, accum);
}

/* Row r of a codec weight dequantized into o[K]: W as the header comment defines it, each
 * product rounded before the minimum is added (layout.dequantize_rows does the same). */
static void xk_dequant_row(const xq_weights *w, size_t r, float *o)
{
    const int F = w->fmt, planes = XK_PLANES(F);
    const size_t p = r / 16, lane = r % 16, nb = w->nb, hb = 64 * (size_t)planes;
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = w->qs + (p * nb + b) * 256 + 4 * lane;
        const uint8_t *hbk = planes ? w->high + (p * nb + b) * hb : NULL;
        float ws[2], wm = 0.0f;
        uint16_t h16;
        if (XK_SUPER(F)) {
            const size_t sb = b >> 3, j8 = b & 7;
            memcpy(&h16, w->scales + ((p * w->ng + sb) * 16 + lane) * 2, 2);
            const float D = _cvtsh_ss(h16);
            if (F == XK_Q6_K) {
                const int8_t *s = (const int8_t *)w->sub + (p * w->ng + sb) * 256 + lane;
                ws[0] = D * (float)s[16 * (2 * j8)];
                ws[1] = D * (float)s[16 * (2 * j8 + 1)];
            } else {
                const uint8_t *s = w->sub + (p * w->ng + sb) * 192 + lane;
                int sc, m;
                if (j8 < 4) {
                    sc = s[16 * j8] & 63;
                    m = s[16 * (j8 + 4)] & 63;
                } else {
                    sc = (s[16 * (j8 + 4)] & 15) | ((s[16 * (j8 - 4)] >> 6) << 4);
                    m = (s[16 * (j8 + 4)] >> 4) | ((s[16 * j8] >> 6) << 4);
                }
                memcpy(&h16, w->mins + ((p * w->ng + sb) * 16 + lane) * 2, 2);
                ws[0] = ws[1] = D * (float)sc;
                wm = -(_cvtsh_ss(h16) * (float)m);
            }
        } else {
            memcpy(&h16, w->scales + ((p * w->ng + b) * 16 + lane) * 2, 2);
            ws[0] = ws[1] = _cvtsh_ss(h16);
            if (XK_ASYM(F)) {
                memcpy(&h16, w->mins + ((p * w->ng + b) * 16 + lane) * 2, 2);
                wm = _cvtsh_ss(h16);
            }
        }
        const int offset = F == XK_Q5_0 ? 16 : F == XK_Q6_K ? 32 : 0;
        float *ob = o + 32 * b;
        for (int half = 0; half < 2; half++)
            for (int j = 0; j < 4; j++)
                for (int t = 0; t < 4; t++) {
                    const size_t line = 4 * (size_t)half + j, byte = 4 * lane + t;
                    int c = half ? blk[64 * j + t] >> 4 : blk[64 * j + t] & 15;
                    for (int e = 0; e < planes; e++)
                        c |= ((hbk[64 * e + 8 * line + byte / 8] >> (byte % 8)) & 1) << (4 + e);
                    float v = ws[half] * (float)(c - offset);
                    XQ_NO_FMA(v);
                    ob[16 * half + 4 * j + t] = XK_ASYM(F) ? v + wm : v;
                }
    }
}

/* ---- repacking at load: GGUF blocks -> the codec layout (layout.py; reference.repack_codec)
 *
 * Nothing is unpacked value by value. Within a GGUF block, byte i of a 32-byte run of codes
 * (Q4_K, Q5_K qs; Q6_K ql, qh; Q5_K qh) belongs to value i of one or more 32-value blocks, and a
 * line of the layout holds 4 consecutive values (one dword) of each of the 16 rows. So the
 * repack reads each run as 8 dwords of 8 rows at a time and transposes them (xk_transpose8):
 * dword l of the rows becomes 32 bytes of line l. Then whole lines are formed with a few byte
 * operations: a qs line is the low or high nibbles of line l (values 4l..4l+3) and of line
 * l + 4 (values 16 + 4l ..) side by side, and a bit plane line is a movemask of the bit it
 * holds. The Q5_0 / Q5_1 qs bytes are already the layout's (value i low nibble, 16 + i high):
 * they move as dwords. The per-block fields (float16 d, dmin; 6-bit or int8 sub-scales) are a
 * 16 x 16 byte transpose of the 16 rows' first (Q6_K: last) 16 bytes. Every byte of the panel's
 * arrays is written; the rows past n read a block of zeros. */

/* Bytes of one GGUF block of codec F and values per block. */
#define XK_GGUF_BYTES(F)                                                                         \
    ((F) == XK_Q5_0 ? 22 : (F) == XK_Q5_1 ? 24 : (F) == XK_Q4_K ? 144 : (F) == XK_Q5_K ? 176 : 210)
#define XK_GGUF_VALUES(F) (XK_SUPER(F) ? 256 : 32)

/* The block the rows past n of the last panel read: every field 0 (at least one GGUF block). */
static const uint8_t xk_zero_block[256] = {0};

/* t[l] = dword l of the 32 bytes at src[r] + off, for the rows r = 0..7 in order (bytes
 * 4r..4r+3 of t[l]): an 8 x 8 transpose of dwords. */
static inline XQ_AI void xk_transpose8(const uint8_t *const *src, size_t off, __m256i t[8])
{
    __m256i r[8], a[8];
    for (int i = 0; i < 8; i++)
        r[i] = _mm256_loadu_si256((const __m256i *)(src[i] + off));
    for (int i = 0; i < 8; i += 2) { /* a[i]: dwords 0, 1 | 4, 5 of rows i, i + 1 interleaved */
        a[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        a[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]); /* dwords 2, 3 | 6, 7 */
    }
    for (int i = 0; i < 8; i += 4) { /* r[i + c]: dword c | 4 + c of rows i..i + 3 */
        r[i] = _mm256_unpacklo_epi64(a[i], a[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(a[i], a[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(a[i + 1], a[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(a[i + 1], a[i + 3]);
    }
    for (int c = 0; c < 4; c++) {
        t[c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x20);
        t[4 + c] = _mm256_permute2x128_si256(r[c], r[4 + c], 0x31);
    }
}

/* The 4 qs lines of a block (for 8 rows, 32 bytes each, at q + 64 jj) from its codes' lines c
 * (line l: values 4l..4l+3): the low nibbles (SHIFT 0) or the high nibbles (SHIFT 4) of line jj
 * in the low nibble of each byte, those of line jj + 4 in the high nibble. */
static inline XQ_AI void xk_store_qs(const __m256i c[8], int shift, uint8_t *q)
{
    const __m256i low4 = _mm256_set1_epi8(0x0f), high4 = _mm256_set1_epi8((char)0xf0);
    for (int jj = 0; jj < 4; jj++) {
        __m256i v;
        if (shift == 0)
            v = _mm256_or_si256(_mm256_and_si256(c[jj], low4),
                                _mm256_slli_epi16(_mm256_and_si256(c[jj + 4], low4), 4));
        else
            v = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c[jj], 4), low4),
                                _mm256_and_si256(c[jj + 4], high4));
        _mm256_storeu_si256((__m256i *)(q + 64 * jj), v);
    }
}

/* One bit plane of a block for 8 rows: bit BIT (0..7) of the bytes of the lines c, as the 32
 * bits of each line's mask that belong to these rows, at h + 8 l. */
static inline XQ_AI void xk_store_plane(const __m256i c[8], int bit, uint8_t *h)
{
    for (int l = 0; l < 8; l++) {
        const uint32_t m = (uint32_t)_mm256_movemask_epi8(_mm256_slli_epi16(c[l], 7 - bit));
        memcpy(h + 8 * l, &m, 4);
    }
}

/* t[i] = byte i of the 16 bytes at src[r] + off for the rows r = 0..15 (byte r of t[i]): a 16 x
 * 16 transpose of bytes. */
static inline XQ_AI void xk_transpose16(const uint8_t *const *src, size_t off, __m128i t[16])
{
    __m128i a[16], b[16];
    for (int r = 0; r < 16; r++)
        a[r] = _mm_loadu_si128((const __m128i *)(src[r] + off));
    /* four rounds, each interleaving pairs of rows 1, 2, 4, 8 apart in units of 1, 2, 4, 8
     * bytes: after round k, b[i] holds 2^(k+1) rows' bytes in groups of 2^(k+1) */
    for (int i = 0; i < 8; i++) {
        b[2 * i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 2; c++) {
            a[4 * i + c] = _mm_unpacklo_epi16(b[4 * i + c], b[4 * i + c + 2]);
            a[4 * i + c + 2] = _mm_unpackhi_epi16(b[4 * i + c], b[4 * i + c + 2]);
        }
    for (int i = 0; i < 2; i++)
        for (int c = 0; c < 4; c++) {
            b[8 * i + c] = _mm_unpacklo_epi32(a[8 * i + c], a[8 * i + c + 4]);
            b[8 * i + c + 4] = _mm_unpackhi_epi32(a[8 * i + c], a[8 * i + c + 4]);
        }
    for (int c = 0; c < 8; c++) {
        a[c] = _mm_unpacklo_epi64(b[c], b[c + 8]);
        a[c + 8] = _mm_unpackhi_epi64(b[c], b[c + 8]);
    }
    /* a[k] now holds byte i of the rows, i = the bits of k reversed in order 0, 2, 1, 3 */
    for (int k = 0; k < 16; k++) {
        const int i = ((k & 1) << 3) | ((k & 2) << 1) | ((k & 4) >> 1) | ((k & 8) >> 3);
        t[i] = a[k];
    }
}

/* The per-row fields of GGUF block g of the 16 rows blk[] (ggml's d, dmin; 12 packed 6-bit
 * scales and minimums or 16 int8 scales) into the panel's scales, mins and sub at group g. */
static inline XQ_AI void xk_repack_fields(const int F, const uint8_t *const *blk, size_t p,
                                          size_t ng, size_t g, uint8_t *scales, uint8_t *mins,
                                          uint8_t *sub)
{
    const size_t at = (p * ng + g) * 32; /* 16 float16 */
    if (F == XK_Q6_K) {
        __m128i t[16];
        xk_transpose16(blk, 192, t);
        for (int i = 0; i < 16; i++)
            _mm_storeu_si128((__m128i *)(sub + ((p * ng + g) * 16 + (size_t)i) * 16), t[i]);
        for (int r = 0; r < 16; r++)
            memcpy(scales + at + 2 * r, blk[r] + 208, 2);
        return;
    }
    if (!XK_SUPER(F)) { /* d (and m): 2 (4) bytes of 22 (24), too few to transpose */
        for (int r = 0; r < 16; r++) {
            memcpy(scales + at + 2 * r, blk[r], 2);
            if (XK_ASYM(F))
                memcpy(mins + at + 2 * r, blk[r] + 2, 2);
        }
        return;
    }
    __m128i t[16];
    xk_transpose16(blk, 0, t); /* bytes d0 d1 m0 m1, then the 12 of scales */
    _mm_storeu_si128((__m128i *)(scales + at), _mm_unpacklo_epi8(t[0], t[1]));
    _mm_storeu_si128((__m128i *)(scales + at + 16), _mm_unpackhi_epi8(t[0], t[1]));
    _mm_storeu_si128((__m128i *)(mins + at), _mm_unpacklo_epi8(t[2], t[3]));
    _mm_storeu_si128((__m128i *)(mins + at + 16), _mm_unpackhi_epi8(t[2], t[3]));
    for (int i = 0; i < 12; i++)
        _mm_storeu_si128((__m128i *)(sub + ((p * ng + g) * 12 + (size_t)i) * 16), t[4 + i]);
}

/* The codes of super-block g of 8 rows s[] (Q4_K, Q5_K, Q6_K): its 8 blocks' qs lines at q
 * (block j at q + 256 j) and bit planes at h (block j at h + 64 planes j). */
static inline XQ_AI void xk_repack_super8(const int F, const uint8_t *const *s, uint8_t *q,
                                          uint8_t *h)
{
    const size_t hb = 64 * (size_t)XK_PLANES(F);
    __m256i c[8];
    if (F == XK_Q6_K) {
        /* half hf (blocks 4 hf + sq): ql runs A = ql[64 hf ..], B = ql[64 hf + 32 ..], qh run
         * Q = qh[32 hf ..]; block sq: low 4 bits in A (sq = 0), B (1), A >> 4 (2), B >> 4 (3),
         * bits 4, 5 in bits 2 sq, 2 sq + 1 of Q */
        for (int hf = 0; hf < 2; hf++) {
            __m256i qh[8];
            xk_transpose8(s, 128 + 32 * (size_t)hf, qh);
            for (int half = 0; half < 2; half++) {
                xk_transpose8(s, 64 * (size_t)hf + 32 * (size_t)half, c);
                for (int nib = 0; nib < 2; nib++) {
                    const int sq = 2 * nib + half;
                    const size_t j = 4 * (size_t)hf + (size_t)sq;
                    xk_store_qs(c, 4 * nib, q + 256 * j);
                    xk_store_plane(qh, 2 * sq, h + hb * j);
                    xk_store_plane(qh, 2 * sq + 1, h + hb * j + 64);
                }
            }
        }
        return;
    }
    /* Q4_K, Q5_K: run m = qs[32 m ..] holds block 2m in its low nibbles, 2m + 1 in its high
     * ones; Q5_K: bit j of the run qh is bit 4 of block j */
    const size_t qs_at = F == XK_Q4_K ? 16 : 48;
    if (F == XK_Q5_K) {
        __m256i qh[8];
        xk_transpose8(s, 16, qh);
        for (int j = 0; j < 8; j++)
            xk_store_plane(qh, j, h + hb * (size_t)j);
    }
    for (int m = 0; m < 4; m++) {
        xk_transpose8(s, qs_at + 32 * (size_t)m, c);
        xk_store_qs(c, 0, q + 256 * (2 * (size_t)m));
        xk_store_qs(c, 4, q + 256 * (2 * (size_t)m + 1));
    }
}

/* Each nibble i of x (32 bits) in the low nibble of byte i of the result. */
static inline XQ_AI uint64_t xk_spread_nibbles(uint32_t x)
{
    uint64_t v = x;
    v = (v | v << 16) & 0x0000ffff0000ffffull;
    v = (v | v << 8) & 0x00ff00ff00ff00ffull;
    return (v | v << 4) & 0x0f0f0f0f0f0f0f0full;
}

/* The codes of block b of the 16 rows blk[] (Q5_0, Q5_1): qs lines at q, the bit plane at h. */
static inline XQ_AI void xk_repack_block5(const int F, const uint8_t *const *blk, uint8_t *q,
                                          uint8_t *h)
{
    const size_t start = F == XK_Q5_0 ? 2 : 4; /* qh (32 bits: bit i for value i), then qs */
    for (int r = 0; r < 16; r++)
        for (int jj = 0; jj < 4; jj++)
            memcpy(q + 64 * jj + 4 * r, blk[r] + start + 4 + 4 * jj, 4);
    /* line l of the plane is nibble l of qh, row r at bits 4r..4r+3 */
    for (int k = 0; k < 8; k++) {
        uint32_t even, odd;
        memcpy(&even, blk[2 * k] + start, 4);
        memcpy(&odd, blk[2 * k + 1] + start, 4);
        const uint64_t w = xk_spread_nibbles(even) | xk_spread_nibbles(odd) << 4;
        for (int l = 0; l < 8; l++)
            h[8 * l + k] = (uint8_t)(w >> (8 * l));
    }
}

/* Panel p of a codec weight [n, K] from its rows of GGUF blocks (row r at raw + r * row_bytes):
 * every byte of the panel's qs, high, scales, mins, sub (the rows past n: codes and fields 0). */
static inline XQ_AI void xk_repack_panel_f(const int F, const uint8_t *raw, size_t row_bytes,
                                           size_t n, size_t K, size_t p, uint8_t *qs,
                                           uint8_t *high, uint8_t *scales, uint8_t *mins,
                                           uint8_t *sub)
{
    const size_t nb = K / 32, ng = K / XK_GGUF_VALUES(F), hb = 64 * (size_t)XK_PLANES(F);
    const uint8_t *row[16];
    for (size_t r = 0; r < 16; r++)
        row[r] = 16 * p + r < n ? raw + (16 * p + r) * row_bytes : NULL;
    for (size_t g = 0; g < ng; g++) {
        const uint8_t *blk[16];
        for (int r = 0; r < 16; r++)
            blk[r] = row[r] ? row[r] + g * XK_GGUF_BYTES(F) : xk_zero_block;
        const size_t b = g * XK_GGUF_VALUES(F) / 32; /* the first 32-value block */
        uint8_t *q = qs + (p * nb + b) * 256;
        uint8_t *h = hb ? high + (p * nb + b) * hb : NULL;
        if (XK_SUPER(F)) {
            xk_repack_super8(F, blk, q, h);
            xk_repack_super8(F, blk + 8, q + 32, h ? h + 4 : NULL);
        } else {
            xk_repack_block5(F, blk, q, h);
        }
        xk_repack_fields(F, blk, p, ng, g, scales, mins, sub);
    }
}

static void xk_repack_panel(int F, const uint8_t *raw, size_t row_bytes, size_t n, size_t K,
                            size_t p, uint8_t *qs, uint8_t *high, uint8_t *scales, uint8_t *mins,
                            uint8_t *sub)
{
#define XK_REPACK(C) xk_repack_panel_f(C, raw, row_bytes, n, K, p, qs, high, scales, mins, sub)
    switch (F) {
    case XK_Q5_0: XK_REPACK(XK_Q5_0); break;
    case XK_Q5_1: XK_REPACK(XK_Q5_1); break;
    case XK_Q4_K: XK_REPACK(XK_Q4_K); break;
    case XK_Q5_K: XK_REPACK(XK_Q5_K); break;
    case XK_Q6_K: XK_REPACK(XK_Q6_K); break;
    default: break;
    }
}

#endif /* XLLM_GEMM_K_H */
