/* One whole batch-1 decode step of a plain GPT-2 in one call (gpt2kit.decode_fast): every block's layer
 * norms, products, attention over the KV cache, GELU and residual adds, then the final norm and the head.
 *
 * Why: at one row a step streams every weight once, so its time should be the time to read them. Run
 * from Python, a step of gpt2 made ~35 numpy calls a layer and 49 products that each started and ended
 * their own parallel region: about 1 ms of a 3.4 ms int4 step on a Zen 5 EPYC (py-spy, docs/benchmarks.md).
 * Here one OpenMP region spans the step: each product's rows are split over the threads, the small
 * row-wide work (layer norm, quantizing an activation) runs on one thread, and a barrier separates the
 * phases. Residual adds and GELU are fused into the products that feed them.
 *
 * gpt2kit_decode_rows runs T new tokens of one sequence the same way (speculative decoding's check, a
 * draft's catch-up): each weight row is read once for all T activation rows, and every output is computed
 * with exactly the arithmetic of the one-row step (the same accumulators in the same order, the same
 * attention code over the positions that token sees), so its logits are bitwise those of T single steps.
 *
 * Projections are float32 [rows, cols] (nn.Linear's layout), int4 in gemv.c's blocks, or int8 per row
 * (gemv_int8.c); a quantized product multiplies a per-block int8 copy of its activation, as gemv.c and
 * gemv_int8.c do on their own, so a layer gives what its own kernel gives up to float rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "kernels.h"
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif


enum { GK_F32 = 0, GK_INT4 = 1, GK_INT8 = 2 };

/* Activation rows a float32 weight row meets per pass in gpt2kit_decode_rows: 4 x 4 accumulators and 4
 * weight vectors fit AVX-512's 32 registers; AVX2 has 16, so 2 rows there. */
#if defined(__AVX512F__)
#define F32_GROUP 4
#else
#define F32_GROUP 2
#endif

typedef struct {
    int kind, rows, cols;
    const void *w;        /* f32 [rows, cols]; int4 blocks [rows, cols / 32 * 20]; int8 codes - 128 [rows, cols] */
    const float *bias;    /* [rows] or NULL */
    const float *scale;   /* int8: [rows] */
    const uint8_t *zero;  /* int8: [rows], the unsigned zero point */
} gk_proj;

/* An embedding table in gpt2kit's storage (gpt2kit.model.quantized): float32 [rows, cols]; int4 codes two
 * per byte (element 2j low) or int8 codes - 128, with float32 scales and uint8 zeros [rows, groups]. */
typedef struct {
    int kind, rows, cols, groups;
    const void *w;
    const float *scale;
    const uint8_t *zero;
} gk_table;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    gk_proj qkv, proj, fc, out;
    float *k, *v; /* this layer's cache for the row: element (h, t, d) at h * sh + t * st + d */
} gk_layer;

typedef struct {
    gk_table wte, wpe;
    int n_layer, n_head, head_dim, max_len;
    float eps;
    long long sh, st;
    const gk_layer *layers;
    const float *lnf_w, *lnf_b;
    gk_proj head;
    /* how rows are read, chosen per CPU by the caller (gpt2kit.decode_native): each thread's rows as
     * `streams` side-by-side streams, software prefetch that many bytes ahead (0: none) for float32 and
     * quantized rows */
    int streams, prefetch_f32, prefetch_q;
} gk_net;

/* A row and, when a quantized product reads it, its per-block int8 form. */
typedef struct {
    const float *x;
    int8_t *xq, *xp, *x4;
    float *xs, *xsum, *xs8, zsum;
} gk_act;

/* ----- row-wide pieces -------------------------------------------------------------------------------- */

static void layer_norm(const float *x, const float *w, const float *b, float eps, int n, float *out) {
    float mean = 0.0f, var = 0.0f;
#pragma omp simd reduction(+ : mean)
    for (int i = 0; i < n; i++) mean += x[i];
    mean /= (float)n;
#pragma omp simd reduction(+ : var)
    for (int i = 0; i < n; i++) var += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.0f / sqrtf(var / (float)n + eps);
#pragma omp simd
    for (int i = 0; i < n; i++) out[i] = (x[i] - mean) * rstd * w[i] + b[i];
}

