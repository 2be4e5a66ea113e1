/* Row kernels shared between gpt2kit's C files (gemv.c, gemv_int8.c, decode_step.c). */
#ifndef GPT2KIT_KERNELS_H
#define GPT2KIT_KERNELS_H
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>

/* the sum of a vector's 8 floats */
static inline float gk_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Inside an OpenMP parallel region: whether every thread's scratch allocations succeeded (`mine`: this
 * thread's), so that all threads skip the work together; `failed` is shared and 0 before. A barrier. */
static inline int gk_all_allocated(int mine, int *failed) {
    if (!mine) {
#pragma omp atomic write
        *failed = 1;
    }
#pragma omp barrier
    int bad;
#pragma omp atomic read
    bad = *failed;
    return !bad;
}

/* An activation row quantized per block of 32 to int8 (gemv.c): codes xq, their AVX2 and AVX-512 orders
 * xp and x4 (cols bytes each), per-block scale xs and scale * sum of codes xsum (cols / 32 floats each). */
void gk_q8_quantize(const float *x, int cols, int8_t *xq, int8_t *xp, int8_t *x4, float *xs, float *xsum);

/* One output of an int4 row in gemv.c's block layout (nb blocks) against a quantized activation; sc is
 * scratch for nb floats. */
float gk_int4_row_dot(const uint8_t *row, int nb, const int8_t *xq, const int8_t *xp, const int8_t *x4,
                      const float *xs, const float *xsum, float *sc);

/* One output of an int8 row (signed codes c - 128, one per byte, cols a multiple of 32) against a
 * quantized activation, before the row's scale and zero point (gemv_int8.c): sum_b xs_b sum_j code_j xq_j
 * with the unsigned code; xs8 holds each block's xs eight times (cols / 4 floats). */
float gk_int8_row_dot(const int8_t *row, int cols, const int8_t *xq, const float *xs, const float *xs8);

/* xs8 for gk_int8_row_dot: each block's scale repeated 8 times. */
void gk_int8_expand_scales(const float *xs, int nb, float *xs8);

#endif
