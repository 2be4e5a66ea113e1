/* y [M, N] = x [M, K] W^T + b for a float32 weight W [N, K] in its natural (nn.Linear) layout and a few
 * activation rows (M from 1 to a few dozen): the decode step of a batch of sequences (gpt2kit.model.native).
 *
 * Why: at 2-32 rows a decode step is still bound by reading the weights, but BLAS libraries treat it as a
 * general matrix product and pay for packing: torch's MKL sgemm ran the 16-row products of gpt2's decode
 * step at ~84 GFLOP/s on a 2-core Xeon, about a third of what the FMA units and the memory allow. Here each
 * weight row is read from memory once and multiplied with every activation row while it is in L1.
 *
 * The tile is 4 weight rows x 4 activation rows (AVX-512; x 2 on AVX2): per step of one vector along K,
 * 4 weight loads, 4 activation loads and 16 FMAs into 16 accumulators. Each output y[m][n] is one accumulator whose lanes
 * add the products in K order, summed at the end in a fixed tree: the value does not depend on M, on the
 * tile an output falls in, or on the thread count, so a row's result is bitwise the same alone or in a
 * batch (the server's "greedy output identical alone or batched" holds to the bit).
 *
 * Compiled at first use with -march=native: AVX-512F, AVX2 + FMA, or portable C (the same fixed lane
 * scheme, 8 lanes, in plain loops). Weight rows are split over `threads` OpenMP threads.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define F32_LANES 16
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define F32_LANES 8
#else
#define F32_LANES 8
#endif

/* Register tile: TILE_N weight rows x TILE_M activation rows of accumulators, plus TILE_N weight vectors
 * and one activation vector: 21 of AVX-512's 32 registers, 13 of AVX2's 16. */
#ifndef TILE_N
#define TILE_N 4
#endif
#ifndef TILE_M
#if defined(__AVX512F__)
#define TILE_M 4
#else
#define TILE_M 2
#endif
#endif