/* One vector of float32 lanes, for the row dots and the elementwise functions: 16 on AVX-512, 8 on
 * AVX2 + FMA. GK_MAX(c, x) is (c > x) ? c : x and GK_MIN(c, x) is (c < x) ? c : x, NaN x kept: the
 * scalar comparisons' results exactly. */
#if defined(__AVX512F__)
typedef __m512 gk_vec;
typedef __m512i gk_ivec;
#define GK_LANES 16
#define GK_ZERO() _mm512_setzero_ps()
#define GK_SET1(c) _mm512_set1_ps(c)
#define GK_LOAD(p) _mm512_loadu_ps(p)
#define GK_STORE(p, v) _mm512_storeu_ps((p), (v))
#define GK_FMA(a, b, c) _mm512_fmadd_ps((a), (b), (c))
#define GK_ADD(a, b) _mm512_add_ps((a), (b))
#define GK_SUB(a, b) _mm512_sub_ps((a), (b))
#define GK_MUL(a, b) _mm512_mul_ps((a), (b))
#define GK_DIV(a, b) _mm512_div_ps((a), (b))
#define GK_MAX(a, b) _mm512_max_ps((a), (b))
#define GK_MIN(a, b) _mm512_min_ps((a), (b))
#define GK_POW2(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23))
#define GK_SUM(v) _mm512_reduce_add_ps(v)
#elif defined(__AVX2__) && defined(__FMA__)
typedef __m256 gk_vec;
#define GK_LANES 8
#define GK_ZERO() _mm256_setzero_ps()
#define GK_SET1(c) _mm256_set1_ps(c)
#define GK_LOAD(p) _mm256_loadu_ps(p)
#define GK_STORE(p, v) _mm256_storeu_ps((p), (v))
#define GK_FMA(a, b, c) _mm256_fmadd_ps((a), (b), (c))
#define GK_ADD(a, b) _mm256_add_ps((a), (b))
#define GK_SUB(a, b) _mm256_sub_ps((a), (b))
#define GK_MUL(a, b) _mm256_mul_ps((a), (b))
#define GK_DIV(a, b) _mm256_div_ps((a), (b))
#define GK_MAX(a, b) _mm256_max_ps((a), (b))
#define GK_MIN(a, b) _mm256_min_ps((a), (b))
#define GK_POW2(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23))
#define GK_SUM(v) gk_hsum8(v)
#endif

/* e^x to ~2 ulp in plain arithmetic the compiler vectorizes (Cephes' expf polynomial on [-ln2/2, ln2/2],
 * times 2^n through the exponent bits); inputs are clamped to [-87, 88]. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    /* n = x / ln 2 rounded to nearest by the 1.5 * 2^23 trick: floorf keeps GCC 12 from vectorizing the
     * loops that call this (gelu ran scalar: 8 ms for gpt2's [512, 3072] on one Zen 5 core) */
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } s;
    s.i = ((int32_t)n + 127) << 23;
    return p * s.f;
}

/* GPT-2's GELU, 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), written as x / (1 + e^(-2u));
 * y may be x. */
#ifdef GK_LANES
/* exp_fast on a vector: the same operations in the same order, so the same bits lane by lane */
static inline gk_vec exp_fast_vec(gk_vec x) {
    x = GK_MIN(GK_SET1(88.0f), GK_MAX(GK_SET1(-87.0f), x));
    const gk_vec n = GK_SUB(GK_ADD(GK_MUL(x, GK_SET1(1.44269504088896341f)), GK_SET1(12582912.0f)), GK_SET1(12582912.0f));
    gk_vec r = GK_SUB(x, GK_MUL(n, GK_SET1(0.693359375f)));
    r = GK_SUB(r, GK_MUL(n, GK_SET1(-2.12194440e-4f)));
    gk_vec p = GK_SET1(1.9875691500e-4f);
    p = GK_ADD(GK_MUL(p, r), GK_SET1(1.3981999507e-3f));
    p = GK_ADD(GK_MUL(p, r), GK_SET1(8.3334519073e-3f));
    p = GK_ADD(GK_MUL(p, r), GK_SET1(4.1665795894e-2f));
    p = GK_ADD(GK_MUL(p, r), GK_SET1(1.6666665459e-1f));
    p = GK_ADD(GK_MUL(p, r), GK_SET1(5.0000001201e-1f));
    p = GK_ADD(GK_ADD(GK_MUL(GK_MUL(p, r), r), r), GK_SET1(1.0f));
    return GK_MUL(p, GK_POW2(n));
}
#endif

