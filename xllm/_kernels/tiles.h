/* Tile operations of AMX, in two implementations within one build (included by gemm_amx.h and
 * gemm_amx_bf16.h; docs/amx.rst): the AMX instructions, and a scalar model of them on a
 * thread-local copy of the eight tile registers ("emulated"). The kernels are written once
 * against the XA_* macros, whose first argument HW (a compile-time constant) picks one: 1 the
 * instructions, run only where _cpu.features()["amx"] says the CPU has AMX and Linux granted
 * this process the tile state; 0 the model, which any CPU with AVX-512 runs. Operations: config
 * (ldtilecfg), release, zero, load, store, the int8 dot products dpbssd, dpbsud, dpbusd, dpbuud
 * and the bfloat16 one dpbf16ps.
 */
#ifndef XLLM_TILES_H
#define XLLM_TILES_H

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Every function of the tile kernels: AVX-512 for the epilogue, AMX for the HW = 1 tile
 * operations (the HW = 0 instantiation contains no tile instruction that can run: its XA_*
 * operations are the scalar model). */
#define XA_T __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,"     \
                                   "amx-tile,amx-int8,amx-bf16")))

/* The 64-byte operand of ldtilecfg (palette 1: 8 tiles of up to 16 rows of 64 bytes). */
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16]; /* bytes per row of tile t (tiles 8..15 unused: 0) */
    uint8_t rows[16];
} xa_config;

/* The emulated tile registers of one thread, and the configuration they obey. */
typedef struct {
    xa_config cfg;
    int configured;
    uint8_t tmm[8][16][64];
} xa_emu_tiles;

static __thread xa_emu_tiles xa_emu;

/* What the hardware does on a tile instruction it refuses (#UD: the process gets SIGILL): an
 * unconfigured tile state, a tile number past 7 or a tile shape the operation does not accept.
 * The kernels below never do this; the model traps as the hardware would rather than compute
 * something the hardware would not. */
static void xa_emu_fault(void)
{
    __builtin_trap();
}

/* ldtilecfg: the shapes of the tiles, all tiles zeroed. */
static void xa_emu_config(const xa_config *c)
{
    if (c->palette != 1)
        xa_emu_fault();
    for (int t = 0; t < 8; t++)
        if (c->rows[t] > 16 || c->colsb[t] > 64)
            xa_emu_fault();
    xa_emu.cfg = *c;
    xa_emu.configured = 1;
    memset(xa_emu.tmm, 0, sizeof xa_emu.tmm);
}

/* tilerelease: back to the initial (unconfigured) state. */
static void xa_emu_release(void)
{
    memset(&xa_emu.cfg, 0, sizeof xa_emu.cfg);
    xa_emu.configured = 0;
    memset(xa_emu.tmm, 0, sizeof xa_emu.tmm);
}

static void xa_emu_check(int t)
{
    if (!xa_emu.configured || t < 0 || t > 7 || xa_emu.cfg.rows[t] == 0)
        xa_emu_fault();
}

/* tilezero */
static void xa_emu_zero(int t)
{
    xa_emu_check(t);
    memset(xa_emu.tmm[t], 0, sizeof xa_emu.tmm[t]);
}

/* tileloadd: row r from base + r * stride, colsb bytes; the rest of the tile zeroed. */
static void xa_emu_load(int t, const void *base, size_t stride)
{
    xa_emu_check(t);
    memset(xa_emu.tmm[t], 0, sizeof xa_emu.tmm[t]);
    for (int r = 0; r < xa_emu.cfg.rows[t]; r++)
        memcpy(xa_emu.tmm[t][r], (const uint8_t *)base + (size_t)r * stride, xa_emu.cfg.colsb[t]);
}

/* tilestored: row r to base + r * stride, colsb bytes. */
static void xa_emu_store(int t, void *base, size_t stride)
{
    xa_emu_check(t);
    for (int r = 0; r < xa_emu.cfg.rows[t]; r++)
        memcpy((uint8_t *)base + (size_t)r * stride, xa_emu.tmm[t][r], xa_emu.cfg.colsb[t]);
}

