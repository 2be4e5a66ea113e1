/* Y [M, N] = X [M, K] W~^T + b for many activation rows (a prompt) and an int4 weight in gemv.c's block
 * rows, multiplied in 8-bit integers: the prefill counterpart of gemv.c, for CPUs with AVX2 but neither
 * bf16 nor VNNI dot products.
 *
 * Why: there a float32 GEMM is bound by two 8-lane FMA pipes, and a quantized model's prompt was as fast
 * as a float one (dequantize, then oneDNN). vpmaddubsw multiplies 32 byte pairs per instruction; with
 * codes 0..15 and activations quantized per block of 32 to int8 (as gemv.c and llama.cpp's q8_0 do), eight
 * of its int16 pair sums can be added before they could overflow (8 * 2 * 15 * 127 = 30480), so a whole
 * block costs one madd to int32 per output lane. gpt2's prefill shapes on a Zen 5 core pair with AVX2:
 * 270-280 GOP/s against oneDNN's 200-210 GFLOP/s float32 (docs/benchmarks.md).
 *
 * Per block of 32 the product is s * xs * sum_j c[j] xq[j] - m * xsum (gemv.c's header). The kernel takes
 * 8 output columns at a time: their blocks are first copied into a small buffer laid out as 4 vectors per
 * block, vector i holding bytes 4i..4i+3 of each column's 16 code bytes (low nibbles: codes 4i..4i+3, high
 * nibbles: codes 16+4i..16+4i+3), and their fp16 scales widened to float; then every group of 4 rows runs
 * through them. Threads split the column groups.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>

/* rows of activations per tile: 4 int16 and 4 float accumulators, 3 code vectors and 2 constants fit
 * AVX2's 16 registers */
#define TILE_ROWS 4

/* Copy the blocks of columns n0 .. n0 + 7 (fewer at the edge: zeros) into the tile layout. */
static void pack_columns(const uint8_t *blocks, int N, int nb, int n0, uint32_t *codes, float *s, float *m) {
    const size_t row_bytes = (size_t)nb * 20;
    for (int c = 0; c < 8; c++) {
        const int n = n0 + c;
        if (n >= N) {
            for (int b = 0; b < nb; b++) {
                for (int i = 0; i < 4; i++) codes[(b * 4 + i) * 8 + c] = 0;
                s[b * 8 + c] = m[b * 8 + c] = 0.0f;
            }
            continue;
        }
        const uint8_t *row = blocks + (size_t)n * row_bytes;
        const uint16_t *d = (const uint16_t *)row, *z = d + nb;
        const uint8_t *qs = (const uint8_t *)(z + nb);
        for (int b = 0; b < nb; b++) {
            uint32_t w[4];
            memcpy(w, qs + 16 * b, 16);
            for (int i = 0; i < 4; i++) codes[(b * 4 + i) * 8 + c] = w[i];
            s[b * 8 + c] = _cvtsh_ss(d[b]);
            m[b * 8 + c] = _cvtsh_ss(z[b]);
        }
    }
}

static inline __m256i bcast4(const int8_t *p) {
    int32_t t;
    memcpy(&t, p, 4);
    return _mm256_set1_epi32(t);
}

/* out[r][0..7] = the 8 columns' sums for R <= TILE_ROWS activation rows (R is a constant at each call) */
static inline __attribute__((always_inline)) void tile(const uint32_t *codes, const float *s, const float *m,
                                                         int nb, const int8_t *xq, int K, const float *xs,
                                                         const float *xsum, __m256 *out, const int R) {
    const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(0x0F);
    __m256 f[TILE_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) f[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i a[TILE_ROWS];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) a[r] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(codes + (b * 4 + i) * 8));
            const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const int8_t *x = xq + (size_t)r * K + 32 * b + 4 * i;
                a[r] = _mm256_add_epi16(a[r], _mm256_maddubs_epi16(lo, bcast4(x)));
                a[r] = _mm256_add_epi16(a[r], _mm256_maddubs_epi16(hi, bcast4(x + 16)));
            }
        }
        const __m256 sb = _mm256_loadu_ps(s + 8 * b), mb = _mm256_loadu_ps(m + 8 * b);
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(a[r], ones));
            f[r] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sb, _mm256_broadcast_ss(xs + (size_t)r * nb + b)), f[r]);
            f[r] = _mm256_fnmadd_ps(mb, _mm256_broadcast_ss(xsum + (size_t)r * nb + b), f[r]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) out[r] = f[r];
}

static void store(float *y, int N, int n0, __m256 v, const float *bias) {
    float t[8];
    _mm256_storeu_ps(t, v);
    const int w = N - n0 < 8 ? N - n0 : 8;
    for (int c = 0; c < w; c++) y[n0 + c] = t[c] + (bias ? bias[n0 + c] : 0.0f);
}

/* 0 on success, 2 when out of memory. */
int gpt2kit_int4_gemm(const uint8_t *blocks, int N, int K, const float *x, int M, const float *bias, float *y,
                      int threads) {
    const int nb = K / 32, groups = (N + 7) / 8;
    int8_t *xq = (int8_t *)malloc((size_t)M * K + 2 * (size_t)K * threads);
    float *xs = (float *)malloc(sizeof(float) * 2 * (size_t)M * nb);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return 2;
    }
    float *xsum = xs + (size_t)M * nb;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num();
#else
        const int t = 0;
#endif
        int8_t *scratch = xq + (size_t)M * K + 2 * (size_t)K * t; /* gk_q8_quantize's other two orders */
#pragma omp for schedule(static)
        for (int r = 0; r < M; r++)
            gk_q8_quantize(x + (size_t)r * K, K, xq + (size_t)r * K, scratch, scratch + K, xs + (size_t)r * nb,
                           xsum + (size_t)r * nb);
        uint32_t *codes = (uint32_t *)malloc(sizeof(uint32_t) * 32 * (size_t)nb);
        float *s = (float *)malloc(sizeof(float) * 16 * (size_t)nb);
        if (gk_all_allocated(codes && s, &failed)) {
#pragma omp for schedule(static)
            for (int g = 0; g < groups; g++) {
                pack_columns(blocks, N, nb, 8 * g, codes, s, s + 8 * (size_t)nb);
                __m256 out[TILE_ROWS];
                int r = 0;
                for (; r + TILE_ROWS <= M; r += TILE_ROWS) {
                    tile(codes, s, s + 8 * (size_t)nb, nb, xq + (size_t)r * K, K, xs + (size_t)r * nb,
                         xsum + (size_t)r * nb, out, TILE_ROWS);
                    for (int j = 0; j < TILE_ROWS; j++) store(y + (size_t)(r + j) * N, N, 8 * g, out[j], bias);
                }
                for (; r < M; r++) {
                    tile(codes, s, s + 8 * (size_t)nb, nb, xq + (size_t)r * K, K, xs + (size_t)r * nb,
                         xsum + (size_t)r * nb, out, 1);
                    store(y + (size_t)r * N, N, 8 * g, out[0], bias);
                }
            }
        }
        free(codes);
        free(s);
    }
    free(xq);
    free(xs);
    return failed ? 2 : 0;
}

int gpt2kit_int4_gemm_available(void) { return 1; }

#else

int gpt2kit_int4_gemm(const uint8_t *blocks, int N, int K, const float *x, int M, const float *bias, float *y,
                      int threads) {
    (void)blocks, (void)N, (void)K, (void)x, (void)M, (void)bias, (void)y, (void)threads;
    return 1;
}

int gpt2kit_int4_gemm_available(void) { return 0; }

#endif