/* Written with intrinsics: under AVX2 GCC 12 leaves the plain loop below scalar (its compares might trap,
 * AVX-512's masked ones do not), and with -fno-trapping-math its vector form computes x / (1 + e^88) for
 * every lane and blends, denormal quotients with microcode assists: 4.7 ms for gpt2's [512, 3072] on one
 * Zen 5 core with AVX2, 9.6 scalar, 1.0 here. */
static void gelu_to(const float *xs, float *y, long long n) {
    long long i = 0;
#ifdef GK_LANES
    for (; i + GK_LANES <= n; i += GK_LANES) {
        const gk_vec x = GK_LOAD(xs + i);
        const gk_vec u = GK_MUL(GK_SET1(0.7978845608028654f),
                                GK_ADD(x, GK_MUL(GK_MUL(GK_MUL(GK_SET1(0.044715f), x), x), x)));
        GK_STORE(y + i, GK_DIV(x, GK_ADD(GK_SET1(1.0f), exp_fast_vec(GK_MUL(GK_SET1(-2.0f), u)))));
    }
#endif
    for (; i < n; i++) {
        const float x = xs[i];
        const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        y[i] = x / (1.0f + exp_fast(-2.0f * u));
    }
}

static void gelu(float *y, int n) { gelu_to(y, y, n); }

/* y = gelu(x) for n floats on `threads` threads: a prompt's MLP activations, the same function as the
 * decode step's (torch's tanh GELU took 2.1 ms for gpt2's [512, 3072] on 2 Zen 5 cores with AVX2). */
void gpt2kit_gelu(const float *x, float *y, long long n, int threads) {
    const long long chunk = 16384; /* 64 KB: whole cache lines per thread, enough work per chunk */
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long long i = 0; i < n; i += chunk) gelu_to(x + i, y + i, n - i < chunk ? n - i : chunk);
}

static void quantize(gk_act *a, int cols) {
    gk_q8_quantize(a->x, cols, a->xq, a->xp, a->x4, a->xs, a->xsum);
    gk_int8_expand_scales(a->xs, cols / 32, a->xs8);
    float z = 0.0f;
    for (int b = 0; b < cols / 32; b++) z += a->xsum[b];
    a->zsum = z;
}

/* ----- products ---------------------------------------------------------------------------------------- */

/* out[i] = w . x[i] over n floats for i < M: four accumulators per output, fed 4 * GK_LANES floats a step,
 * then one vector at a time, summed in a fixed tree, then a scalar tail. The weight's vectors are loaded
 * once for all M rows, and each output's arithmetic does not depend on M: the one-row step (M = 1) and
 * gpt2kit_decode_rows give the same bits. M is a constant at each call site (the accumulators stay in
 * registers). */
static inline __attribute__((always_inline)) void f32_rows_dot(const float *w, const float *const *x, int n,
                                                                float *out, const int M) {
    int k = 0;
    float s[F32_GROUP];
#ifdef GK_LANES
    gk_vec a[F32_GROUP][4];
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) a[i][0] = a[i][1] = a[i][2] = a[i][3] = GK_ZERO();
    for (; k + 4 * GK_LANES <= n; k += 4 * GK_LANES) {
        const gk_vec w0 = GK_LOAD(w + k), w1 = GK_LOAD(w + k + GK_LANES);
        const gk_vec w2 = GK_LOAD(w + k + 2 * GK_LANES), w3 = GK_LOAD(w + k + 3 * GK_LANES);
#pragma GCC unroll 8
        for (int i = 0; i < M; i++) {
            a[i][0] = GK_FMA(w0, GK_LOAD(x[i] + k), a[i][0]);
            a[i][1] = GK_FMA(w1, GK_LOAD(x[i] + k + GK_LANES), a[i][1]);
            a[i][2] = GK_FMA(w2, GK_LOAD(x[i] + k + 2 * GK_LANES), a[i][2]);
            a[i][3] = GK_FMA(w3, GK_LOAD(x[i] + k + 3 * GK_LANES), a[i][3]);
        }
    }
    for (; k + GK_LANES <= n; k += GK_LANES) {
        const gk_vec w0 = GK_LOAD(w + k);
#pragma GCC unroll 8
        for (int i = 0; i < M; i++) a[i][0] = GK_FMA(w0, GK_LOAD(x[i] + k), a[i][0]);
    }
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) s[i] = GK_SUM(GK_ADD(GK_ADD(a[i][0], a[i][1]), GK_ADD(a[i][2], a[i][3])));
#else
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) s[i] = 0.0f;
#endif
#pragma GCC unroll 8
    for (int i = 0; i < M; i++) {
        float v = s[i];
        for (int kk = k; kk < n; kk++) v += w[kk] * x[i][kk];
        out[i] = v;
    }
}