#if defined(__AVX512F__)
typedef __m512 vec;
#define VZERO() _mm512_setzero_ps()
#define VLOAD(p) _mm512_loadu_ps(p)
#define VMASKLOAD(p, k) _mm512_maskz_loadu_ps((k), (p))
#define VFMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
static inline float vsum(vec v) {
    /* fixed tree: 16 -> 8 -> 4 -> 2 -> 1 */
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 vec;
#define VZERO() _mm256_setzero_ps()
#define VLOAD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
static inline float vsum(vec v) {
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    b = _mm_add_ps(b, _mm_movehl_ps(b, b));
    b = _mm_add_ss(b, _mm_movehdup_ps(b));
    return _mm_cvtss_f32(b);
}
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HAVE_VEC 1

/* Partial loads for K % lanes: masked on AVX-512; on AVX2 a zero-padded copy (rare: gpt2's K are 768/3072). */
static inline vec load_tail(const float *p, int n) {
#if defined(__AVX512F__)
    return VMASKLOAD(p, (__mmask16)((1u << n) - 1));
#else
    float buf[F32_LANES] = {0};
    memcpy(buf, p, (size_t)n * sizeof(float));
    return VLOAD(buf);
#endif
}

/* One tile of TILE_N weight rows x MR activation rows, MR a constant at each call site (so the compiler
 * keeps the accumulators in registers for every row count, not only the full tile). */
static inline __attribute__((always_inline)) void tile_full(const float *const *w, const float *const *xr, int K,
                                                             float *y, int ldy, const float *bias, int prefetch,
                                                             const int MR) {
    vec acc[TILE_N][TILE_M];
#pragma GCC unroll 8
    for (int r = 0; r < TILE_N; r++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) acc[r][i] = VZERO();
    const int kv = K - K % F32_LANES;
    int k = 0;
    for (; k < kv; k += F32_LANES) {
        if (prefetch) { /* the same columns of the next tile's weight rows, while the first activation tile
                         * reads these from memory (the later ones find them in L1) */
#pragma GCC unroll 8
            for (int r = 0; r < TILE_N; r++) __builtin_prefetch(w[r] + k + (size_t)TILE_N * K, 0, 1);
        }
        vec wv[TILE_N];
#pragma GCC unroll 8
        for (int r = 0; r < TILE_N; r++) wv[r] = VLOAD(w[r] + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const vec xi = VLOAD(xr[i] + k);
#pragma GCC unroll 8
            for (int r = 0; r < TILE_N; r++) acc[r][i] = VFMA(wv[r], xi, acc[r][i]);
        }
    }
    if (k < K) {
#pragma GCC unroll 8
        for (int r = 0; r < TILE_N; r++) {
            const vec wr = load_tail(w[r] + k, K - k);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) acc[r][i] = VFMA(wr, load_tail(xr[i] + k, K - k), acc[r][i]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < TILE_N; r++) {
        const float b = bias ? bias[r] : 0.0f;
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) y[(size_t)i * ldy + r] = vsum(acc[r][i]) + b;
    }
}

/* The last weight rows (nr < TILE_N), once per product: the same per-output arithmetic, plain loops. */
static void tile_rows(const float *const *w, int nr, const float *const *xr, int mr, int K, float *y, int ldy,
                      const float *bias) {
    const int kv = K - K % F32_LANES;
    for (int r = 0; r < nr; r++) {
        for (int i = 0; i < mr; i++) {
            vec acc = VZERO();
            int k = 0;
            for (; k < kv; k += F32_LANES) acc = VFMA(VLOAD(w[r] + k), VLOAD(xr[i] + k), acc);
            if (k < K) acc = VFMA(load_tail(w[r] + k, K - k), load_tail(xr[i] + k, K - k), acc);
            y[(size_t)i * ldy + r] = vsum(acc) + (bias ? bias[r] : 0.0f);
        }
    }
}

static void tile(const float *const *w, int nr, const float *x, int ldx, int mr, int K, float *y, int ldy,
                 const float *bias, int prefetch) {
    const float *xr[TILE_M];
    for (int i = 0; i < TILE_M; i++) xr[i] = x + (size_t)(i < mr ? i : 0) * ldx;
    if (nr < TILE_N) {
        tile_rows(w, nr, xr, mr, K, y, ldy, bias);
        return;
    }
    switch (mr) {
#if TILE_M >= 4
    case 4: tile_full(w, xr, K, y, ldy, bias, prefetch, 4); break;
    case 3: tile_full(w, xr, K, y, ldy, bias, prefetch, 3); break;
#endif
    case 2: tile_full(w, xr, K, y, ldy, bias, prefetch, 2); break;
    default: tile_full(w, xr, K, y, ldy, bias, prefetch, 1); break;
    }
}
#else
/* Portable C: 8 lanes per output, lane l adds the products k = l mod 8 in K order, then a fixed tree. */
static void tile(const float *const *w, int nr, const float *x, int ldx, int mr, int K, float *y, int ldy,
                 const float *bias, int prefetch) {
    (void)prefetch;
    for (int r = 0; r < nr; r++) {
        for (int i = 0; i < mr; i++) {
            const float *xi = x + (size_t)i * ldx;
            float lane[F32_LANES] = {0};
            int k = 0;
            for (; k + F32_LANES <= K; k += F32_LANES)
                for (int l = 0; l < F32_LANES; l++) lane[l] += w[r][k + l] * xi[k + l];
            for (int l = 0; k + l < K; l++) lane[l] += w[r][k + l] * xi[k + l];
            float s = ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]));
            y[(size_t)i * ldy + r] = s + (bias ? bias[r] : 0.0f);
        }
    }
}
#endif

/* y [M, ldy] (columns 0..N-1) = x [M, K] (row stride ldx) W^T + bias, W [N, K] row-major (stride K). */
void gpt2kit_f32_gemm(const float *x, int M, int ldx, const float *W, const float *bias, float *y, int ldy,
                      int N, int K, int threads) {
    const int groups = (N + TILE_N - 1) / TILE_N;
    if (threads < 1) threads = 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int g = 0; g < groups; g++) {
        const int n0 = g * TILE_N, nr = N - n0 < TILE_N ? N - n0 : TILE_N;
        const float *w[TILE_N];
        for (int r = 0; r < TILE_N; r++) w[r] = W + (size_t)(n0 + (r < nr ? r : 0)) * K;
        for (int m0 = 0; m0 < M; m0 += TILE_M) {
            const int mr = M - m0 < TILE_M ? M - m0 : TILE_M;
            tile(w, nr, x + (size_t)m0 * ldx, ldx, mr, K, y + (size_t)m0 * ldy + n0, ldy,
                 bias ? bias + n0 : NULL, m0 == 0);
        }
    }
}

/* What this build computes with, for logs and tests. */
const char *gpt2kit_f32_isa(void) {
#if defined(__AVX512F__)
    return "avx512f";
#elif defined(__AVX2__) && defined(__FMA__)
    return "avx2+fma";
#else
    return "portable";
#endif
}
