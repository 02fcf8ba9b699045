/*
 * Multi-head attention softmax(Q K^T * scale) V in bfloat16 for x86 CPUs with AVX512-BF16.
 *
 * Why by hand: PyTorch's CPU attention (flash and math paths alike) runs the two K = 64
 * products of a ViT or Point-MAE head at 15-20 % of this CPU kind's bf16 matmul rate, which
 * held both backbones near 40-45 % of the peak. Here one head's keys and values are repacked
 * once into the pair-interleaved layout VDPBF16PS reads, and every block of 48 queries runs
 * both products and the softmax between them out of the core's own caches.
 *
 * Numerics as PyTorch's bf16 flash attention: products accumulate in float32, the softmax is
 * float32 (max subtracted), the probabilities are rounded to bf16 for the product with V, and
 * the output is divided by the float32 row sum before it is rounded to bf16.
 *
 * Layouts: q, k, v, o are (B, H, N, 64) bf16 with any strides for B, H and N (the head
 * dimension contiguous). Work is cut into units (b * H + h) * blocks + query block, so any
 * number of threads can share one call (musc_attention_bf16 takes a range of units).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

typedef uint16_t bf16_t;

#define HEAD 64          /* head dimension supported */
#define PAIRS (HEAD / 2) /* bf16 pairs per head row (one VDPBF16PS lane each) */
#define QB 48            /* queries per block */
#define MR_QK 12         /* query rows per Q K^T register tile (x 32 keys) */
#define MR_PV 6          /* query rows per P V register tile (x 64 outputs) */
#define COLS 32          /* keys per Q K^T register tile; keys are padded to a multiple */

/* Rows of the packed buffers are padded by one cache line so that rows 4 KiB apart do not
 * fall into one L1 set (1024 keys would otherwise alias every row). */
#define PAD_U32 16

/* exp(x) for float32 lanes: Cody-Waite reduction by ln 2, degree-7 Taylor polynomial,
 * relative error below 2e-7 on [-87, 0] (the softmax only evaluates x <= 0). */
static inline __m512 exp_ps(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* S[r][n0 .. n0 + 32) = sum_k Q[r][k] K[n][k] for the mr rows of a tile.
 * kp: keys packed as [PAIRS][ldk] u32 (one bf16 pair of a key per u32). */
static inline __attribute__((always_inline)) void qk_tile(
    const bf16_t *q, int64_t q_row, const uint32_t *kp, int64_t ldk, int64_t n0, float *s,
    int64_t lds, const int mr) {
    __m512 acc[MR_QK][2];
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
        acc[r][0] = _mm512_setzero_ps();
        acc[r][1] = _mm512_setzero_ps();
    }
#pragma GCC unroll 4
    for (int p = 0; p < PAIRS; p++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kp + p * ldk + n0);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kp + p * ldk + n0 + 16);
#pragma GCC unroll 12
        for (int r = 0; r < mr; r++) {
            const __m512bh a =
                (__m512bh)_mm512_set1_epi32(((const uint32_t *)(q + r * q_row))[p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
        }
    }
#pragma GCC unroll 12
    for (int r = 0; r < mr; r++) {
        _mm512_storeu_ps(s + r * lds + n0, acc[r][0]);
        _mm512_storeu_ps(s + r * lds + n0 + 16, acc[r][1]);
    }
}

static void qk_rows(const bf16_t *q, int64_t q_row, const uint32_t *kp, int64_t ldk,
                    int64_t np, float *s, int64_t lds, int64_t rows) {
    for (int64_t n0 = 0; n0 < np; n0 += COLS) {
        int64_t r = 0;
        for (; r + MR_QK <= rows; r += MR_QK)
            qk_tile(q + r * q_row, q_row, kp, ldk, n0, s + r * lds, lds, MR_QK);
        switch (rows - r) {
#define QK_TAIL(m)                                                                   \
    case m:                                                                          \
        qk_tile(q + r * q_row, q_row, kp, ldk, n0, s + r * lds, lds, m);             \
        break;
            QK_TAIL(1) QK_TAIL(2) QK_TAIL(3) QK_TAIL(4) QK_TAIL(5) QK_TAIL(6)
            QK_TAIL(7) QK_TAIL(8) QK_TAIL(9) QK_TAIL(10) QK_TAIL(11)
#undef QK_TAIL
            default:
                break;
        }
    }
}