static inline float f32_row_dot(const float *w, const float *x, int n) {
    float v;
    f32_rows_dot(w, &x, n, &v, 1);
    return v;
}

static size_t row_bytes(const gk_proj *p) {
    switch (p->kind) {
    case GK_INT4: return (size_t)(p->cols / 32) * 20;
    case GK_INT8: return (size_t)p->cols;
    default: return (size_t)p->cols * sizeof(float);
    }
}

enum { SET = 0, ADD = 1, SET_GELU = 2 };

static inline void put(float *y, int r, float v, const float *bias, int mode) {
    if (bias) v += bias[r];
    if (mode == ADD) y[r] += v;
    else y[r] = v;
}

/* This thread's share of y = W a + b (SET), y += W a + b (ADD), y = gelu(W a + b) (SET_GELU) for T
 * activation rows a[0..T) into y + j * ldy. Rows [r0, r1) of W are read once, as n->streams side-by-side
 * streams, each prefetched ahead where asked, and meet all T activation rows while in L1. Which reading
 * helps depends on the CPU: on a Xeon VM two streams and 8 KB ahead took int4 rows from 12.9 to 21.5 GB/s
 * (gemv.c); on a Zen 5 EPYC one stream with no software prefetch read float32 rows 13% faster. */
/* One activation row: the decode step's own loop (kept apart from the T-row loop so the step stays as
 * fast as measured: no per-row loop over T or mode dispatch in its inner loop). */
static void product1(const gk_net *n, const gk_proj *p, const gk_act *a, float *y, int mode, int t, int nt,
                     float *sc) {
    const int r0 = (int)((long long)p->rows * t / nt), r1 = (int)((long long)p->rows * (t + 1) / nt);
    const size_t rb = row_bytes(p);
    const int streams = n->streams > 0 ? n->streams : 1;
    const size_t ahead = (size_t)(p->kind == GK_F32 ? n->prefetch_f32 : n->prefetch_q);
    const int part = (r1 - r0 + streams - 1) / streams;
    const uint8_t *base = (const uint8_t *)p->w;
    const int nb = p->cols / 32;
    for (int i = 0; i < part; i++) {
        for (int k = 0; k < streams; k++) {
            const int r = r0 + i + k * part;
            if (r >= r1) break;
            const uint8_t *row = base + (size_t)r * rb;
            if (ahead)
                for (size_t off = 0; off < rb; off += 64) __builtin_prefetch(row + ahead + off, 0, 1);
            float v;
            if (p->kind == GK_INT4) {
                v = gk_int4_row_dot(row, nb, a->xq, a->xp, a->x4, a->xs, a->xsum, sc);
            } else if (p->kind == GK_INT8) {
                v = p->scale[r] * (gk_int8_row_dot((const int8_t *)row, p->cols, a->xq, a->xs, a->xs8)
                                   - (float)p->zero[r] * a->zsum);
            } else {
                v = f32_row_dot((const float *)row, a->x, p->cols);
            }
            if (p->bias) v += p->bias[r];
            if (mode == ADD) y[r] += v;
            else y[r] = v;
        }
    }
    if (mode == SET_GELU) gelu(y + r0, r1 - r0);
}