/* The shapes a tile dot product accepts: C [m, 4n], A [m, 4k], B [k, 4n] (bytes per row). */
static void xa_emu_check_dot(int c, int a, int b)
{
    xa_emu_check(c);
    xa_emu_check(a);
    xa_emu_check(b);
    const xa_config *g = &xa_emu.cfg;
    if (c == a || c == b || a == b || g->rows[a] != g->rows[c] || g->colsb[b] != g->colsb[c] ||
        4 * g->rows[b] != g->colsb[a] || g->colsb[a] % 4 || g->colsb[c] % 4)
        xa_emu_fault();
}

/* tdpb{s,u}{s,u}d: C[m][n] += the dot of 4 bytes of A's row m (signed if SA) and 4 bytes of
 * B's row kk at column n (signed if SB), for each kk, in 32-bit wraparound arithmetic (the sums
 * are exact; overflow wraps as the hardware's does). */
static void xa_emu_dot8(int c, int a, int b, int sa, int sb)
{
    xa_emu_check_dot(c, a, b);
    const int M = xa_emu.cfg.rows[c], N = xa_emu.cfg.colsb[c] / 4, K = xa_emu.cfg.colsb[a] / 4;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            uint32_t s;
            memcpy(&s, &xa_emu.tmm[c][m][4 * n], 4);
            for (int kk = 0; kk < K; kk++)
                for (int i = 0; i < 4; i++) {
                    const uint8_t ua = xa_emu.tmm[a][m][4 * kk + i];
                    const uint8_t ub = xa_emu.tmm[b][kk][4 * n + i];
                    const int32_t va = sa ? (int32_t)(int8_t)ua : (int32_t)ua;
                    const int32_t vb = sb ? (int32_t)(int8_t)ub : (int32_t)ub;
                    s += (uint32_t)(va * vb);
                }
            memcpy(&xa_emu.tmm[c][m][4 * n], &s, 4);
        }
}

/* A bfloat16 as float32, denormals as zero (the hardware's DAZ). */
static float xa_emu_bf16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    uint32_t u = (uint32_t)h << 16;
    if ((u & 0x7f800000u) == 0)
        u &= 0x80000000u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A float32 denormal result flushed to zero of its sign (the hardware's FTZ). */
static float xa_emu_ftz(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7f800000u) == 0)
        u &= 0x80000000u;
    memcpy(&f, &u, 4);
    return f;
}

/* tdpbf16ps, as Intel's pseudo-code describes it: for each C[m][n] (float32), for kk in
 * increasing order, C += A[m][2kk] * B[kk][2n], then C += A[m][2kk + 1] * B[kk][2n + 1], each a
 * float32 fused multiply-add rounded to nearest even (a product of two bfloat16 is exact in
 * float32, so fused or not is the same), inputs and results with denormals as zero. The model
 * of the hardware, not a measurement of it: the tests of the tile bf16 kernel compare within a
 * tolerance, never bits. */
static void xa_emu_dotbf16(int c, int a, int b)
{
    xa_emu_check_dot(c, a, b);
    const int M = xa_emu.cfg.rows[c], N = xa_emu.cfg.colsb[c] / 4, K = xa_emu.cfg.colsb[a] / 4;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            float s;
            memcpy(&s, &xa_emu.tmm[c][m][4 * n], 4);
            for (int kk = 0; kk < K; kk++)
                for (int i = 0; i < 2; i++) {
                    const float va = xa_emu_bf16(&xa_emu.tmm[a][m][4 * kk + 2 * i]);
                    const float vb = xa_emu_bf16(&xa_emu.tmm[b][kk][4 * n + 2 * i]);
                    s = xa_emu_ftz(__builtin_fmaf(va, vb, s));
                }
            memcpy(&xa_emu.tmm[c][m][4 * n], &s, 4);
        }
}