/* Rows of S (n valid keys of np) to probabilities: P = bf16(exp(scale * (s - max))), zero
 * beyond n; inv[r] = 1 / the float32 sum of the row's exponentials. */
static void softmax_rows(const float *s, int64_t lds, int64_t n, int64_t np, float scale,
                         bf16_t *pm, int64_t ldp, float *inv, int64_t rows) {
    const int64_t full = n / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (n - full)) - 1u);
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t r = 0; r < rows; r++) {
        const float *row = s + r * lds;
        bf16_t *out = pm + r * ldp;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        int64_t c = 0;
        for (; c < full; c += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(row + c));
        if (tail)
            vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, row + c));
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(vmax) * scale);
        __m512 vsum = _mm512_setzero_ps();
        for (c = 0; c < full; c += 16) {
            const __m512 e = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(row + c), vscale, shift));
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256((__m256i *)(out + c), (__m256i)_mm512_cvtneps_pbh(e));
        }
        if (tail) {
            __m512 e = exp_ps(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(tail, row + c), vscale, shift));
            e = _mm512_maskz_mov_ps(tail, e);
            vsum = _mm512_add_ps(vsum, e);
            _mm256_storeu_si256((__m256i *)(out + c), (__m256i)_mm512_cvtneps_pbh(e));
            c += 16;
        }
        for (; c < np; c += 16) _mm256_storeu_si256((__m256i *)(out + c), _mm256_setzero_si256());
        inv[r] = 1.0f / _mm512_reduce_add_ps(vsum);
    }
}

/* O[r][0 .. 64) = bf16(inv[r] * sum_n P[r][n] V[n][:]) for the mr rows of a tile.
 * vp: values packed as [np / 2][HEAD] u32 (rows 2j and 2j + 1 interleaved). */
static inline __attribute__((always_inline)) void pv_tile(
    const bf16_t *pm, int64_t ldp, int64_t np, const uint32_t *vp, const float *inv,
    bf16_t *o, int64_t o_row, const int mr) {
    __m512 acc[MR_PV][4];
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    const int64_t pairs = np / 2;
#pragma GCC unroll 2
    for (int64_t p = 0; p < pairs; p++) {
        const uint32_t *row = vp + p * HEAD;
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(row);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(row + 16);
        const __m512bh b2 = (__m512bh)_mm512_loadu_si512(row + 32);
        const __m512bh b3 = (__m512bh)_mm512_loadu_si512(row + 48);
#pragma GCC unroll 6
        for (int r = 0; r < mr; r++) {
            const __m512bh a =
                (__m512bh)_mm512_set1_epi32(((const uint32_t *)(pm + r * ldp))[p]);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
            acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
            acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
        }
    }
#pragma GCC unroll 6
    for (int r = 0; r < mr; r++) {
        const __m512 scale = _mm512_set1_ps(inv[r]);
        for (int j = 0; j < 4; j++) {
            const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], scale));
            _mm256_storeu_si256((__m256i *)(o + r * o_row + 16 * j), (__m256i)h);
        }
    }
}

static void pv_rows(const bf16_t *pm, int64_t ldp, int64_t np, const uint32_t *vp,
                    const float *inv, bf16_t *o, int64_t o_row, int64_t rows) {
    int64_t r = 0;
    for (; r + MR_PV <= rows; r += MR_PV)
        pv_tile(pm + r * ldp, ldp, np, vp, inv + r, o + r * o_row, o_row, MR_PV);
    switch (rows - r) {
#define PV_TAIL(m)                                                                   \
    case m:                                                                          \
        pv_tile(pm + r * ldp, ldp, np, vp, inv + r, o + r * o_row, o_row, m);        \
        break;
        PV_TAIL(1) PV_TAIL(2) PV_TAIL(3) PV_TAIL(4) PV_TAIL(5)
#undef PV_TAIL
        default:
            break;
    }
}