static void product(const gk_net *n, const gk_proj *p, const gk_act *a, int T, float *y, int ldy, int mode,
                    int t, int nt, float *sc) {
    const int r0 = (int)((long long)p->rows * t / nt), r1 = (int)((long long)p->rows * (t + 1) / nt);
    const size_t rb = row_bytes(p);
    const int streams = n->streams > 0 ? n->streams : 1;
    const size_t ahead = (size_t)(p->kind == GK_F32 ? n->prefetch_f32 : n->prefetch_q);
    const int part = (r1 - r0 + streams - 1) / streams;
    const uint8_t *base = (const uint8_t *)p->w;
    const int nb = p->cols / 32;
    if (T == 1) {
        product1(n, p, a, y, mode, t, nt, sc);
        return;
    }
    const float *xs[F32_GROUP];
    for (int i = 0; i < part; i++) {
        for (int k = 0; k < streams; k++) {
            const int r = r0 + i + k * part;
            if (r >= r1) break;
            const uint8_t *row = base + (size_t)r * rb;
            if (ahead)
                for (size_t off = 0; off < rb; off += 64) __builtin_prefetch(row + ahead + off, 0, 1);
            if (p->kind == GK_INT4) {
                for (int j = 0; j < T; j++)
                    put(y + (size_t)j * ldy, r, gk_int4_row_dot(row, nb, a[j].xq, a[j].xp, a[j].x4, a[j].xs, a[j].xsum, sc),
                        p->bias, mode);
            } else if (p->kind == GK_INT8) {
                for (int j = 0; j < T; j++)
                    put(y + (size_t)j * ldy, r,
                        p->scale[r] * (gk_int8_row_dot((const int8_t *)row, p->cols, a[j].xq, a[j].xs, a[j].xs8)
                                       - (float)p->zero[r] * a[j].zsum),
                        p->bias, mode);
            } else {
                for (int j0 = 0; j0 < T; j0 += F32_GROUP) {
                    const int m = T - j0 < F32_GROUP ? T - j0 : F32_GROUP;
                    float v[F32_GROUP];
                    for (int j = 0; j < m; j++) xs[j] = a[j0 + j].x;
                    switch (m) {
#if F32_GROUP >= 4
                    case 4: f32_rows_dot((const float *)row, xs, p->cols, v, 4); break;
                    case 3: f32_rows_dot((const float *)row, xs, p->cols, v, 3); break;
#endif
                    case 2: f32_rows_dot((const float *)row, xs, p->cols, v, 2); break;
                    default: f32_rows_dot((const float *)row, xs, p->cols, v, 1); break;
                    }
                    for (int j = 0; j < m; j++) put(y + (size_t)(j0 + j) * ldy, r, v[j], p->bias, mode);
                }
            }
        }
    }
    if (mode == SET_GELU)
        for (int j = 0; j < T; j++) gelu(y + (size_t)j * ldy + r0, r1 - r0);
}

/* softmax(q K^T * scale) V for this thread's heads and the T new rows (cache positions P .. P + T - 1):
 * their keys and values (in qkv [T, 3C]) are written to the cache first, then row j attends to positions
 * [0, P + j] with the one-row step's own arithmetic. keep: [P + T] bytes, 0 = masked, or NULL. */
static void attention(const gk_net *n, const gk_layer *L, const float *qkv, int P, int T, const uint8_t *keep,
                      float *out, float *p, int t, int nt) {
    const int H = n->n_head, D = n->head_dim, C = H * D;
    const float scale = 1.0f / sqrtf((float)D);
    for (int h = H * t / nt; h < H * (t + 1) / nt; h++) {
        float *kb = L->k + h * n->sh, *vb = L->v + h * n->sh;
        for (int j = 0; j < T; j++) {
            memcpy(kb + (size_t)(P + j) * n->st, qkv + (size_t)j * 3 * C + C + h * D, sizeof(float) * (size_t)D);
            memcpy(vb + (size_t)(P + j) * n->st, qkv + (size_t)j * 3 * C + 2 * C + h * D, sizeof(float) * (size_t)D);
        }
        for (int row = 0; row < T; row++) {
            const int len = P + row + 1;
            const float *q = qkv + (size_t)row * 3 * C + h * D;
            float m = -INFINITY;
            for (int j = 0; j < len; j++) {
                const float *kr = kb + (size_t)j * n->st;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += q[d] * kr[d];
                s *= scale;
                if (keep && !keep[j]) s = -INFINITY;
                p[j] = s;
                if (s > m) m = s;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < len; j++) {
                const float e = p[j] == -INFINITY ? 0.0f : exp_fast(p[j] - m);
                p[j] = e;
                sum += e;
            }
            const float inv = 1.0f / sum;
            float *o = out + (size_t)row * C + h * D;
            for (int d = 0; d < D; d++) o[d] = 0.0f;
            for (int j = 0; j < len; j++) {
                const float w = p[j] * inv;
                if (w == 0.0f) continue;
                const float *vr = vb + (size_t)j * n->st;
#pragma omp simd
                for (int d = 0; d < D; d++) o[d] += w * vr[d];
            }
        }
    }
}

