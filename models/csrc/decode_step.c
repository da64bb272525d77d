/* One RxT decoder step on a CPU, for a few rows at a time, in plain C with OpenMP.
 *
 * Why: a batch-1 decode step is bound by reading the weights (about 120 MB per token at the
 * alpha-mini size in float32) and, in eager torch, by the ~300 tensor operations it dispatches.
 * Here the whole step is one call, and every large read (Q/K/V and output projections, the
 * chosen experts, the LM head) is split across the threads so that all cores stream weights at
 * once. The large matrices may be stored as float32, bfloat16 or int8 with one float scale per
 * block of 32 (a quarter of the bytes: fewer bytes per token is the only way past the memory
 * bandwidth). Activations and sums stay float32 in every format ("weight-only" quantisation), so
 * an int8 or bf16 step computes exactly what the torch step computes on the dequantised weights
 * (models/quantize.py rounds the torch weights to the same values; the tests compare the two).
 * models/native.py builds this file, checks the layouts and falls back to torch when it can't.
 *
 * Vector code: the int8 and bf16 inner loops have AVX-512 and AVX2 versions, chosen at build time
 * from what the compiler targets (-march=native); RXRT_SCALAR (or a CPU with neither) builds the
 * plain loops. VNNI and AVX512-BF16 dot products are not used: they need int8/bf16 activations,
 * and converting the weights to float32 in registers is free next to reading them from memory.
 *
 * Layouts (row-major; "input-major" = the nn.Linear weight's transpose; a Mat is one of these):
 *   qkv      (dim, ld_qkv)       Q | K | V columns of self-attention, input-major
 *   o        (hq*hd, dim)        self-attention output projection, input-major
 *   cq       (dim, ld_cq)        memory cross-attention query columns, input-major
 *   co       (cq*hd, dim)        memory cross-attention output projection, input-major
 *   router   (experts, dim)      nn.Linear layout, float32
 *   w_in     (experts*dim, 2H)   [gate | up], input-major per expert
 *   w_out    (experts*H, dim)    input-major per expert
 *   lm_head  (dim, ld_head)      input-major
 *   int8 scales of a Mat: (rows, ceil(ld / 32)) floats; W[d, c] = q[d, c] * scale[d, c / 32]
 *   k/v cache of a layer: row b at + b*cache_row, then (kv_heads, max_len, hd) contiguous
 *   memory k/v of a layer: row b at + b*mem_row, then (cross_kv_heads, stm, hd) contiguous
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if !defined(RXRT_SCALAR) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#endif

#if defined(RXRT_SCALAR)
#define RXRT_ISA "scalar (forced)"
#elif defined(__AVX512F__)
#define RXRT_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define RXRT_ISA "avx2"
#else
#define RXRT_ISA "scalar"
#endif

/* The vector code this build runs (for logs and the tests that force the scalar path). */
const char *rxt_isa(void) { return RXRT_ISA; }

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2 };
#define QBLOCK 32 /* int8: columns sharing one scale */

/* A weight matrix of `rows` x ld elements in one of the three formats. */
typedef struct {
    const void *w;
    const float *scale; /* int8 only: (rows, ceil(ld / QBLOCK)) */
    int64_t ld, type;
} Mat;

/* The same matrix from row `row` on (an expert's block, a thread's share of the rows). */
static Mat mat_rows(Mat m, int64_t row) {
    static const int64_t size[] = {4, 2, 1};
    Mat out = m;
    out.w = (const char *)m.w + row * m.ld * size[m.type];
    if (m.scale) out.scale = m.scale + row * ((m.ld + QBLOCK - 1) / QBLOCK);
    return out;
}

typedef struct {
    Mat qkv, o, cq, co, w_in, w_out;
    const float *self_norm, *qkv_bias, *o_bias;
    const float *cross_norm, *cq_bias, *co_bias;
    const float *ffn_norm, *router;
    const float *b_in, *b_out; /* per-expert biases (E, 2H) and (E, dim), or NULL */
    float *k_cache, *v_cache;
    const float *mem_k, *mem_v;
} RxtLayer;

