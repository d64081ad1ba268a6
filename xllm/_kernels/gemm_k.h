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
        __m##P##i c12 = _mm##P##_add_epi32(_mm##P##_slli_epi32(D[0][i], 8), D[1][i]);           \
        __m##P v = _mm##P##_cvtepi32_ps(c12);                                                    \
        if (PARTS == 3) v = _mm##P##_fmadd_ps(_mm##P##_cvtepi32_ps(D[2][i]), inv256, v);        \
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
        if (nt == 1) { /* stream this panel, about XQ_PF bytes ahead */
            for (size_t i = 0; i < 256; i += 64)
                _mm_prefetch((const char *)blk + XQ_PF + i, _MM_HINT_T0);
            for (size_t i = 0; i < hb; i += 64)
                _mm_prefetch((const char *)hbk + XQ_PF / 4 * XK_PLANES(F) + i, _MM_HINT_T0);
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
    const __mmask16 valid = (__mmask16)((1u << nr) - 1);
    for (int i = 0; i < MR; i++) {
        float *o = out + i * ldo;
        if (accum)
            acc[i] = _mm512_add_ps(_mm512_maskz_loadu_ps(valid, o), acc[i]);
        _mm512_mask_storeu_ps(o, valid, acc[i]);
    }
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

/* AVX2 micro-kernel of codec F: MR rows of x against half h (rows 8h..8h+7) of panel p. */
static inline XQ_AI void xk_mk256(const int MR, const int F, const int PARTS, const xq_weights *w,
                                  size_t p, int h, const xq_xb *x, const xq_xh *xh, float *out,
                                  size_t ldo, size_t nr, int accum)
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
#define XK_CASE512(R)                                                                            \
    case R:                                                                                      \
        xk_mk512(R, F, PARTS, w, p, x + m * w->nb, xh + m * w->nb, out + m * ldo, ldo, nr,      \
                 accum, t, nt);                                                                  \
        break;
        switch (r) {
        XK_CASE512(1) XK_CASE512(2) XK_CASE512(3) XK_CASE512(4) XK_CASE512(5) XK_CASE512(6)
        default: break;
        }
    }
}

static XQ_T512 void xk_panel512(const xq_weights *w, size_t p, const xq_xb *x, const xq_xh *xh,
                                size_t M, float *out, size_t ldo, size_t nr, int accum)
{
#define XK_ROWS512(F) (w->parts == 2 ? xk_rows512(F, 2, w, p, x, xh, M, out, ldo, nr, accum)   \
                                     : xk_rows512(F, 3, w, p, x, xh, M, out, ldo, nr, accum))
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
    xk_mk256(R, F, PARTS, w, p, h, x + m * w->nb, xh + m * w->nb, out + m * ldo, ldo, nh, accum)
        for (; m + XQ_MR256 <= M; m += XQ_MR256)
            XK_MK256(XQ_MR256);
        if (M > m)
            XK_MK256(1);
    }
}

static void xk_panel256(const xq_weights *w, size_t p, const xq_xb *x, const xq_xh *xh, size_t M,
                        float *out, size_t ldo, size_t nr, int accum)
{
#define XK_ROWS256(F) (w->parts == 2 ? xk_rows256(F, 2, w, p, x, xh, M, out, ldo, nr, accum)   \
                                     : xk_rows256(F, 3, w, p, x, xh, M, out, ldo, nr, accum))
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

/* ---- repacking at load: GGUF blocks -> the codec layout (layout.py; reference.repack_codec) */

/* Bytes of one GGUF block of codec F and values per block. */
#define XK_GGUF_BYTES(F)                                                                         \
    ((F) == XK_Q5_0 ? 22 : (F) == XK_Q5_1 ? 24 : (F) == XK_Q4_K ? 144 : (F) == XK_Q5_K ? 176 : 210)
#define XK_GGUF_VALUES(F) (XK_SUPER(F) ? 256 : 32)

/* The 32 unsigned codes c of block b (32 values) of a row of GGUF blocks (ggml's block_q5_0 ...
 * block_q6_K layouts). */