/* The tile operations for the kernels: HW a compile-time constant (1: the AMX instruction, 0:
 * the model above); tile numbers T, C, A, B literal digits (the instructions encode them). */
#define XA_CONFIG(HW, cfg)                                                                       \
    do {                                                                                         \
        if (HW) _tile_loadconfig(cfg); else xa_emu_config(cfg);                                  \
    } while (0)
#define XA_RELEASE(HW)                                                                           \
    do {                                                                                         \
        if (HW) _tile_release(); else xa_emu_release();                                          \
    } while (0)
#define XA_ZERO(HW, T)                                                                           \
    do {                                                                                         \
        if (HW) _tile_zero(T); else xa_emu_zero(T);                                              \
    } while (0)
#define XA_LOAD(HW, T, base, stride)                                                             \
    do {                                                                                         \
        if (HW) _tile_loadd(T, base, stride); else xa_emu_load(T, base, stride);                 \
    } while (0)
#define XA_STORE(HW, T, base, stride)                                                            \
    do {                                                                                         \
        if (HW) _tile_stored(T, base, stride); else xa_emu_store(T, base, stride);               \
    } while (0)
#define XA_DPBSSD(HW, C, A, B)                                                                   \
    do {                                                                                         \
        if (HW) _tile_dpbssd(C, A, B); else xa_emu_dot8(C, A, B, 1, 1);                          \
    } while (0)
#define XA_DPBSUD(HW, C, A, B)                                                                   \
    do {                                                                                         \
        if (HW) _tile_dpbsud(C, A, B); else xa_emu_dot8(C, A, B, 1, 0);                          \
    } while (0)
#define XA_DPBUSD(HW, C, A, B)                                                                   \
    do {                                                                                         \
        if (HW) _tile_dpbusd(C, A, B); else xa_emu_dot8(C, A, B, 0, 1);                          \
    } while (0)
#define XA_DPBUUD(HW, C, A, B)                                                                   \
    do {                                                                                         \
        if (HW) _tile_dpbuud(C, A, B); else xa_emu_dot8(C, A, B, 0, 0);                          \
    } while (0)
#define XA_DPBF16PS(HW, C, A, B)                                                                 \
    do {                                                                                         \
        if (HW) _tile_dpbf16ps(C, A, B); else xa_emu_dotbf16(C, A, B);                           \
    } while (0)

/* One tile operation on the model, for its tests (qmatmul._emulated_tile_dot): C [M, 4N bytes]
 * op= A [M, 4K bytes] . B [K, 4N bytes], all row-major and contiguous, 1 <= M, K, N <= 16; op 0
 * dpbssd, 1 dpbsud, 2 dpbusd, 3 dpbuud, 4 dpbf16ps. Tiles 0 (C), 1 (A), 2 (B). */
static void xa_emu_tile_dot(int op, int M, int K, int N, const void *a, const void *b, void *c)
{
    xa_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    cfg.rows[0] = (uint8_t)M;
    cfg.colsb[0] = (uint16_t)(4 * N);
    cfg.rows[1] = (uint8_t)M;
    cfg.colsb[1] = (uint16_t)(4 * K);
    cfg.rows[2] = (uint8_t)K;
    cfg.colsb[2] = (uint16_t)(4 * N);
    XA_CONFIG(0, &cfg);
    XA_LOAD(0, 0, c, 4 * (size_t)N);
    XA_LOAD(0, 1, a, 4 * (size_t)K);
    XA_LOAD(0, 2, b, 4 * (size_t)N);
    switch (op) {
    case 0: XA_DPBSSD(0, 0, 1, 2); break;
    case 1: XA_DPBSUD(0, 0, 1, 2); break;
    case 2: XA_DPBUSD(0, 0, 1, 2); break;
    case 3: XA_DPBUUD(0, 0, 1, 2); break;
    default: XA_DPBF16PS(0, 0, 1, 2); break;
    }
    XA_STORE(0, 0, c, 4 * (size_t)N);
    XA_RELEASE(0);
}

#endif /* XLLM_TILES_H */