typedef struct {
    int64_t n_layers, dim, head_dim, hq, hkv, cq, ckv;
    int64_t n_experts, top_k, hidden, vocab, max_len, stm, n_positions;
    int64_t cache_row, mem_row;
    int64_t rope_mode;   /* 0: rotate-half; 1: adjacent pairs in place; 2: adjacent pairs, split */
    int64_t rope_offset; /* added to the position RoPE rotates by (RxLM's interact: 1) */
    float eps;
    Mat lm_head;
    const float *embedding, *final_norm, *cos, *sin; /* final_norm NULL: none */
    const float *head_bias;                                    /* or NULL */
    RxtLayer *layers;
} RxtModel;

/* Columns [*c0, *c1) of n for thread t of nt, in multiples of 16 floats (one cache line pair). */
static void split(int64_t n, int t, int nt, int64_t *c0, int64_t *c1) {
    int64_t blocks = (n + 15) / 16;
    int64_t b0 = blocks * t / nt, b1 = blocks * (t + 1) / nt;
    *c0 = b0 * 16 < n ? b0 * 16 : n;
    *c1 = b1 * 16 < n ? b1 * 16 : n;
}

static float bf16_to_f32(uint16_t h) { /* bfloat16 is the top half of a float32 */
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* acc[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c] for c < n, with bfloat16 rows. */
static void fma4_bf16(float *restrict acc, const uint16_t *r0, const uint16_t *r1, const uint16_t *r2,
                      const uint16_t *r3, float a0, float a1, float a2, float a3, int64_t n) {
    int64_t c = 0;
#if !defined(RXRT_SCALAR) && defined(__AVX512F__)
#define BF16x16(r) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)((r) + c))), 16))
    const __m512 v0 = _mm512_set1_ps(a0), v1 = _mm512_set1_ps(a1), v2 = _mm512_set1_ps(a2), v3 = _mm512_set1_ps(a3);
    for (; c + 16 <= n; c += 16) {
        __m512 s = _mm512_loadu_ps(acc + c);
        s = _mm512_fmadd_ps(v0, BF16x16(r0), s);
        s = _mm512_fmadd_ps(v1, BF16x16(r1), s);
        s = _mm512_fmadd_ps(v2, BF16x16(r2), s);
        s = _mm512_fmadd_ps(v3, BF16x16(r3), s);
        _mm512_storeu_ps(acc + c, s);
    }
#elif !defined(RXRT_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define BF16x8(r) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)((r) + c))), 16))
    const __m256 v0 = _mm256_set1_ps(a0), v1 = _mm256_set1_ps(a1), v2 = _mm256_set1_ps(a2), v3 = _mm256_set1_ps(a3);
    for (; c + 8 <= n; c += 8) {
        __m256 s = _mm256_loadu_ps(acc + c);
        s = _mm256_fmadd_ps(v0, BF16x8(r0), s);
        s = _mm256_fmadd_ps(v1, BF16x8(r1), s);
        s = _mm256_fmadd_ps(v2, BF16x8(r2), s);
        s = _mm256_fmadd_ps(v3, BF16x8(r3), s);
        _mm256_storeu_ps(acc + c, s);
    }
#endif
    for (; c < n; c++)
        acc[c] += a0 * bf16_to_f32(r0[c]) + a1 * bf16_to_f32(r1[c]) + a2 * bf16_to_f32(r2[c]) +
                  a3 * bf16_to_f32(r3[c]);
}

/* The same with int8 rows; the callers fold each block's scale into a0..a3. */
static void fma4_i8(float *restrict acc, const int8_t *r0, const int8_t *r1, const int8_t *r2, const int8_t *r3,
                    float a0, float a1, float a2, float a3, int64_t n) {
    int64_t c = 0;
#if !defined(RXRT_SCALAR) && defined(__AVX512F__)
#define I8x16(r) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const void *)((r) + c))))
    const __m512 v0 = _mm512_set1_ps(a0), v1 = _mm512_set1_ps(a1), v2 = _mm512_set1_ps(a2), v3 = _mm512_set1_ps(a3);
    for (; c + 16 <= n; c += 16) {
        __m512 s = _mm512_loadu_ps(acc + c);
        s = _mm512_fmadd_ps(v0, I8x16(r0), s);
        s = _mm512_fmadd_ps(v1, I8x16(r1), s);
        s = _mm512_fmadd_ps(v2, I8x16(r2), s);
        s = _mm512_fmadd_ps(v3, I8x16(r3), s);
        _mm512_storeu_ps(acc + c, s);
    }
#elif !defined(RXRT_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define I8x8(r) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const void *)((r) + c))))
    const __m256 v0 = _mm256_set1_ps(a0), v1 = _mm256_set1_ps(a1), v2 = _mm256_set1_ps(a2), v3 = _mm256_set1_ps(a3);
    for (; c + 8 <= n; c += 8) {
        __m256 s = _mm256_loadu_ps(acc + c);
        s = _mm256_fmadd_ps(v0, I8x8(r0), s);
        s = _mm256_fmadd_ps(v1, I8x8(r1), s);
        s = _mm256_fmadd_ps(v2, I8x8(r2), s);
        s = _mm256_fmadd_ps(v3, I8x8(r3), s);
        _mm256_storeu_ps(acc + c, s);
    }
#endif
    for (; c < n; c++) acc[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
}

/* acc[c] += sum_{d in [d0, d1)} xs[d] * W[d, c] for c in [c0, c1), float32 W, four weight rows at
 * a time (a quarter of the accumulator loads and stores of one row at a time). */
static void axpy_f32(float *restrict acc, const float *xs, const float *w, int64_t ld, int64_t d0, int64_t d1,
                     int64_t c0, int64_t c1) {
    int64_t d = d0;
    for (; d + 4 <= d1; d += 4) {
        const float x0 = xs[d], x1 = xs[d + 1], x2 = xs[d + 2], x3 = xs[d + 3];
        const float *restrict r0 = w + d * ld, *restrict r1 = r0 + ld, *restrict r2 = r1 + ld, *restrict r3 = r2 + ld;
        for (int64_t c = c0; c < c1; c++) acc[c] += x0 * r0[c] + x1 * r1[c] + x2 * r2[c] + x3 * r3[c];
    }
    for (; d < d1; d++) {
        const float x0 = xs[d];
        const float *restrict r0 = w + d * ld;
        for (int64_t c = c0; c < c1; c++) acc[c] += x0 * r0[c];
    }
}

/* The same for a Mat of any format. bf16 and int8 go four rows at a time too; a leftover row is
 * a group of four with zero coefficients for the other three (which repeat the row: cached). */
static void axpy_rows(float *restrict acc, const float *xs, Mat m, int64_t d0, int64_t d1, int64_t c0, int64_t c1) {
    if (m.type == W_F32) {
        axpy_f32(acc, xs, m.w, m.ld, d0, d1, c0, c1);
        return;
    }
    const int64_t ld = m.ld, nblk = (ld + QBLOCK - 1) / QBLOCK;
    for (int64_t d = d0; d < d1;) {
        const int four = d + 4 <= d1;
        const int64_t r[4] = {d, four ? d + 1 : d, four ? d + 2 : d, four ? d + 3 : d};
        const float x[4] = {xs[d], four ? xs[d + 1] : 0.0f, four ? xs[d + 2] : 0.0f, four ? xs[d + 3] : 0.0f};
        if (m.type == W_BF16) {
            const uint16_t *w = m.w;
            fma4_bf16(acc + c0, w + r[0] * ld + c0, w + r[1] * ld + c0, w + r[2] * ld + c0, w + r[3] * ld + c0, x[0],
                      x[1], x[2], x[3], c1 - c0);
        } else { /* int8: one call per block of QBLOCK columns, the block's scales folded into x */
            const int8_t *w = m.w;
            const float *s0 = m.scale + r[0] * nblk, *s1 = m.scale + r[1] * nblk, *s2 = m.scale + r[2] * nblk,
                        *s3 = m.scale + r[3] * nblk;
            for (int64_t c = c0; c < c1;) {
                const int64_t blk = c / QBLOCK, end = (blk + 1) * QBLOCK < c1 ? (blk + 1) * QBLOCK : c1;
                fma4_i8(acc + c, w + r[0] * ld + c, w + r[1] * ld + c, w + r[2] * ld + c, w + r[3] * ld + c,
                        x[0] * s0[blk], x[1] * s1[blk], x[2] * s2[blk], x[3] * s3[blk], end - c);
                c = end;
            }
        }
        d += four ? 4 : 1;
    }
}

/* out[b, :] (+)= x[b, :] @ W (+ bias) for rows b < n: W is (k, cols) with row stride ld.
 * Wide matrices (the LM head) are split by columns: each thread streams long runs of every
 * row. Narrow ones are split by rows, so each thread streams one contiguous block, and the
 * threads' partial sums are added at the end; half-rows with gaps between them read slower. */
static void gemv(int n, const float *x, int64_t k, Mat w, int64_t cols,
                 const float *bias, float *out, int accumulate, int nt) {
    const int by_rows = cols < 2048 * nt && nt > 1;
    float *partial = by_rows ? malloc(sizeof(float) * (size_t)(nt * n * cols)) : NULL;
    const int split_rows = by_rows && partial;
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num(), count = omp_get_num_threads();
        int64_t c0, c1;
        split(cols, t, count, &c0, &c1);
        if (split_rows) {
            const int64_t d0 = k * t / count, d1 = k * (t + 1) / count;
            float *mine = partial + (int64_t)t * n * cols;
            memset(mine, 0, sizeof(float) * (size_t)(n * cols));
            for (int b = 0; b < n; b++) axpy_rows(mine + b * cols, x + (int64_t)b * k, w, d0, d1, 0, cols);
#pragma omp barrier
        }
        for (int b = 0; b < n; b++) {
            float *o = out + (int64_t)b * cols;
            if (!accumulate)
                for (int64_t c = c0; c < c1; c++) o[c] = 0.0f;
            if (bias)
                for (int64_t c = c0; c < c1; c++) o[c] += bias[c];
            if (split_rows)
                for (int j = 0; j < count; j++)
                    for (int64_t c = c0; c < c1; c++) o[c] += partial[((int64_t)j * n + b) * cols + c];
            else
                axpy_rows(o, x + (int64_t)b * k, w, 0, k, c0, c1);
        }
    }
    free(partial);
}

static void rms_norm(int n, int64_t dim, const float *x, const float *weight, float eps, float *out) {
    for (int b = 0; b < n; b++) {
        const float *xb = x + b * dim;
        float ss = 0.0f;
        for (int64_t i = 0; i < dim; i++) ss += xb[i] * xb[i];
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++) out[b * dim + i] = xb[i] * scale * weight[i];
    }
}