/* out += row r of the table, dequantized as gpt2kit.model.quantized.dequantize does ((code - zero) * scale
 * in float32, so bitwise the same row) */
static void add_row(const gk_table *e, int r, float *out) {
    const int C = e->cols, group = C / e->groups;
    if (e->kind == GK_F32) {
        const float *w = (const float *)e->w + (size_t)r * C;
        for (int j = 0; j < C; j++) out[j] += w[j];
        return;
    }
    const float *s = e->scale + (size_t)r * e->groups;
    const uint8_t *z = e->zero + (size_t)r * e->groups;
    for (int g = 0; g < e->groups; g++) {
        if (e->kind == GK_INT4) {
            const uint8_t *q = (const uint8_t *)e->w + (size_t)r * (C / 2);
            for (int j = g * group; j < (g + 1) * group; j++)
                out[j] += ((float)((j & 1) ? q[j / 2] >> 4 : q[j / 2] & 0x0f) - (float)z[g]) * s[g];
        } else {
            const int8_t *q = (const int8_t *)e->w + (size_t)r * C;
            for (int j = g * group; j < (g + 1) * group; j++) out[j] += ((float)q[j] - (float)(z[g] - 128)) * s[g];
        }
    }
}

/* ----- the step ---------------------------------------------------------------------------------------- */

static void make_act(gk_act *a, const float *x, int8_t *q, float *f, int cols) {
    a->x = x;
    a->xq = q;
    a->xp = q + cols;
    a->x4 = q + 2 * cols;
    a->xs = f;
    a->xsum = f + cols / 32;
    a->xs8 = f + 2 * (cols / 32);
    a->zsum = 0.0f;
}

/* T tokens of one sequence, tokens[j] at position `position + j` (its wpe row) and cache position P + j;
 * P = the cache's length before the call, keep [P + T] bytes or NULL; logits [T, vocab] when all_logits,
 * else the last token's [vocab]. 0; -1 when out of memory; -2 for a token or position outside its table
 * or a cache too short. */
