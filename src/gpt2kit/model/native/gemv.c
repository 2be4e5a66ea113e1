/* y = W~ x for one activation row and an int4 weight [rows, cols] in blocks of 32 (gpt2kit.model.native).
 *
 * Why: a batch-1 decode step reads every weight once, so it runs at the speed weights stream from memory.
 * torch's CPU int4 kernel reaches ~60% of the bandwidth on one row; this one reads half a byte per weight
 * plus 4 bytes per block of 32 and does the arithmetic in 8-bit integers, as llama.cpp's q4 x q8 dot does.
 *
 * Weight row of nb = cols / 32 blocks (20 bytes a block), stored as three runs so that each is read with
 * whole-vector loads:
 *   d[nb]       fp16  each block's scale s          W~[j] = (c[j] - z) * s
 *   m[nb]       fp16  s * z
 *   qs[nb][16]  byte j of a block holds code c[j] in its low nibble and c[j + 16] in its high nibble
 * The activation row is quantized per block of 32 to int8 (xs = max|x| / 127, xq = round(x / xs)), so
 *   sum_j W~[j] x[j] ~= s * xs * sum_j c[j] xq[j]  -  m * (xs * sum_j xq[j]).
 * The integer dot is exact; floats accumulate in 8 lanes per row (16 in the 512-bit loop), summed at the
 * end of the row.
 *
 * Compiled at first use for the CPU at hand (-march=native): with AVX-512 BW + VNNI, four blocks per step in
 * zmm registers (on a Zen 5 EPYC: 31.5 -> 65.5 GB/s on a 48 MB weight, 2 threads); otherwise AVX-VNNI or
 * AVX-512 VNNI dot products on 256-bit registers, AVX2 (maddubs + madd) without VNNI, portable C elsewhere. Rows are split over
 * `threads` OpenMP threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define GPT2KIT_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GPT2KIT_AVX512_VNNI 1
#endif
#endif

/* Prefetch this many bytes ahead of the row being read, into L2 (locality 1), and read each thread's rows
 * as two streams. One core keeps only so many cache-line misses in flight: streaming 212 MB of int4 rows
 * from DRAM on a 2-core Xeon VM ran at 12.9 GB/s with neither, 19.1 GB/s with 8 KB ahead (11.0 with NTA
 * hints, 12.5 into L1), 21.5 GB/s with two streams as well (four: 20.4-22.0); torch's int4 kernel 15. */
#ifndef GPT2KIT_STREAMS
#define GPT2KIT_STREAMS 2
#endif
#ifndef GPT2KIT_PREFETCH_LOCALITY
#define GPT2KIT_PREFETCH_LOCALITY 1
#endif
#ifndef GPT2KIT_PREFETCH
#define GPT2KIT_PREFETCH 8192
#endif

static float fp16_to_float(uint16_t h) {
#if defined(GPT2KIT_AVX2)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* The activation row per block of 32: int8 codes, their scale, and scale * sum of codes. With AVX2, also
 * the codes of each pair of blocks (b, b + 1) reordered as [b 0-15 | b+1 0-15 | b 16-31 | b+1 16-31], the
 * order in which the low and high nibbles of the two blocks' 32 code bytes meet them. */
void gk_q8_quantize(const float *x, int cols, int8_t *xq, int8_t *xp, int8_t *x4, float *xs, float *xsum) {
    const int nb = cols / 32;
    for (int b = 0; b < nb; b++) {
        const float *v = x + 32 * b;
        float amax = 0.0f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(v[j]));
        float s = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < 32; j++) {
            int q = (int)nearbyintf(v[j] * inv);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            xq[32 * b + j] = (int8_t)q;
            sum += q;
        }
        xs[b] = s;
        xsum[b] = s * (float)sum;
    }
    for (int b = 0; b + 1 < nb; b += 2) {
        int8_t *o = xp + 32 * b;
        memcpy(o, xq + 32 * b, 16);
        memcpy(o + 16, xq + 32 * (b + 1), 16);
        memcpy(o + 32, xq + 32 * b + 16, 16);
        memcpy(o + 48, xq + 32 * (b + 1) + 16, 16);
    }
    /* and of each group of four blocks as [b..b+3 codes 0-15 | b..b+3 codes 16-31], for the 512-bit loop */
    for (int b = 0; b + 3 < nb; b += 4) {
        int8_t *o = x4 + 32 * b;
        for (int k = 0; k < 4; k++) {
            memcpy(o + 16 * k, xq + 32 * (b + k), 16);
            memcpy(o + 64 + 16 * k, xq + 32 * (b + k) + 16, 16);
        }
    }
}