/* RoPE. Mode 0, rotate-half: u' = u * cos + rotate_half(u) * sin. Modes 1 and 2 rotate the
 * adjacent pairs (u_2j, u_2j+1) by angle j (the tables repeat each angle in both halves) and write
 * the pair back in place (1) or as [all firsts | all seconds] (2, RxLM 0.2). */
static void rope(float *u, int64_t hd, const float *cos, const float *sin, int64_t mode) {
    const int64_t half = hd / 2;
    float tmp[512];
    memcpy(tmp, u, hd * sizeof(float));
    if (mode == 0) {
        for (int64_t i = 0; i < hd; i++) {
            const float rot = i < half ? -tmp[i + half] : tmp[i - half];
            u[i] = tmp[i] * cos[i] + rot * sin[i];
        }
        return;
    }
    for (int64_t j = 0; j < half; j++) {
        const float a = tmp[2 * j], b = tmp[2 * j + 1];
        const float first = a * cos[j] - b * sin[j], second = a * sin[j] + b * cos[j];
        if (mode == 1) {
            u[2 * j] = first;
            u[2 * j + 1] = second;
        } else {
            u[j] = first;
            u[half + j] = second;
        }
    }
}

/* softmax(q . k_t / sqrt(hd)) over t < len, applied to v: keys/values (len, hd) contiguous. */
static void attend(const float *q, const float *k, const float *v, int64_t len, int64_t hd, float *scores,
                   float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    float best = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        float s = 0.0f;
        for (int64_t i = 0; i < hd; i++) s += q[i] * k[t * hd + i];
        s *= scale;
        scores[t] = s;
        if (s > best) best = s;
    }
    float total = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        scores[t] = expf(scores[t] - best);
        total += scores[t];
    }
    for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const float p = scores[t] / total;
        for (int64_t i = 0; i < hd; i++) out[i] += p * v[t * hd + i];
    }
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* Logits (n, vocab) for tokens (n,) at positions (n,); writes each row's keys/values into the
 * cache at its position. Returns 0, or -1 for a token or position out of range (nothing is
 * written then). */