int gpt2kit_decode_rows(const gk_net *n, const int *tokens, int T, int position, int P, const uint8_t *keep,
                        float *logits, int all_logits, int threads) {
    const int C = n->n_head * n->head_dim, F = n->layers[0].fc.rows, V = n->head.rows;
    if (threads < 1) threads = 1;
    if (T < 1 || position < 0 || position + T > n->wpe.rows || P < 0 || P + T > n->max_len) return -2;
    for (int j = 0; j < T; j++)
        if (tokens[j] < 0 || tokens[j] >= n->wte.rows) return -2;
    const size_t big = (size_t)(F > 3 * C ? F : 3 * C), nC = (size_t)(C / 32), nF = (size_t)(F / 32);
    /* per row, floats: h [C], qkv [3C], att [C], f [F], x [C]; activation blocks for a C row and an F row */
    float *fbuf = (float *)calloc((size_t)T * (6 * (size_t)C + big + 10 * nC + 10 * nF), sizeof(float));
    int8_t *qbuf = (int8_t *)malloc((size_t)T * (3 * (size_t)C + 3 * (size_t)F));
    gk_act *acts = (gk_act *)malloc(3 * (size_t)T * sizeof(gk_act));
    if (!fbuf || !qbuf || !acts) {
        free(fbuf);
        free(qbuf);
        free(acts);
        return -1;
    }
    float *h = fbuf, *qkv = h + (size_t)T * C, *att = qkv + (size_t)T * 3 * C, *f = att + (size_t)T * C;
    float *x = f + (size_t)T * big, *fc_blocks = x + (size_t)T * C, *cf_blocks = fc_blocks + (size_t)T * 10 * nF;
    gk_act *ah = acts, *aatt = acts + T, *af = acts + 2 * T;
    for (int j = 0; j < T; j++) {
        add_row(&n->wte, tokens[j], x + (size_t)j * C); /* the residual stream: token + position embedding */
        add_row(&n->wpe, position + j, x + (size_t)j * C);
        int8_t *qc = qbuf + (size_t)j * 3 * C;
        make_act(&ah[j], h + (size_t)j * C, qc, cf_blocks + (size_t)j * 10 * nC, C);
        make_act(&aatt[j], att + (size_t)j * C, qc, cf_blocks + (size_t)j * 10 * nC, C); /* never quantized with h */
        make_act(&af[j], f + (size_t)j * big, qbuf + (size_t)T * 3 * C + (size_t)j * 3 * F, fc_blocks + (size_t)j * 10 * nF, F);
    }
    const int ld_f = (int)big;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
        const int nt = 1, t = 0;
#endif
        const int wide = F > n->head.cols ? F : n->head.cols;
        float *sc = (float *)malloc(sizeof(float) * (size_t)(wide / 32 + 1));
        float *p = (float *)malloc(sizeof(float) * (size_t)(P + T));
        const int ok = gk_all_allocated(sc && p, &failed);
        for (int l = 0; ok && l < n->n_layer; l++) {
            const gk_layer *L = &n->layers[l];
#pragma omp for schedule(static)
            for (int j = 0; j < T; j++) {
                layer_norm(x + (size_t)j * C, L->ln1_w, L->ln1_b, n->eps, C, h + (size_t)j * C);
                if (L->qkv.kind != GK_F32) quantize(&ah[j], C);
            }
            product(n, &L->qkv, ah, T, qkv, 3 * C, SET, t, nt, sc);
#pragma omp barrier
            attention(n, L, qkv, P, T, keep, att, p, t, nt);
#pragma omp barrier
            if (L->proj.kind != GK_F32) {
#pragma omp for schedule(static)
                for (int j = 0; j < T; j++) quantize(&aatt[j], C);
            }
            product(n, &L->proj, aatt, T, x, C, ADD, t, nt, sc);
#pragma omp barrier
#pragma omp for schedule(static)
            for (int j = 0; j < T; j++) {
                layer_norm(x + (size_t)j * C, L->ln2_w, L->ln2_b, n->eps, C, h + (size_t)j * C);
                if (L->fc.kind != GK_F32) quantize(&ah[j], C);
            }
            product(n, &L->fc, ah, T, f, ld_f, SET_GELU, t, nt, sc);
#pragma omp barrier
            if (L->out.kind != GK_F32) {
#pragma omp for schedule(static)
                for (int j = 0; j < T; j++) quantize(&af[j], F);
            }
            product(n, &L->out, af, T, x, C, ADD, t, nt, sc);
#pragma omp barrier
        }
        if (ok) {
            const int first = all_logits ? 0 : T - 1; /* the rows whose logits are wanted */
#pragma omp for schedule(static)
            for (int j = first; j < T; j++) {
                layer_norm(x + (size_t)j * C, n->lnf_w, n->lnf_b, n->eps, C, h + (size_t)j * C);
                if (n->head.kind != GK_F32) quantize(&ah[j], C);
            }
            product(n, &n->head, ah + first, T - first, logits, V, SET, t, nt, sc);
        }
        free(sc);
        free(p);
    }
    free(fbuf);
    free(qbuf);
    free(acts);
    return failed ? -1 : 0;
}

/* One token at `position` (its wpe row) into cache position P; keep [P + 1] bytes or NULL; logits [vocab]. */
int gpt2kit_decode_step(const gk_net *n, int token, int position, int P, const uint8_t *keep, float *logits,
                        int threads) {
    return gpt2kit_decode_rows(n, &token, 1, position, P, keep, logits, 0, threads);
}

