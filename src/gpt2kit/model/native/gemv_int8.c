/* y = W~ x for one activation row and an int8 weight quantized per output row (gpt2kit.model.native):
 * W~[r, j] = (code[r, j] - z[r]) * s[r], codes held signed in memory (c - 128, gpt2kit.model.quantized).
 *
 * Why: a batch-1 decode step streams every weight once. fbgemm's dynamic int8 linear (what batch 1 used
 * before) keeps its own packed copy of every weight (a second 124 MB for gpt2) and quantizes the whole
 * activation row with one scale. Here the codes are read where they are, one byte per weight, and the
 * activation is quantized per block of 32 to int8 as for the int4 kernel (gemv.c), so
 *   sum_j W~[j] x[j] ~= s * (sum_b xs_b sum_{j in b} code_j xq_j  -  z * sum_b xsum_b).
 * The integer dot of a block is exact (u8 x s8 into int32); floats accumulate per lane, summed at the end.
 *
 * Paths (-march=native at first use): AVX-512 VNNI, 64 bytes (two blocks) per vpdpbusd; AVX-VNNI or
 * AVX-512VL VNNI on 256-bit registers; AVX2 without VNNI (maddubs on the low and high nibbles of each code,
 * which never saturates int16); portable C elsewhere.
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
#define I8_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define I8_AVX512_VNNI 1
#endif
#endif

#ifndef GPT2KIT_PREFETCH
#define GPT2KIT_PREFETCH 8192
#endif

void gk_int8_expand_scales(const float *xs, int nb, float *xs8) {
    for (int b = 0; b < nb; b++)
        for (int l = 0; l < 8; l++) xs8[8 * b + l] = xs[b];
}

#if defined(I8_AVX2)
/* sum of 4-byte groups of u (unsigned, any value) times s (signed), added to acc as int32 */
static inline __m256i dot_u8_s8_full(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    /* maddubs saturates int16 for u up to 255; each nibble (<= 15) times |s| <= 127, twice, fits */
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256i lo = _mm256_and_si256(u, low4), hi = _mm256_and_si256(_mm256_srli_epi16(u, 4), low4);
    __m256i plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, s), _mm256_set1_epi16(1));
    __m256i phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, s), _mm256_set1_epi16(16));
    return _mm256_add_epi32(acc, _mm256_add_epi32(plo, phi));
#endif
}
#endif

float gk_int8_row_dot(const int8_t *row, int cols, const int8_t *xq, const float *xs, const float *xs8) {
    int j = 0;
    float total = 0.0f;
#if defined(I8_AVX2)
#if defined(I8_AVX512_VNNI)
    {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        for (; j + 128 <= cols; j += 128) { /* four blocks, two independent chains */
            __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(row + j)), flip);
            __m512i u1 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(row + j + 64)), flip);
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_loadu_si512((const void *)(xq + j)));
            __m512i d1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u1, _mm512_loadu_si512((const void *)(xq + j + 64)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(xs8 + j / 4), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_loadu_ps(xs8 + j / 4 + 16), acc1);
        }
        for (; j + 64 <= cols; j += 64) {
            __m512i u0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(row + j)), flip);
            __m512i d0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_loadu_si512((const void *)(xq + j)));
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(xs8 + j / 4), acc0);
        }
        total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    }
#endif
    {
        const __m256i flip = _mm256_set1_epi8((char)0x80);
        __m256 acc = _mm256_setzero_ps();
        for (; j + 32 <= cols; j += 32) {
            __m256i u = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + j)), flip);
            __m256i d = dot_u8_s8_full(_mm256_setzero_si256(), u, _mm256_loadu_si256((const __m256i *)(xq + j)));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_loadu_ps(xs8 + j / 4), acc);
        }
        total += gk_hsum8(acc);
    }
#else
    (void)xs8;
    for (; j + 32 <= cols; j += 32) {
        int sum = 0;
        for (int k = 0; k < 32; k++) sum += ((int)row[j + k] + 128) * xq[j + k];
        total += xs[j / 32] * (float)sum;
    }
#endif
    return total;
}

/* y[r] = s[r] * (dot_r - z[r] * sum_b xsum_b) (+ bias[r]); cols a multiple of 32. 0, or -1 when out of memory. */
int gpt2kit_int8_gemv(const int8_t *codes, const float *scales, const uint8_t *zeros, const float *x,
                      const float *bias, float *y, int rows, int cols, int threads) {
    const int nb = cols / 32;
    int8_t *xq = (int8_t *)malloc(3 * (size_t)cols + (2 * (size_t)nb + 8 * (size_t)nb) * sizeof(float));
    if (!xq) return -1;
    int8_t *xp = xq + cols, *x4 = xp + cols;
    float *xs = (float *)(x4 + cols), *xsum = xs + nb, *xs8 = xsum + nb;
    gk_q8_quantize(x, cols, xq, xp, x4, xs, xsum);
    gk_int8_expand_scales(xs, nb, xs8);
    float zsum = 0.0f;
    for (int b = 0; b < nb; b++) zsum += xsum[b];
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const int8_t *w = codes + (size_t)r * cols;
#if GPT2KIT_PREFETCH > 0
        for (int off = 0; off < cols; off += 64) __builtin_prefetch(w + GPT2KIT_PREFETCH + off, 0, 1);
#endif
        const float v = scales[r] * (gk_int8_row_dot(w, cols, xq, xs, xs8) - (float)zeros[r] * zsum);
        y[r] = bias ? v + bias[r] : v;
    }
    free(xq);
    return 0;
}

/* W~ = (c - (z - 128)) * s for a whole int8 weight in gpt2kit's in-memory storage (signed codes c = code
 * - 128, float32 scales and uint8 zeros [rows, cols / group]) into out [rows, cols], float32: the same two
 * float32 operations as torch's dequantization, so bitwise equal. A prefill multiplies by the whole
 * matrix every forward; torch's version makes four passes over it (convert, subtract, multiply, copy). */
void gpt2kit_int8_dequantize(const int8_t *codes, const float *scales, const uint8_t *zeros, float *out,
                             int rows, int cols, int group, int threads) {
    const int groups = cols / group;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const int8_t *q = codes + (size_t)r * cols;
        float *o = out + (size_t)r * cols;
        for (int g = 0; g < groups; g++) {
            const float s = scales[(size_t)r * groups + g], z = (float)((int)zeros[(size_t)r * groups + g] - 128);
#pragma omp simd
            for (int j = g * group; j < (g + 1) * group; j++) o[j] = ((float)q[j] - z) * s;
        }
    }
}