int rxt_decode_step(const RxtModel *m, int n, const int64_t *tokens, const int64_t *positions, float *logits,
                    int nt) {
    for (int b = 0; b < n; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -1;
        if (positions[b] < 0 || positions[b] >= m->max_len || positions[b] + m->rope_offset >= m->n_positions)
            return -1;
    }
    const int64_t D = m->dim, hd = m->head_dim, H = m->hidden, K = m->top_k, E = m->n_experts;
    const int64_t qkv_cols = (m->hq + 2 * m->hkv) * hd, long_seq = m->max_len > m->stm ? m->max_len : m->stm;
    const int pairs = n * (int)K;
    /* One block of scratch for the whole step. */
    const int64_t sizes[] = {n * D,        n * D, n * qkv_cols, n * m->hq * hd, n * m->hq * long_seq, n * E,
                             2 * pairs * 2 * H, 2 * pairs * D, 2 * pairs * (H / 2 + 1)};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) total += sizes[i];
    total = (total + 15) / 16 * 16; /* the expert ids after the floats stay aligned */
    float *scratch = malloc((size_t)total * sizeof(float) + (size_t)pairs * (sizeof(int64_t) + sizeof(float)));
    if (!scratch) return -2;
    int64_t *chosen = (int64_t *)(scratch + total); /* each pair's expert and mixing weight */
    float *mix = (float *)(chosen + pairs);
    float *x = scratch, *h = x + sizes[0], *qkv = h + sizes[1], *att = qkv + sizes[2], *scores = att + sizes[3],
          *route = scores + sizes[4], *gu = route + sizes[5], *ys = gu + sizes[6], *act = ys + sizes[7];

    for (int b = 0; b < n; b++) memcpy(x + b * D, m->embedding + tokens[b] * D, D * sizeof(float));

    for (int64_t l = 0; l < m->n_layers; l++) {
        const RxtLayer *L = &m->layers[l];
        /* Self-attention: Q/K/V in one product, RoPE on Q and K, cache write, attention. */
        rms_norm(n, D, x, L->self_norm, m->eps, h);
        gemv(n, h, D, L->qkv, qkv_cols, L->qkv_bias, qkv, 0, nt);
        for (int b = 0; b < n; b++) {
            const int64_t at_pos = (positions[b] + m->rope_offset) * hd;
            const float *cos = m->cos + at_pos, *sin = m->sin + at_pos;
            float *row = qkv + b * qkv_cols;
            for (int64_t j = 0; j < m->hq + m->hkv; j++) rope(row + j * hd, hd, cos, sin, m->rope_mode);
            for (int64_t g = 0; g < m->hkv; g++) {
                const int64_t at = b * m->cache_row + (g * m->max_len + positions[b]) * hd;
                memcpy(L->k_cache + at, row + (m->hq + g) * hd, hd * sizeof(float));
                memcpy(L->v_cache + at, row + (m->hq + m->hkv + g) * hd, hd * sizeof(float));
            }
        }
        const int64_t heads = n * m->hq;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t bj = 0; bj < heads; bj++) {
            const int64_t b = bj / m->hq, j = bj % m->hq, g = j / (m->hq / m->hkv);
            const int64_t at = b * m->cache_row + g * m->max_len * hd;
            attend(qkv + b * qkv_cols + j * hd, L->k_cache + at, L->v_cache + at, positions[b] + 1, hd,
                   scores + bj * long_seq, att + bj * hd);
        }
        gemv(n, att, m->hq * hd, L->o, D, L->o_bias, x, 1, nt);

        /* Memory cross-attention: queries rotated, keys/values are the STM's (no position). */
        rms_norm(n, D, x, L->cross_norm, m->eps, h);
        gemv(n, h, D, L->cq, m->cq * hd, L->cq_bias, qkv, 0, nt);
        for (int b = 0; b < n; b++)
            for (int64_t j = 0; j < m->cq; j++)
                rope(qkv + (b * m->cq + j) * hd, hd, m->cos + (positions[b] + m->rope_offset) * hd,
                     m->sin + (positions[b] + m->rope_offset) * hd, m->rope_mode);
        const int64_t cheads = n * m->cq;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t bj = 0; bj < cheads; bj++) {
            const int64_t b = bj / m->cq, j = bj % m->cq, g = j / (m->cq / m->ckv);
            const int64_t at = b * m->mem_row + g * m->stm * hd;
            attend(qkv + bj * hd, L->mem_k + at, L->mem_v + at, m->stm, hd, scores + bj * long_seq, att + bj * hd);
        }
        gemv(n, att, m->cq * hd, L->co, D, L->co_bias, x, 1, nt);

        /* MoE: top-k of the router logits, softmax over those k, SwiGLU experts. */
        rms_norm(n, D, x, L->ffn_norm, m->eps, h);
        for (int b = 0; b < n; b++) {
            float *r = route + b * E;
            for (int64_t e = 0; e < E; e++) {
                float s = 0.0f;
                for (int64_t i = 0; i < D; i++) s += h[b * D + i] * L->router[e * D + i];
                r[e] = s;
            }
            float top = -INFINITY, total = 0.0f;
            for (int64_t k = 0; k < K; k++) { /* the k largest, first index on ties (like topk) */
                int64_t arg = -1;
                for (int64_t e = 0; e < E; e++)
                    if (r[e] == r[e] && (arg < 0 || r[e] > r[arg])) {
                        int used = 0;
                        for (int64_t j = 0; j < k; j++) used |= chosen[b * K + j] == e;
                        if (!used) arg = e;
                    }
                if (arg < 0) arg = 0; /* all NaN: any expert; the output is NaN anyway */
                chosen[b * K + k] = arg;
                mix[b * K + k] = r[arg];
                if (r[arg] > top) top = r[arg];
            }
            for (int64_t k = 0; k < K; k++) total += (mix[b * K + k] = expf(mix[b * K + k] - top));
            for (int64_t k = 0; k < K; k++) mix[b * K + k] /= total;
        }
        /* Work items: (pair, part of the input rows), each one contiguous block of an expert's
         * weights. Whole experts when they divide evenly among the threads, else halves; the
         * parts' partial sums are added before the activation and at the end. */
        const int parts = pairs % nt == 0 ? 1 : 2;