#if defined(GPT2KIT_AVX2)
static inline __m256i dot_u8_s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    /* u <= 15, |s| <= 127: a pair sum fits int16 without saturation */
    __m256i p = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}
#endif

/* One output: row = d[nb] m[nb] qs[nb][16]; sc is scratch for nb floats. */
float gk_int4_row_dot(const uint8_t *row, int nb, const int8_t *xq, const int8_t *xp, const int8_t *x4,
                      const float *xs, const float *xsum, float *sc) {
    const uint16_t *d = (const uint16_t *)row, *m = d + nb;
    const uint8_t *qs = (const uint8_t *)(m + nb);
    float zterm = 0.0f, total = 0.0f;
    int b = 0;
#if defined(GPT2KIT_AVX2)
    /* per-block scales s * xs and the zero-point term, 8 blocks at a time */
    __m256 z8 = _mm256_setzero_ps();
    for (; b + 8 <= nb; b += 8) {
        __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + b)));
        __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + b)));
        _mm256_storeu_ps(sc + b, _mm256_mul_ps(dv, _mm256_loadu_ps(xs + b)));
        z8 = _mm256_fmadd_ps(mv, _mm256_loadu_ps(xsum + b), z8);
    }
    zterm = gk_hsum8(z8);
    for (; b < nb; b++) {
        sc[b] = fp16_to_float(d[b]) * xs[b];
        zterm += fp16_to_float(m[b]) * xsum[b];
    }
    b = 0;
#if defined(GPT2KIT_AVX512_VNNI)
    /* four blocks per step in 512-bit registers: lanes 4k..4k+3 hold block b + k */
    {
        const __m512i low4x = _mm512_set1_epi8(0x0f);
        const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        __m512 acc4 = _mm512_setzero_ps();
        for (; b + 4 <= nb; b += 4) {
            __m512i q = _mm512_loadu_si512((const void *)(qs + 16 * b));
            __m512i lo = _mm512_and_si512(q, low4x);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4x);
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)(x4 + 32 * b)));
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_loadu_si512((const void *)(x4 + 32 * b + 64)));
            __m512 scale = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(sc + b)));
            acc4 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc4);
        }
        total = _mm512_reduce_add_ps(acc4);
    }
#else
    (void)x4;
#endif
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    __m256 acc = _mm256_setzero_ps();
    for (; b + 1 < nb; b += 2) { /* two blocks per step: lanes 0-3 block b, lanes 4-7 block b + 1 */
        __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 16 * b));
        __m256i lo = _mm256_and_si256(q, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
        __m256i xa = _mm256_loadu_si256((const __m256i *)(xp + 32 * b));
        __m256i xb = _mm256_loadu_si256((const __m256i *)(xp + 32 * b + 32));
        __m256i dot = dot_u8_s8(dot_u8_s8(_mm256_setzero_si256(), lo, xa), hi, xb);
        __m256 scale = _mm256_set_m128(_mm_broadcast_ss(sc + b + 1), _mm_broadcast_ss(sc + b));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc);
    }
    total += gk_hsum8(acc);
    if (b < nb) { /* the odd block */
        const uint8_t *qb = qs + 16 * b;
        const int8_t *x0 = xq + 32 * b;
        int sum = 0;
        for (int j = 0; j < 16; j++) sum += (qb[j] & 0x0f) * x0[j] + (qb[j] >> 4) * x0[j + 16];
        total += sc[b] * (float)sum;
    }
#else
    (void)xp;
    (void)x4;
    (void)sc;
    for (; b < nb; b++) {
        const uint8_t *qb = qs + 16 * b;
        const int8_t *x0 = xq + 32 * b;
        int sum = 0;
        for (int j = 0; j < 16; j++) sum += (qb[j] & 0x0f) * x0[j] + (qb[j] >> 4) * x0[j + 16];
        total += fp16_to_float(d[b]) * xs[b] * (float)sum;
        zterm += fp16_to_float(m[b]) * xsum[b];
    }
#endif
    return total - zterm;
}