/* One head's keys as [PAIRS][ldk] u32 and values as [np / 2][HEAD] u32, zero-padded to np. */
static void pack_head(const bf16_t *kb, int64_t k_row, const bf16_t *vb, int64_t v_row,
                      int64_t n, int64_t np, uint32_t *kp, int64_t ldk, uint32_t *vp) {
    for (int64_t p = 0; p < PAIRS; p++) {
        uint32_t *dst = kp + p * ldk;
        for (int64_t j = 0; j < n; j++) dst[j] = ((const uint32_t *)(kb + j * k_row))[p];
        for (int64_t j = n; j < np; j++) dst[j] = 0;
    }
    for (int64_t p = 0; p < np / 2; p++) {
        uint32_t *dst = vp + p * HEAD;
        const int64_t r0 = 2 * p, r1 = 2 * p + 1;
        for (int j = 0; j < HEAD; j += 16) {
            const __m512i lo = r0 < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                            (const __m256i *)(vb + r0 * v_row + j)))
                                      : _mm512_setzero_si512();
            const __m512i hi = r1 < n ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                                            (const __m256i *)(vb + r1 * v_row + j)))
                                      : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* Query blocks per head for n tokens (units per (b, h) item). */
int64_t musc_attention_blocks(int64_t n) { return (n + QB - 1) / QB; }

/* The head dimension the kernel computes. */
int64_t musc_attention_head_dim(void) { return HEAD; }

/* Attention over work units [begin, end) of B * H * blocks (unit = item * blocks + block,
 * item = b * H + h). Strides in elements: qs, ks, vs, os = (batch, head, token).
 * Returns 0, 1 for an unsupported shape, 2 when memory could not be allocated. */
int musc_attention_bf16(const bf16_t *q, const bf16_t *k, const bf16_t *v, bf16_t *o,
                        int64_t heads, int64_t n, int64_t d, const int64_t *qs,
                        const int64_t *ks, const int64_t *vs, const int64_t *os, float scale,
                        int64_t begin, int64_t end) {
    if (d != HEAD || n < 1 || heads < 1) return 1;
    const int64_t blocks = musc_attention_blocks(n);
    const int64_t np = (n + COLS - 1) / COLS * COLS;
    const int64_t ldk = np + PAD_U32, lds = np + PAD_U32, ldp = np + 2 * PAD_U32;
    uint32_t *kp = aligned_alloc(64, (size_t)(ldk * PAIRS * 4));
    uint32_t *vp = aligned_alloc(64, (size_t)(np / 2 * HEAD * 4));
    float *s = aligned_alloc(64, (size_t)(QB * lds * 4));
    bf16_t *pm = aligned_alloc(64, (size_t)(QB * ldp * 2));
    float inv[QB];
    if (!kp || !vp || !s || !pm) {
        free(kp);
        free(vp);
        free(s);
        free(pm);
        return 2;
    }
    int64_t packed = -1;
    for (int64_t unit = begin; unit < end; unit++) {
        const int64_t item = unit / blocks, block = unit % blocks;
        const int64_t b = item / heads, h = item % heads;
        if (item != packed) {
            pack_head(k + b * ks[0] + h * ks[1], ks[2], v + b * vs[0] + h * vs[1], vs[2], n,
                      np, kp, ldk, vp);
            packed = item;
        }
        const int64_t q0 = block * QB;
        const int64_t rows = n - q0 < QB ? n - q0 : QB;
        qk_rows(q + b * qs[0] + h * qs[1] + q0 * qs[2], qs[2], kp, ldk, np, s, lds, rows);
        softmax_rows(s, lds, n, np, scale, pm, ldp, inv, rows);
        pv_rows(pm, ldp, np, vp, inv, o + b * os[0] + h * os[1] + q0 * os[2], os[2], rows);
    }
    free(kp);
    free(vp);
    free(s);
    free(pm);
    return 0;
}