#pragma omp parallel num_threads(nt)
        {
            const int t = omp_get_thread_num(), count = omp_get_num_threads();
            for (int item = t; item < parts * pairs; item += count) {
                const int p = item / parts, part = item % parts;
                float *o = gu + (int64_t)item * 2 * H;
                memset(o, 0, sizeof(float) * (size_t)(2 * H));
                axpy_rows(o, h + (p / K) * D, mat_rows(L->w_in, chosen[p] * D), D * part / parts,
                          D * (part + 1) / parts, 0, 2 * H);
            }
#pragma omp barrier
            for (int item = t; item < parts * pairs; item += count) {
                const int p = item / parts, part = item % parts;
                const float *g = gu + (int64_t)(parts * p) * 2 * H;
                float *a = act + (int64_t)item * (H / 2 + 1) * (3 - parts);
                const int64_t r0 = H * part / parts, r1 = H * (part + 1) / parts;
                const float *bias = L->b_in ? L->b_in + chosen[p] * 2 * H : NULL;
                for (int64_t r = r0; r < r1; r++) {
                    float gate = g[r], up = g[H + r];
                    if (parts == 2) gate += g[2 * H + r], up += g[3 * H + r];
                    if (bias) gate += bias[r], up += bias[H + r];
                    a[r - r0] = silu(gate) * up;
                }
                float *o = ys + (int64_t)item * D;
                memset(o, 0, sizeof(float) * (size_t)D);
                axpy_rows(o, a, mat_rows(L->w_out, chosen[p] * H + r0), 0, r1 - r0, 0, D);
            }
        }
        for (int p = 0; p < pairs; p++) {
            float *xb = x + (p / K) * D;
            for (int part = 0; part < parts; part++) {
                const float *y = ys + (int64_t)(parts * p + part) * D;
                for (int64_t c = 0; c < D; c++) xb[c] += mix[p] * y[c];
            }
            if (L->b_out) {
                const float *bias = L->b_out + chosen[p] * D;
                for (int64_t c = 0; c < D; c++) xb[c] += mix[p] * bias[c];
            }
        }
    }
    if (m->final_norm)
        rms_norm(n, D, x, m->final_norm, m->eps, h);
    else
        memcpy(h, x, (size_t)(n * D) * sizeof(float));
    gemv(n, h, D, m->lm_head, m->vocab, m->head_bias, logits, 0, nt);
    free(scratch);
    return 0;
}