/* y[r] = sum_c W~[r, c] x[c] (+ bias[r]) for r < rows; cols a multiple of 32. Returns 0, or -1 when out of memory. */
int gpt2kit_int4_gemv(const void *blocks, const float *x, const float *bias, float *y, int rows, int cols, int threads) {
    const int nb = cols / 32;
    const size_t row_bytes = (size_t)nb * 20;
    /* xq, xp: cols bytes each; xs, xsum: nb floats each (cols is a multiple of 32: floats stay aligned) */
    int8_t *xq = (int8_t *)malloc(3 * (size_t)cols + 2 * sizeof(float) * (size_t)nb);
    if (!xq) return -1;
    int8_t *xp = xq + cols, *x4 = xp + cols;
    float *xs = (float *)(x4 + cols), *xsum = xs + nb;
    gk_q8_quantize(x, cols, xq, xp, x4, xs, xsum);
    const uint8_t *w = (const uint8_t *)blocks;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)nb);
        if (!sc) {
#pragma omp atomic write
            failed = 1;
        }
#ifdef _OPENMP
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
        const int nt = 1, t = 0;
#endif
        /* this thread's rows [r0, r1), read as GPT2KIT_STREAMS streams side by side (its chunk cut in as
         * many parts): more cache-line misses in flight than one stream gets */
        const int r0 = (int)((long long)rows * t / nt), r1 = (int)((long long)rows * (t + 1) / nt);
        const int part = (r1 - r0 + GPT2KIT_STREAMS - 1) / GPT2KIT_STREAMS;
        for (int i = 0; sc && i < part; i++) {
            for (int k = 0; k < GPT2KIT_STREAMS; k++) {
                const int r = r0 + i + k * part;
                if (r >= r1) break;
#if GPT2KIT_PREFETCH > 0
                const char *ahead = (const char *)(w + (size_t)r * row_bytes) + GPT2KIT_PREFETCH;
                for (size_t off = 0; off < row_bytes; off += 64) __builtin_prefetch(ahead + off, 0, GPT2KIT_PREFETCH_LOCALITY);
#endif
                float v = gk_int4_row_dot(w + (size_t)r * row_bytes, nb, xq, xp, x4, xs, xsum, sc);
                y[r] = bias ? v + bias[r] : v;
            }
        }
        free(sc);
    }
    free(xq);
    return failed ? -1 : 0;
}

/* W~ = (c - z) * s for a whole int4 weight in gpt2kit's storage (codes two per byte, element 2j in the low
 * nibble; float32 scales and uint8 zeros [rows, cols / group]) into out [rows, cols], float32. The same two
 * float32 operations as torch's dequantization, so the result is bitwise equal: a prefill that multiplies
 * by the whole matrix needs it every forward, and one pass here replaces several tensor passes. */
void gpt2kit_int4_dequantize(const uint8_t *codes, const float *scales, const uint8_t *zeros, float *out,
                             int rows, int cols, int group, int threads) {
    const int groups = cols / group;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int r = 0; r < rows; r++) {
        const uint8_t *q = codes + (size_t)r * (cols / 2);
        float *o = out + (size_t)r * cols;
        for (int g = 0; g < groups; g++) {
            const float s = scales[(size_t)r * groups + g], z = (float)zeros[(size_t)r * groups + g];
            int j = g * group;
#if defined(GPT2KIT_AVX2)
            /* 16 codes a step: 8 bytes, nibbles interleaved back into element order (same two float ops) */
            const __m256 zv = _mm256_set1_ps(z), sv = _mm256_set1_ps(s);
            const __m128i low4 = _mm_set1_epi8(0x0f);
            for (; j + 16 <= (g + 1) * group; j += 16) {
                const __m128i b = _mm_loadl_epi64((const __m128i *)(q + j / 2));
                const __m128i c = _mm_unpacklo_epi8(_mm_and_si128(b, low4), _mm_and_si128(_mm_srli_epi16(b, 4), low4));
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(c, 8)));
                _mm256_storeu_ps(o + j, _mm256_mul_ps(_mm256_sub_ps(lo, zv), sv));
                _mm256_storeu_ps(o + j + 8, _mm256_mul_ps(_mm256_sub_ps(hi, zv), sv));
            }
#endif
            for (; j < (g + 1) * group; j += 2) {
                const uint8_t b = q[j / 2];
                o[j] = ((float)(b & 0x0f) - z) * s;
                o[j + 1] = ((float)(b >> 4) - z) * s;
            }
        }
    }
}

/* What this build computes with, for logs and tests. */
const char *gpt2kit_int4_isa(void) {
#if defined(GPT2KIT_AVX512_VNNI)
    return "avx512-vnni";
#elif defined(GPT2KIT_AVX2) && defined(__AVXVNNI__)
    return "avx2+avx-vnni";
#elif defined(GPT2KIT_AVX2) && defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return "avx2+avx512-vnni";
#elif defined(GPT2KIT_AVX2)
    return "avx2";
#else
    return "portable";
#endif
}