static inline XQ_AI void xk_gguf_codes(const int F, const uint8_t *row, size_t b, uint8_t *c)
{
    if (!XK_SUPER(F)) {
        const uint8_t *blk = row + b * XK_GGUF_BYTES(F);
        const size_t start = F == XK_Q5_0 ? 2 : 4; /* after d (and m) */
        uint32_t qh;
        memcpy(&qh, blk + start, 4);
        const uint8_t *qs = blk + start + 4; /* value i: low nibble of qs[i]; 16 + i: high */
        for (int i = 0; i < 16; i++) {
            c[i] = (uint8_t)((qs[i] & 15) | ((qh >> i) & 1) << 4);
            c[16 + i] = (uint8_t)((qs[i] >> 4) | ((qh >> (16 + i)) & 1) << 4);
        }
        return;
    }
    const uint8_t *blk = row + (b / 8) * XK_GGUF_BYTES(F);
    const int j = (int)(b % 8);
    if (F == XK_Q6_K) {
        /* halves of 128 values (ql [128], qh [64]); value 32 s + i of half h (s = 0..3): low 4
         * bits in ql[64 h + 32 (s % 2) + i], nibble s / 2; high 2 bits in qh[32 h + i], bits
         * 2 s, 2 s + 1 */
        const int h = j / 4, sq = j % 4;
        const uint8_t *ql = blk + 64 * h + 32 * (sq % 2), *qh = blk + 128 + 32 * h;
        for (int i = 0; i < 32; i++)
            c[i] = (uint8_t)(((ql[i] >> (4 * (sq / 2))) & 15) | ((qh[i] >> (2 * sq)) & 3) << 4);
        return;
    }
    /* Q4_K, Q5_K: values 64 m + i (i < 32) in the low nibbles of qs[32 m + i], 64 m + 32 + i in
     * the high ones; Q5_K: bit j of qh[i] is bit 4 of value 32 j + i */
    const uint8_t *qs = blk + (F == XK_Q4_K ? 16 : 48), *qh = blk + 16;
    for (int i = 0; i < 32; i++) {
        c[i] = (uint8_t)((qs[32 * (j / 2) + i] >> (4 * (j % 2))) & 15);
        if (F == XK_Q5_K)
            c[i] |= (uint8_t)(((qh[i] >> j) & 1) << 4);
    }
}

/* Panel p of a codec weight [n, K] from its rows of GGUF blocks (row r at raw + r * row_bytes),
 * into arrays zeroed beforehand (the bit planes are ORed in; rows past n stay 0). */
static inline XQ_AI void xk_repack_panel_f(const int F, const uint8_t *raw, size_t row_bytes,
                                           size_t n, size_t K, size_t p, uint8_t *qs,
                                           uint8_t *high, uint8_t *scales, uint8_t *mins,
                                           uint8_t *sub)
{
    const size_t nb = K / 32, ng = K / XK_GGUF_VALUES(F), planes = (size_t)XK_PLANES(F);
    const size_t sub_rows = F == XK_Q6_K ? 16 : 12;
    for (size_t lane = 0; lane < 16 && 16 * p + lane < n; lane++) {
        const uint8_t *row = raw + (16 * p + lane) * row_bytes;
        for (size_t b = 0; b < nb; b++) {
            uint8_t c[32];
            xk_gguf_codes(F, row, b, c);
            uint8_t *q = qs + (p * nb + b) * 256 + 4 * lane;
            for (int j = 0; j < 4; j++)
                for (int t = 0; t < 4; t++)
                    q[64 * j + t] = (uint8_t)((c[4 * j + t] & 15) | (c[16 + 4 * j + t] & 15) << 4);
            uint8_t *h = planes ? high + (p * nb + b) * 64 * planes : NULL;
            /* the 4 bits of this row in each line's mask: bits 4 lane .. 4 lane + 3 */
            const size_t at = lane / 2, shift = 4 * (lane % 2);
            for (size_t e = 0; e < planes; e++)
                for (int l = 0; l < 8; l++) {
                    const uint8_t *v = c + (l < 4 ? 4 * l : 16 + 4 * (l - 4));
                    unsigned nib = 0;
                    for (int t = 0; t < 4; t++)
                        nib |= ((v[t] >> (4 + e)) & 1u) << t;
                    h[64 * e + 8 * (size_t)l + at] |= (uint8_t)(nib << shift);
                }
        }
        for (size_t g = 0; g < ng; g++) {
            const uint8_t *blk = row + g * XK_GGUF_BYTES(F);
            const size_t at = ((p * ng + g) * 16 + lane) * 2;
            memcpy(scales + at, blk + (F == XK_Q6_K ? 208 : 0), 2);
            if (XK_ASYM(F))
                memcpy(mins + at, blk + 2, 2);
            if (XK_SUPER(F))
                for (size_t i = 0; i < sub_rows; i++)
                    sub[((p * ng + g) * sub_rows + i) * 16 + lane] =
                        blk[(F == XK_Q6_K ? 192 : 4) + i];
        }
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
