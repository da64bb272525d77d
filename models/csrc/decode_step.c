/* One RxT decoder step on a CPU, for a few rows at a time, in plain C with its own thread pool.
 *
 * Why: a batch-1 decode step is bound by reading the weights (about 120 MB per token at the
 * alpha-mini size in float32) and, in eager torch, by the ~300 tensor operations it dispatches.
 * Here the whole step is one call, and every large read (Q/K/V and output projections, the
 * chosen experts, the LM head) is split across the threads so that all cores stream weights at
 * once. The large matrices may be stored as float32, bfloat16 or int8 with one float scale per
 * column and block of 32 inputs (llama.cpp's q8_0 blocking: fewer bytes per token is the only way
 * past the memory bandwidth). bf16 is weight-only: activations and sums stay float32, so a bf16
 * step computes what the torch step computes on the rounded weights. int8 quantises the
 * activations too, per block of 32 inputs (s = max|x| / 127, x ~ s * round(x / s)), and sums each
 * block's products in integers, converting to float once per 32 inputs: converting every weight
 * to float cost more than reading it. That changes the numbers slightly against the torch step
 * (tests/test_quantize.py states by how much); the integer sums are exact, so every build (VNNI,
 * AVX2, scalar) gives the same bits. models/quantize.py rounds the torch weights to the values
 * the int8 copy holds. models/native.py builds this file, checks the layouts and falls back to
 * torch when it can't.
 *
 * Vector code, chosen at build time from what the compiler targets (-march=native): bf16 has
 * AVX-512 and AVX2 loops; int8 uses AVX512-VNNI (vpdpbusd: unsigned weights q + 128 times signed
 * activations, minus 128 * sum(x_q) per block), else AVX2 (vpmaddubsw on |x_q| and q signed by
 * x_q: no pair sum saturates as |q|, |x_q| <= 127). RXRT_SCALAR (or a CPU with neither) builds
 * the plain loops. Several rows of one call (a prefill chunk, a decode batch) go through the
 * multi-row int8 kernel (i8_tiles_rows: each weight block applied to up to ROWS_MAX rows from
 * registers, with the one-row kernel's bits), and an MoE groups its rows by expert (moe_grouped).
 * A bf16 router (RxLM's router_amp) is computed as torch computes it, ties included (route_bf16).
 * The attention of each (token, head) over float32 keys/values (attend) has AVX-512 and AVX2 code
 * too, which follows the plain loops' order of operations exactly: every build gives the same bits.
 *
 * Layouts (row-major; "input-major" = the nn.Linear weight's transpose; a Mat is one of these):
 *   qkv      (dim, ld_qkv)       Q | K | V columns of self-attention, input-major
 *   o        (out*hd, dim)       self-attention output projection, input-major (out: the output
 *                                heads, max(q, kv): reversed SQA tiles the query heads)
 *   gate     (dim, out*hd)       self-attention output gate, when gated
 *   cq       (dim, ld_cq)        memory cross-attention query columns, input-major
 *   co, cgate                    memory cross-attention output projection and gate, like o, gate
 *   router   (experts, dim)      nn.Linear layout, float32 (so are the shared experts' gate)
 *   w_in     (experts*dim, 2H)   [gate | up], input-major per expert
 *   w_out    (experts*H, dim)    input-major per expert
 *   dense / shared experts: w_in (dim, 2H), w_out (H, dim), input-major
 *   lm_head  (dim, ld_head)      input-major
 *   A float32 Mat may also be W_F32T, the transpose in place (an nn.Linear weight: gates, dense
 *   feed-forwards); bf16 and int8 Mats are always input-major copies.
 *   int8 Mat: W[d, c] = q[d, c] * s[d / 32, c], q in [-127, 127], blocks restarting at every
 *            segment of `seg` rows (an expert's rows; one segment elsewhere, rows past its end
 *            count as zero). Stored per segment, per tile of 16 columns (ld = the columns
 *            rounded up to 16), per block of 32 rows: I8_BLOCK bytes = 8 groups of 4 rows, each
 *            64 bytes with column j's 4 values (q + 128, uint8) at 4 j, then the 16 float scales.
 *            One 64-byte load is 16 columns x 4 inputs (vpdpbusd's operand), and a tile's blocks
 *            follow one another: a thread reading a range of columns reads one contiguous range.
 *   q4 Mat:  W[d, c] = q[d, c] * s[d / 32, c] + m[d / 32, c], q in [0, 15] (llama.cpp's Q4_1
 *            values: a GGUF backbone's matrices are exactly these, so nothing is rounded), laid
 *            out as the int8 Mat with Q4_BLOCK bytes per block (q4_tiles): 0.625 bytes a weight
 *            against int8's 1.125, for a decode step that reads every weight once a token.
 *   k/v cache of a layer: row b at + b*cache_row, then (kv_heads, max_len, hd) contiguous
 *   memory k/v of a layer: row b at + b*mem_row, then (cross_kv_heads, stm, hd) contiguous float32,
 *            or (mem_bf16) bfloat16 copies (cross_kv_heads, hd, stm): each head transposed
 */
#define _POSIX_C_SOURCE 200809L /* clock_gettime and sched_yield under -std=c11 */
#include <math.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if !defined(RXRT_SCALAR) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__)))
#include <immintrin.h>
#endif
#if !defined(RXRT_SCALAR) && defined(__AVX512F__) && defined(__AVX512VNNI__)
#define I8_VNNI 1
#elif !defined(RXRT_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define I8_AVX2 1
#endif

#if defined(RXRT_SCALAR)
#define RXRT_ISA "scalar (forced)"
#elif defined(__AVX512F__) && defined(__AVX512VNNI__)
#define RXRT_ISA "avx512-vnni"
#elif defined(__AVX512F__)
#define RXRT_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define RXRT_ISA "avx2"
#else
#define RXRT_ISA "scalar"
#endif

/* The vector code this build runs (for logs and the tests that force the scalar path). */
const char *rxt_isa(void) { return RXRT_ISA; }

/* The step's threads: one OpenMP region per step, its team then driven by the step itself.
 * Why not a `#pragma omp parallel` per product, as before: libgomp cuts its threads' spinning to
 * ~100 iterations whenever the process holds more OpenMP threads than CPUs, which every engine
 * does (torch gives each thread that runs a parallel op its own team: the main thread, the
 * decode thread, the memory worker). The workers then slept on a futex after each of the step's
 * ~10 regions per layer and were woken for the next: RxT-Beta's step took 23 ms in the engine
 * against 12 ms alone (docs/benchmarks.md §9). Now only the step's start and end go through
 * libgomp; in between, thread 0 runs the step and hands each parallel part to the team through
 * a counter the others spin on (Team), and parts that need one wait at a spinning barrier. The
 * team's threads are torch's own OpenMP threads for the calling thread (the library is linked to
 * torch's runtime), so no second set of threads competes with torch's for the cores. A thread
 * that has spun WAIT_SPIN_NS without news yields the CPU between checks (another process may
 * need it).
 *
 * parallel(nt, fn, ctx) runs fn(ctx, t, count) on every thread t < count of the team (t = 0 the
 * caller) and returns when all have; outside a step's team, or with nt <= 1, it is fn(ctx, 0, 1).
 * team_barrier(count) inside fn waits for the team. */
#define WAIT_SPIN_NS 50000 /* spinning before yielding between checks (50 us) */

typedef void (*PoolTask)(void *ctx, int t, int nt);

typedef struct {
    atomic_ullong generation; /* bumped for every part handed out */
    atomic_int done, bar_count, bar_generation, stop;
    _Atomic(PoolTask) fn;
    _Atomic(void *) ctx;
    int nt;
} Team;

static _Thread_local Team *team_here; /* the team of this step, on thread 0 and on the others */
static _Thread_local int team_rank;

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return 1e9 * (double)ts.tv_sec + (double)ts.tv_nsec;
}

static void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* One round of waiting, the i-th: a pause, and past WAIT_SPIN_NS (checked every 64 rounds) a
   yield of the CPU to whoever needs it. */
static void wait_round(int i, double *until) {
    cpu_relax();
    if ((i & 63) == 63) {
        const double t = now_ns();
        if (*until == 0.0) *until = t + WAIT_SPIN_NS;
        else if (t > *until) sched_yield();
    }
}

/* Spin until *word != value. */
static void wait_change_u64(atomic_ullong *word, unsigned long long value) {
    double until = 0.0;
    for (int i = 0; atomic_load(word) == value; i++) wait_round(i, &until);
}

static void wait_change_int(atomic_int *word, int value) {
    double until = 0.0;
    for (int i = 0; atomic_load(word) == value; i++) wait_round(i, &until);
}

/* Threads 1.. of a step's team: run each part handed out until the step ends. */
static void team_work(Team *T, int t) {
    team_here = T, team_rank = t;
    unsigned long long seen = 0;
    for (;;) {
        wait_change_u64(&T->generation, seen);
        seen = atomic_load(&T->generation);
        if (atomic_load(&T->stop)) break;
        atomic_load(&T->fn)(atomic_load(&T->ctx), t, T->nt);
        atomic_fetch_add(&T->done, 1);
    }
    team_here = NULL;
}

static void parallel(int nt, PoolTask fn, void *ctx) {
    Team *T = team_here;
    if (nt <= 1 || !T || T->nt <= 1 || team_rank != 0) {
        fn(ctx, 0, 1);
        return;
    }
    atomic_store(&T->fn, fn);
    atomic_store(&T->ctx, ctx);
    atomic_store(&T->done, 0);
    atomic_store(&T->bar_count, 0);
    atomic_fetch_add(&T->generation, 1);
    fn(ctx, 0, T->nt);
    for (int d; (d = atomic_load(&T->done)) < T->nt - 1;) wait_change_int(&T->done, d);
}

/* Inside a part: wait until the team's threads have all arrived. */
static void team_barrier(int count) {
    Team *T = team_here;
    if (count <= 1 || !T) return;
    const int g = atomic_load(&T->bar_generation);
    if (atomic_fetch_add(&T->bar_count, 1) == count - 1) {
        atomic_store(&T->bar_count, 0);
        atomic_fetch_add(&T->bar_generation, 1);
        return;
    }
    wait_change_int(&T->bar_generation, g);
}

/* The items [0, n) in contiguous parts, one per thread (OpenMP's static schedule). */
typedef struct {
    void (*item)(void *ctx, int64_t i);
    void *ctx;
    int64_t n;
} ForEach;

static void for_each_task(void *c, int t, int nt) {
    const ForEach *f = c;
    for (int64_t i = f->n * t / nt, end = f->n * (t + 1) / nt; i < end; i++) f->item(f->ctx, i);
}

static void parallel_for(int nt, int64_t n, void (*item)(void *ctx, int64_t i), void *ctx) {
    ForEach f = {item, ctx, n};
    parallel(nt, for_each_task, &f);
}

/* W_F32T: float32 in nn.Linear's (out, in) layout; W_Q4: 4-bit levels with a scale and a minimum
 * per block (llama.cpp's Q4_1 values), for matrices whose values are exactly that already. */
enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_F32T = 3, W_Q4 = 4 };
#define QBLOCK 32                       /* int8, q4: inputs sharing one scale (of a column; of x) */
#define I8_BLOCK (QBLOCK * 16 + 64)     /* int8: bytes of one block of one 16-column tile */
#define Q4_BLOCK (QBLOCK * 16 / 2 + 64) /* q4: the same block's bytes (nibbles, 16 + 16 halfs) */
#define I8_CHUNK 64                  /* int8: blocks of x quantised at a time (on the stack) */

/* A weight matrix of rows x ld elements in one of the formats (int8: see the top). W_F32T is the
 * transpose in place (an nn.Linear weight that no decode layout touched: a dense feed-forward, an
 * attention gate): element (d, c) at w[c * ld + d], read as dot products. */
typedef struct {
    const void *w;
    int64_t ld, type;
    int64_t seg; /* int8: rows per segment (blocks restart at each); unused otherwise */
} Mat;

/* Blocks of 32 rows in a segment of an int8 or q4 Mat (its tiles are this many blocks apart). */
static int64_t seg_blocks(Mat m) { return (m.seg + QBLOCK - 1) / QBLOCK; }

/* int8 and q4 Mats: stored by tiles of blocks, the activations quantised per block. */
static int quantised(Mat m) { return m.type == W_I8 || m.type == W_Q4; }
static int64_t block_bytes(Mat m) { return m.type == W_Q4 ? Q4_BLOCK : I8_BLOCK; }

/* The same matrix from row `row` on (an expert's rows, a part of them). int8: `row` must start a
 * block of its segment (split_k gives such rows); the tiles stay a whole segment apart. */
static Mat mat_rows(Mat m, int64_t row) {
    static const int64_t size[] = {4, 2, 1};
    Mat out = m;
    if (quantised(m)) {
        const int64_t seg = row / m.seg, block = row % m.seg / QBLOCK;
        out.w = (const uint8_t *)m.w + (seg * (m.ld / 16) * seg_blocks(m) + block) * block_bytes(m);
    } else if (m.type == W_F32T) {
        out.w = (const float *)m.w + row;
    } else {
        out.w = (const char *)m.w + row * m.ld * size[m.type];
    }
    return out;
}

/* Where part i of `parts` of k input rows begins: int8 parts start at a block of QBLOCK rows. */
static int64_t split_k(Mat m, int64_t k, int64_t i, int64_t parts) {
    if (!quantised(m)) return k * i / parts;
    const int64_t at = QBLOCK * (((k + QBLOCK - 1) / QBLOCK) * i / parts);
    return at < k ? at : k;
}

/* A feed-forward (act(x W_gate + b) * (x W_up + b)) W_out + b_out, or (not gated)
 * act(x W_in + b) W_out + b_out: a dense layer's, or one shared expert's. */
typedef struct {
    Mat w_in, w_out;            /* (dim, 2H) [gate | up] (not gated: (dim, H)) and (H, dim), input-major */
    const float *b_in, *b_out;  /* (2H or H) and (dim), or NULL */
    int64_t hidden, gated;      /* H */
} RxtFfn;

/* One decoder layer, described by the sub-blocks it has:
 *   self-attention, always; gated when gate.w is set: the heads' output times act(h W_gate + b);
 *   memory cross-attention when cross_norm is set (a memory layer), gated likewise by cgate;
 *   the feed-forward: an MoE when router is set (experts w_in/w_out, per-expert biases b_in/b_out,
 *   a global output bias, n_shared shared experts mixed by softmax(h W_shared_gate) when there
 *   are several, a global shared bias, the routed and shared sums scaled), else `dense`. */
typedef struct {
    Mat qkv, o, gate, cq, co, cgate, w_in, w_out;
    const float *self_norm, *qkv_bias, *o_bias, *gate_bias;
    const float *cross_norm, *cq_bias, *co_bias, *cgate_bias;
    const float *ffn_norm, *router;
    const float *self_norm_bias, *cross_norm_bias, *ffn_norm_bias; /* LayerNorm blocks; else NULL */
    const float *b_in, *b_out; /* per-expert biases (E, 2H) and (E, dim), or NULL */
    const float *global_bias;  /* (dim) added once per token, or NULL */
    const RxtFfn *shared;      /* n_shared of them */
    const float *shared_gate;  /* (n_shared, dim), nn.Linear layout; NULL: one shared expert */
    const float *shared_bias;  /* (dim), or NULL */
    RxtFfn dense;
    int64_t n_shared, gate_act, cgate_act, act; /* activations: enum Act */
    int64_t gated;                              /* the experts are gated: w_in (E*dim, 2H), else (E*dim, H) */
    float routed_scale, shared_scale;
    float *k_cache, *v_cache;
    const void *mem_k, *mem_v; /* float32, or (mem_bf16) bf16 transposed; NULL without memory cross-attention */
    const uint16_t *router_bf16; /* (experts, dim) bf16 copy: route as RxLM's router_amp does (route_bf16); or NULL */
} RxtLayer;

typedef struct {
    int64_t n_layers, dim, head_dim, hq, hkv, cq, ckv;
    int64_t n_experts, top_k, hidden, vocab, max_len, stm, n_positions;
    int64_t cache_row, mem_row;
    int64_t n_rows; /* rows the bound cache and memory buffers hold */
    int64_t rope_mode;   /* 0: rotate-half; 1: adjacent pairs in place; 2: adjacent pairs, split */
    int64_t rope_offset; /* added to the position RoPE rotates by (RxLM's interact: 1) */
    int64_t mem_bf16;    /* the memory keys/values are bf16 copies, (hd, stm) per head (else float32) */
    int64_t layer_norm, final_layer_norm; /* the blocks' norms, the final norm: LayerNorm (else RMSNorm) */
    float eps, final_eps;
    Mat lm_head;
    const float *embedding, *final_norm, *cos, *sin; /* final_norm NULL: none */
    const float *final_norm_bias, *head_bias;                  /* or NULL */
    RxtLayer *layers;
    int64_t row_block; /* activation rows per pass of the int8 kernels (at most ROWS_MAX); 1: row by row */
    int64_t attend_old; /* nonzero: the attention as it was before its vector code (attend_old), for benchmarks */
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

/* x (n values) per block of QBLOCK: xq = round(x / s) in [-127, 127] with s = max|x| / 127 (0 for
 * an all-zero block), the block's sum of xq (the VNNI kernel's correction), the last block padded
 * with zeros. A NaN makes the block's scale NaN (so is the product, as in float32). One plain loop
 * for every build: the same xq everywhere. */
static void quantize_x(const float *x, int64_t n, int8_t *xq, float *sx, int32_t *xsum) {
    for (int64_t b = 0; b * QBLOCK < n; b++) {
        const float *xb = x + b * QBLOCK;
        const int64_t len = n - b * QBLOCK < QBLOCK ? n - b * QBLOCK : QBLOCK;

        float amax = 0.0f;
        int nan = 0;
        for (int64_t i = 0; i < len; i++) {
            const float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
            nan |= xb[i] != xb[i];
        }
        const float s = amax / 127.0f;
        const int ok = !nan && s > 0.0f && s < INFINITY;
        int32_t total = 0;
        for (int64_t i = 0; i < QBLOCK; i++) {
            float v = i < len && ok ? nearbyintf(xb[i] / s) : 0.0f;
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            xq[b * QBLOCK + i] = (int8_t)v;
            total += (int32_t)v;
        }
        sx[b] = nan ? NAN : s;
        xsum[b] = total;
    }
}

/* acc[c] += sum_b sx[b] * s[b, c] * sum_{i < 32} xq[32 b + i] * q[32 b + i, c] for c in [c0, c1)
 * (c0 a multiple of 16), over nb blocks of an int8 Mat's tiles from `w` on (tiles `tile` bytes
 * apart). Per column the blocks' terms are added in order into a float starting at 0, with one
 * fused multiply-add each, and that float into acc: every build computes the same bits. */
static void i8_tiles(float *restrict acc, const int8_t *xq, const float *sx, const int32_t *xsum, const uint8_t *w,
                     int64_t tile, int64_t nb, int64_t c0, int64_t c1) {
#if defined(I8_VNNI)
    /* Two tiles at a time where there are two: their dependency chains interleave and they share
     * the broadcasts of x. Each tile's sums are the single-tile ones, in the same order. */
    for (int64_t c = c0; c < c1;) {
        const uint8_t *p = w + c / 16 * tile, *p2 = p + tile;
        const int two = c + 16 < c1;
        __m512 f = _mm512_setzero_ps(), f2 = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++, p += I8_BLOCK, p2 += I8_BLOCK) {
            int32_t x4[8];
            memcpy(x4, xq + b * QBLOCK, sizeof x4);
            __m512i xb[8];
            for (int g = 0; g < 8; g++) xb[g] = _mm512_set1_epi32(x4[g]);
            const __m512i corr = _mm512_set1_epi32(128 * xsum[b]);
            const __m512 sxb = _mm512_set1_ps(sx[b]);
#define DP(s, q, g) _mm512_dpbusd_epi32(s, _mm512_loadu_si512((const void *)((q) + 64 * (g))), xb[g])
#define BLOCK_SUM(q, out)                                                                                          \
    do {                                                                                                           \
        __m512i s0 = DP(_mm512_setzero_si512(), q, 0), s1 = DP(_mm512_setzero_si512(), q, 1);                      \
        s0 = DP(s0, q, 2), s1 = DP(s1, q, 3), s0 = DP(s0, q, 4), s1 = DP(s1, q, 5), s0 = DP(s0, q, 6);            \
        s1 = DP(s1, q, 7);                                                                                         \
        const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), corr);                                         \
        const __m512 scale = _mm512_mul_ps(sxb, _mm512_loadu_ps((const float *)((q) + 512)));                      \
        out = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), out);                                                  \
    } while (0)
            BLOCK_SUM(p, f);
            if (two) BLOCK_SUM(p2, f2);
#undef BLOCK_SUM
#undef DP
        }
        const int64_t valid = c1 - c < 16 ? c1 - c : 16;
        const __mmask16 keep = (__mmask16)((1u << valid) - 1u);
        _mm512_mask_storeu_ps(acc + c, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, acc + c), f));
        if (two) {
            const int64_t valid2 = c1 - c - 16 < 16 ? c1 - c - 16 : 16;
            const __mmask16 keep2 = (__mmask16)((1u << valid2) - 1u);
            _mm512_mask_storeu_ps(acc + c + 16, keep2, _mm512_add_ps(_mm512_maskz_loadu_ps(keep2, acc + c + 16), f2));
        }
        c += two ? 32 : 16;
    }
#else
    for (int64_t c = c0; c < c1; c += 16) {
        const uint8_t *p = w + c / 16 * tile;
        const int64_t valid = c1 - c < 16 ? c1 - c : 16;
        float f[16] = {0};
        for (int64_t b = 0; b < nb; b++, p += I8_BLOCK) {
            float scale[16];
            memcpy(scale, p + 512, sizeof scale);
#if defined(I8_AVX2)
            const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
            __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
            for (int g = 0; g < 8; g++) {
                int32_t x4;
                memcpy(&x4, xq + b * QBLOCK + 4 * g, sizeof x4);
                const __m256i x = _mm256_set1_epi32(x4), xa = _mm256_abs_epi8(x);
                const __m256i q0 = _mm256_xor_si256(_mm256_loadu_si256((const void *)(p + 64 * g)), flip);
                const __m256i q1 = _mm256_xor_si256(_mm256_loadu_si256((const void *)(p + 64 * g + 32)), flip);
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(q0, x)), ones));
                s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_maddubs_epi16(xa, _mm256_sign_epi8(q1, x)), ones));
            }
            const __m256 sb = _mm256_set1_ps(sx[b]);
            __m256 f0 = _mm256_loadu_ps(f), f1 = _mm256_loadu_ps(f + 8);
            f0 = _mm256_fmadd_ps(_mm256_mul_ps(sb, _mm256_loadu_ps(scale)), _mm256_cvtepi32_ps(s0), f0);
            f1 = _mm256_fmadd_ps(_mm256_mul_ps(sb, _mm256_loadu_ps(scale + 8)), _mm256_cvtepi32_ps(s1), f1);
            _mm256_storeu_ps(f, f0);
            _mm256_storeu_ps(f + 8, f1);
#else
            int32_t s[16] = {0};
            for (int g = 0; g < 8; g++)
                for (int j = 0; j < 16; j++)
                    for (int i = 0; i < 4; i++)
                        s[j] += ((int32_t)p[64 * g + 4 * j + i] - 128) * xq[b * QBLOCK + 4 * g + i];
            for (int j = 0; j < 16; j++) f[j] = fmaf(sx[b] * scale[j], (float)s[j], f[j]);
#endif
        }
        for (int64_t j = 0; j < valid; j++) acc[c + j] += f[j];
    }
#endif
}

/* A half-precision float's value (exact): a q4 block's scales and minimums are float16. */
static float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
    if (e == 0) { /* zero or subnormal: man * 2^-24 */
        const float v = ldexpf((float)man, -24);
        return sign ? -v : v;
    }
    const uint32_t bits = sign | (e == 31 ? 0x7F800000u | (man << 13) : ((e + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#define ROWS_MAX 8 /* activation rows the multi-row kernels take in one pass (i8_tiles_rows) */

/* Row r's activations quantised per block (quantize_x): xq[r], sx[r], xsum[r] from the first
 * block the product reads. */
typedef struct {
    const int8_t *xq[ROWS_MAX];
    const float *sx[ROWS_MAX];
    const int32_t *xsum[ROWS_MAX];
} QRows;

#if defined(I8_VNNI)
/* One block's integer sums for one row (VNNI): q[g] holds 16 columns x the 4 inputs of group g
 * (unsigned), times the row's 4 quantised inputs of that group, g < 8, in two chains. The
 * multi-row kernels' inner step, int8 and q4 alike. */
static inline __attribute__((always_inline)) __m512i dot_groups(const __m512i *q, const int8_t *xq) {
    int32_t x4[8];
    memcpy(x4, xq, sizeof x4);
#define DPR(s, g) _mm512_dpbusd_epi32(s, q[g], _mm512_set1_epi32(x4[g]))
    __m512i s0 = DPR(_mm512_setzero_si512(), 0), s1 = DPR(_mm512_setzero_si512(), 1);
    s0 = DPR(s0, 2), s1 = DPR(s1, 3), s0 = DPR(s0, 4), s1 = DPR(s1, 5), s0 = DPR(s0, 6), s1 = DPR(s1, 7);
#undef DPR
    return _mm512_add_epi32(s0, s1);
}

/* acc[r][c, c + 16) += f[r] for R rows, the columns from c1 on left alone. */
static inline __attribute__((always_inline)) void add_tile(const int R, float *const *acc, const __m512 *f, int64_t c,
                                                           int64_t c1) {
    const int64_t valid = c1 - c < 16 ? c1 - c : 16;
    const __mmask16 keep = (__mmask16)((1u << valid) - 1u);
    for (int r = 0; r < R; r++)
        _mm512_mask_storeu_ps(acc[r] + c, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, acc[r] + c), f[r]));
}

/* q4_tiles for R rows: a block's 8 groups of levels unpacked once, applied to every row (VNNI
 * builds run q4_tiles as this with one row). */
static inline __attribute__((always_inline)) void q4_tiles_r(const int R, float *const *acc, const QRows *x,
                                                             const uint8_t *w, int64_t tile, int64_t nb, int64_t c0,
                                                             int64_t c1) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t c = c0; c < c1; c += 16) {
        const uint8_t *p = w + c / 16 * tile;
        __m512 f[ROWS_MAX];
        for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++, p += Q4_BLOCK) {
            __m512i q[8];
            for (int h = 0; h < 4; h++) {
                const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * h));
                q[2 * h] = _mm512_and_si512(v, low);
                q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(p + 256)));
            const __m512 mn = _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(p + 288)));
            for (int r = 0; r < R; r++) {
                const __m512i s = dot_groups(q, x->xq[r] + b * QBLOCK);
                const __m512 sxb = _mm512_set1_ps(x->sx[r][b]);
                f[r] = _mm512_fmadd_ps(_mm512_mul_ps(sxb, d), _mm512_cvtepi32_ps(s), f[r]);
                f[r] = _mm512_fmadd_ps(_mm512_mul_ps(sxb, mn), _mm512_set1_ps((float)x->xsum[r][b]), f[r]);
            }
        }
        add_tile(R, acc, f, c, c1);
    }
}
#endif

/* i8_tiles for a q4 Mat: W[d, c] = s[d / 32, c] * q[d, c] + m[d / 32, c] with q in [0, 15], so
 * a block's term is sx * s * sum(xq * q) + sx * m * sum(xq): per column the blocks' terms are added
 * in order into a float starting at 0, s's term then m's, each with one fused multiply-add (every
 * build the same bits). A block is Q4_BLOCK bytes: 4 groups of 64 bytes, group h holding rows
 * 8h..8h+3 in its low nibbles and 8h+4..8h+7 in its high ones (column j's 4 rows at 4 j, as the
 * int8 layout's groups), then the 16 scales and the 16 minimums as float16. Unsigned levels feed
 * vpdpbusd (VNNI) and vpmaddubsw (AVX2) directly: no sign trick, no correction; a block's AVX2
 * pair sums add up in 16 bits (8 x 2 x 15 x 127 < 32768). */
static void q4_tiles(float *restrict acc, const int8_t *xq, const float *sx, const int32_t *xsum, const uint8_t *w,
                     int64_t tile, int64_t nb, int64_t c0, int64_t c1) {
#if defined(I8_VNNI)
    float *const rows[1] = {acc};
    const QRows one = {{xq}, {sx}, {xsum}};
    q4_tiles_r(1, rows, &one, w, tile, nb, c0, c1);
#elif defined(I8_AVX2)
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int64_t c = c0; c < c1; c += 16) {
        const uint8_t *p = w + c / 16 * tile;
        __m256 f0 = _mm256_setzero_ps(), f1 = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++, p += Q4_BLOCK) {
            int32_t x4[8];
            memcpy(x4, xq + b * QBLOCK, sizeof x4);
            __m256i t0 = _mm256_setzero_si256(), t1 = _mm256_setzero_si256();
            for (int h = 0; h < 4; h++) {
                const __m256i xl = _mm256_set1_epi32(x4[2 * h]), xh = _mm256_set1_epi32(x4[2 * h + 1]);
                const __m256i v0 = _mm256_loadu_si256((const void *)(p + 64 * h));
                const __m256i v1 = _mm256_loadu_si256((const void *)(p + 64 * h + 32));
                t0 = _mm256_add_epi16(t0, _mm256_maddubs_epi16(_mm256_and_si256(v0, low), xl));
                t0 = _mm256_add_epi16(t0, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low), xh));
                t1 = _mm256_add_epi16(t1, _mm256_maddubs_epi16(_mm256_and_si256(v1, low), xl));
                t1 = _mm256_add_epi16(t1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low), xh));
            }
            const __m256 sxb = _mm256_set1_ps(sx[b]), xs = _mm256_set1_ps((float)xsum[b]);
            const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(p + 256)));
            const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(p + 272)));
            const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(p + 288)));
            const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const void *)(p + 304)));
            f0 = _mm256_fmadd_ps(_mm256_mul_ps(sxb, d0), _mm256_cvtepi32_ps(_mm256_madd_epi16(t0, ones)), f0);
            f1 = _mm256_fmadd_ps(_mm256_mul_ps(sxb, d1), _mm256_cvtepi32_ps(_mm256_madd_epi16(t1, ones)), f1);
            f0 = _mm256_fmadd_ps(_mm256_mul_ps(sxb, m0), xs, f0);
            f1 = _mm256_fmadd_ps(_mm256_mul_ps(sxb, m1), xs, f1);
        }
        float f[16];
        _mm256_storeu_ps(f, f0);
        _mm256_storeu_ps(f + 8, f1);
        const int64_t valid = c1 - c < 16 ? c1 - c : 16;
        for (int64_t j = 0; j < valid; j++) acc[c + j] += f[j];
    }
#else
    for (int64_t c = c0; c < c1; c += 16) {
        const uint8_t *p = w + c / 16 * tile;
        const int64_t valid = c1 - c < 16 ? c1 - c : 16;
        float f[16] = {0};
        for (int64_t b = 0; b < nb; b++, p += Q4_BLOCK) {
            const int8_t *x = xq + b * QBLOCK;
            int32_t s[16] = {0};
            for (int h = 0; h < 4; h++)
                for (int j = 0; j < 16; j++)
                    for (int i = 0; i < 4; i++) {
                        const int v = p[64 * h + 4 * j + i];
                        s[j] += (v & 15) * x[8 * h + i] + (v >> 4) * x[8 * h + 4 + i];
                    }
            for (int j = 0; j < 16; j++) {
                uint16_t d, mn;
                memcpy(&d, p + 256 + 2 * j, sizeof d);
                memcpy(&mn, p + 288 + 2 * j, sizeof mn);
                f[j] = fmaf(sx[b] * f16_to_f32(d), (float)s[j], f[j]);
                f[j] = fmaf(sx[b] * f16_to_f32(mn), (float)xsum[b], f[j]);
            }
        }
        for (int64_t j = 0; j < valid; j++) acc[c + j] += f[j];
    }
#endif
}

/* The block kernel of a quantised Mat's format. */
static void quant_tiles(int64_t type, float *restrict acc, const int8_t *xq, const float *sx, const int32_t *xsum,
                        const uint8_t *w, int64_t tile, int64_t nb, int64_t c0, int64_t c1) {
    if (type == W_Q4)
        q4_tiles(acc, xq, sx, xsum, w, tile, nb, c0, c1);
    else
        i8_tiles(acc, xq, sx, xsum, w, tile, nb, c0, c1);
}

/* acc[c] += sum_{d in [d0, d1)} x[d] * W[d, c] for c in [c0, c1) with an int8 or q4 W, x quantised
 * per block (d0 starts a block of the segment; c0 is a multiple of 16). */
static void axpy_i8(float *restrict acc, const float *xs, Mat m, int64_t d0, int64_t d1, int64_t c0, int64_t c1) {
    int8_t xq[I8_CHUNK * QBLOCK];
    float sx[I8_CHUNK];
    int32_t xsum[I8_CHUNK];
    for (int64_t d = d0; d < d1; d += I8_CHUNK * QBLOCK) {
        const int64_t end = d1 - d < I8_CHUNK * QBLOCK ? d1 : d + I8_CHUNK * QBLOCK;
        quantize_x(xs + d, end - d, xq, sx, xsum);
        quant_tiles(m.type, acc, xq, sx, xsum, (const uint8_t *)m.w + d / QBLOCK * block_bytes(m),
                    seg_blocks(m) * block_bytes(m), (end - d + QBLOCK - 1) / QBLOCK, c0, c1);
    }
}

/* acc[c] += sum_{d in [d0, d1)} xs[d] * W[d, c] for c in [c0, c1), float32 W: one fused
 * multiply-add per weight, in the order of d (acc[c] = fma(xs[d], W[d, c], acc[c])), four weight
 * rows at a time (a quarter of the accumulator loads and stores of one row at a time). The
 * multi-row kernel (f32_rows) follows the same order, so it gives these bits for every row. */
static void axpy_f32(float *restrict acc, const float *xs, const float *w, int64_t ld, int64_t d0, int64_t d1,
                     int64_t c0, int64_t c1) {
    int64_t d = d0;
    for (; d + 4 <= d1; d += 4) {
        const float x0 = xs[d], x1 = xs[d + 1], x2 = xs[d + 2], x3 = xs[d + 3];
        const float *restrict r0 = w + d * ld, *restrict r1 = r0 + ld, *restrict r2 = r1 + ld, *restrict r3 = r2 + ld;
        for (int64_t c = c0; c < c1; c++) acc[c] = fmaf(x3, r3[c], fmaf(x2, r2[c], fmaf(x1, r1[c], fmaf(x0, r0[c], acc[c]))));
    }
    for (; d < d1; d++) {
        const float x0 = xs[d];
        const float *restrict r0 = w + d * ld;
        for (int64_t c = c0; c < c1; c++) acc[c] = fmaf(x0, r0[c], acc[c]);
    }
}

/* The same for W_F32T (column c's inputs contiguous at w + c * ld): one dot product per column,
 * in 16 running sums (vector lanes without reassociating any one sum). */
static void axpy_f32t(float *restrict acc, const float *xs, const float *w, int64_t ld, int64_t d0, int64_t d1,
                      int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c++) {
        const float *restrict r = w + c * ld;
        float s[16] = {0};
        int64_t d = d0;
        for (; d + 16 <= d1; d += 16)
            for (int j = 0; j < 16; j++) s[j] += xs[d + j] * r[d + j];
        float total = 0.0f;
        for (; d < d1; d++) total += xs[d] * r[d];
        for (int j = 0; j < 16; j++) total += s[j];
        acc[c] += total;
    }
}

/* The same for a Mat of any format. bf16 goes four rows at a time too; a leftover row is a group
 * of four with zero coefficients for the other three (which repeat the row: cached). int8: d0
 * starts a block (split_k), c0 is a multiple of 16 (split). */
static void axpy_rows(float *restrict acc, const float *xs, Mat m, int64_t d0, int64_t d1, int64_t c0, int64_t c1) {
    if (m.type == W_F32) {
        axpy_f32(acc, xs, m.w, m.ld, d0, d1, c0, c1);
        return;
    }
    if (m.type == W_F32T) {
        axpy_f32t(acc, xs, m.w, m.ld, d0, d1, c0, c1);
        return;
    }
    if (quantised(m)) {
        axpy_i8(acc, xs, m, d0, d1, c0, c1);
        return;
    }
    const int64_t ld = m.ld;
    const uint16_t *w = m.w;
    for (int64_t d = d0; d < d1;) {
        const int four = d + 4 <= d1;
        const int64_t r[4] = {d, four ? d + 1 : d, four ? d + 2 : d, four ? d + 3 : d};
        const float x[4] = {xs[d], four ? xs[d + 1] : 0.0f, four ? xs[d + 2] : 0.0f, four ? xs[d + 3] : 0.0f};
        fma4_bf16(acc + c0, w + r[0] * ld + c0, w + r[1] * ld + c0, w + r[2] * ld + c0, w + r[3] * ld + c0, x[0], x[1],
                  x[2], x[3], c1 - c0);
        d += four ? 4 : 1;
    }
}

/* The multi-row int8 kernel: a prefill chunk, a decode batch of several conversations and the
 * rows an expert was chosen by all multiply the same weights, and a one-row pass per activation
 * row reads every weight block once per row (from memory, or at best from L2, and converts it
 * once per row). Here each weight block is loaded into registers once and applied to up to
 * ROWS_MAX rows (RxtModel.row_block), each with its own VNNI dot products. Every row's sums are
 * the ones i8_tiles computes (the same integer block sums, the same float operations in the same
 * order), so R rows in one pass give the same bits as R passes of one row. */
#if defined(I8_VNNI)
/* i8_tiles for R rows (a constant after inlining, so the R accumulators stay in registers), row
 * r's sums added into acc[r]. */
static inline __attribute__((always_inline)) void i8_tiles_r(const int R, float *const *acc, const QRows *x,
                                                             const uint8_t *w, int64_t tile, int64_t nb, int64_t c0,
                                                             int64_t c1) {
    for (int64_t c = c0; c < c1; c += 16) {
        const uint8_t *p = w + c / 16 * tile;
        __m512 f[ROWS_MAX];
        for (int r = 0; r < R; r++) f[r] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++, p += I8_BLOCK) {
            __m512i q[8];
            for (int g = 0; g < 8; g++) q[g] = _mm512_loadu_si512((const void *)(p + 64 * g));
            const __m512 ws = _mm512_loadu_ps((const float *)(p + 512));
            for (int r = 0; r < R; r++) {
                const __m512i s = _mm512_sub_epi32(dot_groups(q, x->xq[r] + b * QBLOCK),
                                                   _mm512_set1_epi32(128 * x->xsum[r][b]));
                const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(x->sx[r][b]), ws);
                f[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), f[r]);
            }
        }
        add_tile(R, acc, f, c, c1);
    }
}

#endif

/* i8_tiles (q4_tiles for a q4 Mat) for R <= ROWS_MAX rows, each weight block read once (VNNI);
 * other builds run them row by row, which gives the same bits. */
static void i8_tiles_rows(int64_t type, int R, float *const *acc, const QRows *x, const uint8_t *w, int64_t tile,
                          int64_t nb, int64_t c0, int64_t c1) {
#if defined(I8_VNNI)
    if (type == W_Q4) {
        switch (R) {
#define CASE(k) \
    case k: q4_tiles_r(k, acc, x, w, tile, nb, c0, c1); return;
            CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
        }
    }
    switch (R) {
#define CASE(k) \
    case k: i8_tiles_r(k, acc, x, w, tile, nb, c0, c1); return;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
#endif
    for (int r = 0; r < R; r++) quant_tiles(type, acc[r], x->xq[r], x->sx[r], x->xsum[r], w, tile, nb, c0, c1);
}

/* acc[r][c] += sum_{d in [d0, d1)} x_r[d] * W[d, c] for R <= ROWS_MAX rows whose activations are
 * quantised already (x: from block d0 / 32 on), in the chunks of I8_CHUNK blocks axpy_i8 takes,
 * so that each row's float sums are axpy_i8's. */
static void i8_rows_quantised(int R, float *const *acc, const QRows *x, Mat m, int64_t d0, int64_t d1, int64_t c0,
                              int64_t c1) {
    for (int64_t d = d0; d < d1; d += I8_CHUNK * QBLOCK) {
        const int64_t end = d1 - d < I8_CHUNK * QBLOCK ? d1 : d + I8_CHUNK * QBLOCK, skip = (d - d0) / QBLOCK;
        QRows at;
        for (int r = 0; r < R; r++)
            at.xq[r] = x->xq[r] + skip * QBLOCK, at.sx[r] = x->sx[r] + skip, at.xsum[r] = x->xsum[r] + skip;
        i8_tiles_rows(m.type, R, acc, &at, (const uint8_t *)m.w + d / QBLOCK * block_bytes(m),
                      seg_blocks(m) * block_bytes(m), (end - d + QBLOCK - 1) / QBLOCK, c0, c1);
    }
}

#if !defined(RXRT_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define F32_ROWS 1
/* F32_PF: the first pass of rows over a tile of columns prefetches the next tile's weights, row
 * by row, into L1. A tile walks down the weight rows (ld floats apart, a new page every row or
 * two), where the hardware prefetchers do not follow, so without it every pass of 8 rows waited
 * on each weight row's first load; with it the 64-row float32 step of alpha-mini ran 1.25x faster
 * with the 512-bit tile and 1.35x with the AVX2 build's tile on the Intel Xeon with AMX
 * (docs/benchmarks.md). -DF32_PF=0 (RXRT_NATIVE_CFLAGS) builds
 * without it, for benchmarks. */
#ifndef F32_PF
#define F32_PF 1
#endif
/* axpy_f32 for R <= 4 rows (a constant after inlining): a decode batch, a prefill chunk or the
 * rows that chose one expert multiply the same float32 weights, and one pass per row reads every
 * weight once per row (memory-bound: 16 rows ran at 9% of the cores' float32 rate). Here a tile
 * of 16 columns is loaded once per weight row for all R rows, whose 2R running sums stay in
 * registers over [d0, d1) (2R + 3 of AVX2's 16 registers; AVX-512 builds run the same code):
 * 2R fused multiply-adds per 2 + R loads. Each sum is axpy_f32's chain of fmas in the order of d,
 * so any R gives its bits. */
static inline __attribute__((always_inline)) void f32_tile_r(const int R, float *const *acc, const float *const *xs,
                                                             const float *w, int64_t ld, int64_t d0, int64_t d1,
                                                             int64_t c, __m256i k0, __m256i k1, int pf) {
    __m256 s0[4], s1[4];
    for (int r = 0; r < R; r++) s0[r] = _mm256_maskload_ps(acc[r] + c, k0), s1[r] = _mm256_maskload_ps(acc[r] + c + 8, k1);
    const float *p = w + d0 * ld + c;
    for (int64_t d = d0; d < d1; d++, p += ld) {
        const __m256 a = _mm256_maskload_ps(p, k0), b = _mm256_maskload_ps(p + 8, k1);
#if F32_PF
        if (pf) _mm_prefetch((const char *)(p + 16), _MM_HINT_T0);
#endif
        for (int r = 0; r < R; r++) {
            const __m256 x = _mm256_broadcast_ss(xs[r] + d);
            s0[r] = _mm256_fmadd_ps(x, a, s0[r]);
            s1[r] = _mm256_fmadd_ps(x, b, s1[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm256_maskstore_ps(acc[r] + c, k0, s0[r]), _mm256_maskstore_ps(acc[r] + c + 8, k1, s1[r]);
}

static __m256i lanes_below(int64_t n) {
    const int v = n < 0 ? 0 : n > 8 ? 8 : (int)n;
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(v), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* Tiles of 16 columns over [c0, c1), the rows in passes of at most 4 (the weight tile of
 * [d0, d1) stays in L1 between the passes). */
static void f32_rows_avx2(int R, float *const *acc, const float *const *xs, const float *w, int64_t ld, int64_t d0,
                          int64_t d1, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c += 16) {
        const __m256i k0 = lanes_below(c1 - c), k1 = lanes_below(c1 - c - 8);
        const int next = c + 16 < c1; /* a next tile to prefetch (in the first pass of rows) */
        for (int r = 0; r < R; r += 4) {
            switch (R - r < 4 ? R - r : 4) {
            case 1: f32_tile_r(1, acc + r, xs + r, w, ld, d0, d1, c, k0, k1, r == 0 && next); break;
            case 2: f32_tile_r(2, acc + r, xs + r, w, ld, d0, d1, c, k0, k1, r == 0 && next); break;
            case 3: f32_tile_r(3, acc + r, xs + r, w, ld, d0, d1, c, k0, k1, r == 0 && next); break;
            default: f32_tile_r(4, acc + r, xs + r, w, ld, d0, d1, c, k0, k1, r == 0 && next); break;
            }
        }
    }
}
#endif

#if defined(F32_ROWS) && defined(__AVX512F__)
#define F32_ROWS_512 1
#ifndef F32_AHEAD
#define F32_AHEAD 32
#endif
/* f32_tile_r in 512-bit registers for R <= 8 rows (a constant after inlining) and 32 columns:
 * 2R running sums in 2R of AVX-512's 32 registers, so each pair of weight loads feeds 2R fused
 * multiply-adds of 16 lanes, four times what the 256-bit tile of 4 rows does per load, and
 * masked loads cost nothing extra. Each sum is still axpy_f32's chain of fmas in the order of d:
 * the same bits as the 256-bit tile and the plain loop. On the Intel Xeon with AMX the 64-row
 * float32 step ran at about a tenth of MKL's rate with the 256-bit tile (docs/benchmarks.md). */
static inline __attribute__((always_inline)) void f32_tile_r512(const int R, float *const *acc,
                                                                const float *const *xs, const float *w, int64_t ld,
                                                                int64_t d0, int64_t d1, int64_t c, __mmask16 k0,
                                                                __mmask16 k1, int pf) {
    __m512 s0[8], s1[8];
    for (int r = 0; r < R; r++)
        s0[r] = _mm512_maskz_loadu_ps(k0, acc[r] + c), s1[r] = _mm512_maskz_loadu_ps(k1, acc[r] + c + 16);
    const float *p = w + d0 * ld + c;
    for (int64_t d = d0; d < d1; d++, p += ld) {
        const __m512 a = _mm512_maskz_loadu_ps(k0, p), b = _mm512_maskz_loadu_ps(k1, p + 16);
#if F32_PF
        if (pf) _mm_prefetch((const char *)(p + F32_AHEAD), _MM_HINT_T0), _mm_prefetch((const char *)(p + F32_AHEAD + 16), _MM_HINT_T0);
#endif
        for (int r = 0; r < R; r++) {
            const __m512 x = _mm512_set1_ps(xs[r][d]);
            s0[r] = _mm512_fmadd_ps(x, a, s0[r]);
            s1[r] = _mm512_fmadd_ps(x, b, s1[r]);
        }
    }
    for (int r = 0; r < R; r++)
        _mm512_mask_storeu_ps(acc[r] + c, k0, s0[r]), _mm512_mask_storeu_ps(acc[r] + c + 16, k1, s1[r]);
}

static __mmask16 lanes_below16(int64_t n) {
    const int v = n < 0 ? 0 : n > 16 ? 16 : (int)n;
    return (__mmask16)((1u << v) - 1u);
}

/* Tiles of 32 columns over [c0, c1), up to 8 rows per pass (the weight tile of [d0, d1), 32 KB
 * at F32_DEPTH rows, stays in L1 between passes). */
static void f32_rows_avx512(int R, float *const *acc, const float *const *xs, const float *w, int64_t ld,
                            int64_t d0, int64_t d1, int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; c += 32) {
        const __mmask16 k0 = lanes_below16(c1 - c), k1 = lanes_below16(c1 - c - 16);
        const int next = c + F32_AHEAD < c1; /* a next tile to prefetch (in the first pass of rows) */
        for (int r = 0; r < R; r += 8) {
            switch (R - r < 8 ? R - r : 8) {
#define CASE(k) \
    case k: f32_tile_r512(k, acc + r, xs + r, w, ld, d0, d1, c, k0, k1, r == 0 && next); break;
                CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7)
#undef CASE
            default: f32_tile_r512(8, acc + r, xs + r, w, ld, d0, d1, c, k0, k1, r == 0 && next); break;
            }
        }
    }
}
#endif

/* The float32 tile's width: 512 on an AVX-512 build unless rxt_f32_tile(256) asked for the
 * 256-bit tile (benchmarks compare the two in one process; both give the same bits). */
#if defined(F32_ROWS_512)
static _Atomic int f32_tile_bits = 512;
#endif

int rxt_f32_tile(int bits) {
#if defined(F32_ROWS_512)
    if (bits == 256 || bits == 512) atomic_store(&f32_tile_bits, bits);
    return atomic_load(&f32_tile_bits);
#elif defined(F32_ROWS)
    (void)bits;
    return 256;
#else
    (void)bits;
    return 0;
#endif
}

/* axpy_f32 for R <= ROWS_MAX rows, each weight read once for all of them (AVX2 and AVX-512
 * builds); scalar builds run axpy_f32 row by row, which gives the same bits. */
static void f32_rows(int R, float *const *acc, const float *const *xs, const float *w, int64_t ld, int64_t d0,
                     int64_t d1, int64_t c0, int64_t c1) {
#if defined(F32_ROWS_512)
    if (atomic_load_explicit(&f32_tile_bits, memory_order_relaxed) == 512) {
        f32_rows_avx512(R, acc, xs, w, ld, d0, d1, c0, c1);
        return;
    }
#endif
#if defined(F32_ROWS)
    f32_rows_avx2(R, acc, xs, w, ld, d0, d1, c0, c1);
#else
    for (int r = 0; r < R; r++) axpy_f32(acc[r], xs[r], w, ld, d0, d1, c0, c1);
#endif
}

/* f32_stream's weight rows: the four rows F32_STREAM_AHEAD rows ahead of row d are prefetched
 * into L1 while rows d..d+3 are applied to an expert's few rows. With it the 16-row float32 step
 * of alpha-mini, whose experts read their weights this way, ran 2-8% faster on the Intel Xeon with
 * AMX (8 and 16 rows ahead alike); in the one-row axpy_f32 it was a little slower, so that has
 * none. -DF32_STREAM_AHEAD=0 turns it off. */
#ifndef F32_STREAM_AHEAD
#define F32_STREAM_AHEAD 8
#endif
static inline void prefetch_rows(const float *w, int64_t ld, int64_t d, int64_t d1, int64_t c0, int64_t c1) {
#if !defined(RXRT_SCALAR) && (defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))) && F32_STREAM_AHEAD > 0
    if (d + F32_STREAM_AHEAD + 4 > d1) return;
    for (int q = 0; q < 4; q++)
        for (int64_t c = c0; c < c1; c += 16) _mm_prefetch((const char *)(w + (d + F32_STREAM_AHEAD + q) * ld + c), _MM_HINT_T0);
#else
    (void)w, (void)ld, (void)d, (void)d1, (void)c0, (void)c1;
#endif
}

/* axpy_f32 for a few rows that read each weight once in any case (an expert's rows in a decode
 * batch: about 3 of 16 conversations): four whole weight rows at a time, streamed in memory
 * order as the one-row path streams them (the hardware prefetchers follow that; a 16-column tile
 * walked down the rows touches a new page every row or two, and the step waited on memory), then
 * applied to each row while they are in L1, its sums there too. Each sum is axpy_f32's
 * expression, so its bits. */
#define F32_STREAM_ROWS 8 /* 4 and 8 measured: 8 a little faster at 16 rows */
static void f32_stream(int R, float *const *acc, const float *const *xs, const float *w, int64_t ld, int64_t d0,
                       int64_t d1, int64_t c0, int64_t c1) {
    int64_t d = d0;
    for (; d + 4 <= d1; d += 4) {
        const float *restrict r0 = w + d * ld, *restrict r1 = r0 + ld, *restrict r2 = r1 + ld, *restrict r3 = r2 + ld;
        prefetch_rows(w, ld, d, d1, c0, c1);
        for (int r = 0; r < R; r++) {
            float *restrict a = acc[r];
            const float x0 = xs[r][d], x1 = xs[r][d + 1], x2 = xs[r][d + 2], x3 = xs[r][d + 3];
            for (int64_t c = c0; c < c1; c++) a[c] = fmaf(x3, r3[c], fmaf(x2, r2[c], fmaf(x1, r1[c], fmaf(x0, r0[c], a[c]))));
        }
    }
    for (; d < d1; d++) {
        const float *restrict r0 = w + d * ld;
        for (int r = 0; r < R; r++) {
            float *restrict a = acc[r];
            const float x0 = xs[r][d];
            for (int64_t c = c0; c < c1; c++) a[c] = fmaf(x0, r0[c], a[c]);
        }
    }
}

#define F32_COLS 512 /* columns of a block: 2 KB of each weight row */
#define F32_DEPTH 256 /* weight rows of a block (256 x 512 and 512 x 512 measured alike) */
#define F32_BATCH 64  /* rows that share one pass over the blocks (native.MULTI_ROW_MAX_ROWS) */

/* f32_rows for n rows, rb per pass, in blocks of F32_DEPTH x F32_COLS weights (512 KB, held in
 * L2 while every pass of rows reads it): a tile's column strip of the whole matrix would touch
 * one page per weight row, and a matrix larger than the cache would be read again from memory
 * for every rb rows. Each (row, column) sum is still one fma per weight in the order of d, so
 * the blocks change no bit. */
static void f32_multi(int n, int rb, float *const *acc, const float *const *xs, const float *w, int64_t ld,
                      int64_t d0, int64_t d1, int64_t c0, int64_t c1) {
    if (rb <= 1 || n == 1) { /* one row streams whole weight rows (axpy_f32) faster than in tiles */
        for (int r = 0; r < n; r++) axpy_f32(acc[r], xs[r], w, ld, d0, d1, c0, c1);
        return;
    }
    if (n <= F32_STREAM_ROWS) {
        f32_stream(n, acc, xs, w, ld, d0, d1, c0, c1);
        return;
    }
    for (int64_t c = c0; c < c1; c += F32_COLS) {
        const int64_t ce = c1 - c < F32_COLS ? c1 : c + F32_COLS;
        for (int64_t d = d0; d < d1; d += F32_DEPTH) {
            const int64_t de = d1 - d < F32_DEPTH ? d1 : d + F32_DEPTH;
            for (int b = 0; b < n; b += rb) f32_rows(n - b < rb ? n - b : rb, acc + b, xs + b, w, ld, d, de, c, ce);
        }
    }
}

/* acc[r][c] += sum_{d in [d0, d1)} xs[r][d] * W[d, c] for c in [c0, c1) and R <= ROWS_MAX rows:
 * int8 through i8_tiles_rows (each row quantised per block exactly as axpy_i8 quantises it),
 * float32 through f32_rows, other formats row by row (axpy_rows). */
static void axpy_rows_multi(int R, float *const *acc, const float *const *xs, Mat m, int64_t d0, int64_t d1,
                            int64_t c0, int64_t c1) {
    if (m.type == W_F32 && R > 1) {
        f32_multi(R, R, acc, xs, m.w, m.ld, d0, d1, c0, c1);
        return;
    }
    if (!quantised(m) || R == 1) {
        for (int r = 0; r < R; r++) axpy_rows(acc[r], xs[r], m, d0, d1, c0, c1);
        return;
    }
    int8_t xq[ROWS_MAX * I8_CHUNK * QBLOCK];
    float sx[ROWS_MAX * I8_CHUNK];
    int32_t xsum[ROWS_MAX * I8_CHUNK];
    QRows x;
    for (int r = 0; r < R; r++)
        x.xq[r] = xq + (int64_t)r * I8_CHUNK * QBLOCK, x.sx[r] = sx + r * I8_CHUNK, x.xsum[r] = xsum + r * I8_CHUNK;
    for (int64_t d = d0; d < d1; d += I8_CHUNK * QBLOCK) {
        const int64_t end = d1 - d < I8_CHUNK * QBLOCK ? d1 : d + I8_CHUNK * QBLOCK;
        for (int r = 0; r < R; r++)
            quantize_x(xs[r] + d, end - d, xq + (int64_t)r * I8_CHUNK * QBLOCK, sx + r * I8_CHUNK,
                       xsum + r * I8_CHUNK);
        i8_tiles_rows(m.type, R, acc, &x, (const uint8_t *)m.w + d / QBLOCK * block_bytes(m),
                      seg_blocks(m) * block_bytes(m), (end - d + QBLOCK - 1) / QBLOCK, c0, c1);
    }
}

/* axpy_rows_multi over n rows, rb at a time: acc row b at acc + b * acc_ld, x row b at x + b * x_ld. */
static void axpy_batch(int n, int rb, float *acc, int64_t acc_ld, const float *x, int64_t x_ld, Mat m, int64_t d0,
                       int64_t d1, int64_t c0, int64_t c1) {
    rb = rb < 1 ? 1 : rb > ROWS_MAX ? ROWS_MAX : rb;
    if (m.type == W_F32 && rb > 1) { /* blocks of weights held in cache for F32_BATCH rows at once */
        for (int b0 = 0; b0 < n; b0 += F32_BATCH) {
            const int nb = n - b0 < F32_BATCH ? n - b0 : F32_BATCH;
            float *accs[F32_BATCH];
            const float *xr[F32_BATCH];
            for (int r = 0; r < nb; r++)
                accs[r] = acc + (int64_t)(b0 + r) * acc_ld, xr[r] = x + (int64_t)(b0 + r) * x_ld;
            f32_multi(nb, rb, accs, xr, m.w, m.ld, d0, d1, c0, c1);
        }
        return;
    }
    for (int b = 0; b < n; b += rb) {
        const int R = n - b < rb ? n - b : rb;
        float *accs[ROWS_MAX];
        const float *xr[ROWS_MAX];
        for (int r = 0; r < R; r++) accs[r] = acc + (int64_t)(b + r) * acc_ld, xr[r] = x + (int64_t)(b + r) * x_ld;
        axpy_rows_multi(R, accs, xr, m, d0, d1, c0, c1);
    }
}

/* out[b, :] (+)= x[b, :] @ W (+ bias) for rows b < n: W is (k, cols) with row stride ld, rb rows
 * per pass of the int8 kernel (1: row by row, the step before the multi-row kernel).
 * Each thread should stream one contiguous run of the weights. An int8 Mat is stored tile by
 * tile (16 columns, all their blocks together), so it is split by columns, whatever its width:
 * split by rows, each thread read half of every tile and skipped the other half (SmolLM2's
 * 576-wide layers decoded 1.25x faster once split by columns, docs/benchmarks.md section 5).
 * float32 and bf16 are row-major: wide ones (the LM head) are split by columns, each thread
 * streaming long runs of every row; narrow ones by rows, so each thread streams one contiguous
 * block, and the threads' partial sums are added at the end. */
typedef struct {
    int n, accumulate, rb, split_rows;
    const float *x, *bias;
    int64_t k, cols;
    Mat w;
    float *out, *partial;
} GemvTask;

static void gemv_task(void *c, int t, int count) {
    const GemvTask *g = c;
    const int n = g->n;
    const int64_t cols = g->cols;
    int64_t c0, c1;
    split(cols, t, count, &c0, &c1);
    if (g->split_rows) {
        const int64_t d0 = split_k(g->w, g->k, t, count), d1 = split_k(g->w, g->k, t + 1, count);
        float *mine = g->partial + (int64_t)t * n * cols;
        memset(mine, 0, sizeof(float) * (size_t)(n * cols));
        axpy_batch(n, g->rb, mine, cols, g->x, g->k, g->w, d0, d1, 0, cols);
        team_barrier(count);
    }
    for (int b = 0; b < n; b++) {
        float *o = g->out + (int64_t)b * cols;
        if (!g->accumulate)
            for (int64_t c = c0; c < c1; c++) o[c] = 0.0f;
        if (g->bias)
            for (int64_t c = c0; c < c1; c++) o[c] += g->bias[c];
        if (g->split_rows)
            for (int j = 0; j < count; j++)
                for (int64_t c = c0; c < c1; c++) o[c] += g->partial[((int64_t)j * n + b) * cols + c];
    }
    if (!g->split_rows) axpy_batch(n, g->rb, g->out, cols, g->x, g->k, g->w, 0, g->k, c0, c1);
}

static void gemv(int n, const float *x, int64_t k, Mat w, int64_t cols,
                 const float *bias, float *out, int accumulate, int nt, int rb) {
    const int by_rows = !quantised(w) && cols < 2048 * nt && nt > 1;
    float *partial = by_rows ? malloc(sizeof(float) * (size_t)(nt * n * cols)) : NULL;
    GemvTask task = {n, accumulate, rb, by_rows && partial, x, bias, k, cols, w, out, partial};
    parallel(nt, gemv_task, &task);
    free(partial);
}

/* The float16 nearest a finite float (ties to even): a q4 block's scale and minimum. */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u;
    x &= 0x7FFFFFFFu;
    if (x >= 0x47800000u) return (uint16_t)(sign | 0x7C00u); /* 65536 and beyond: infinite */
    if (x < 0x38800000u) {                                   /* below 2^-14: a subnormal half */
        float a;
        memcpy(&a, &x, sizeof a);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f)); /* exact scaling by 2^24 */
    }
    uint32_t h = (((x >> 23) - 112u) << 10) | ((x & 0x7FFFFFu) >> 13);
    const uint32_t rest = x & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* a carry moves into the exponent */
    return (uint16_t)(sign | h);
}

/* One column's block of 32 values v as q4 (q, s, m), or 0 when it is not exactly that. */
static int q4_block(const float *v, uint8_t *q, uint16_t *sh, uint16_t *mh) {
    float lo = v[0], hi = v[0];
    for (int i = 1; i < QBLOCK; i++) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
    }
    if (!(lo > -INFINITY && hi < INFINITY)) return 0; /* NaN or infinite */
    *mh = f32_to_f16(lo);
    if (f16_to_f32(*mh) != lo) return 0;
    const int guess = f32_to_f16((hi - lo) / 15.0f);
    const int tries[3] = {guess, guess + 1, guess - 1};
    for (int t = 0; t < 3; t++) {
        if (tries[t] < 0 || tries[t] >= 0x7C00) continue;
        const float d = f16_to_f32((uint16_t)tries[t]), inv = d > 0.0f ? 1.0f / d : 0.0f;
        int ok = 1;
        for (int i = 0; i < QBLOCK; i++) {
            int level = (int)((v[i] - lo) * inv + 0.5f);
            level = level < 0 ? 0 : level > 15 ? 15 : level;
            q[i] = (uint8_t)level;
            ok &= (float)level * d + lo == v[i]; /* level * d is exact: 4 bits times 11 */
        }
        if (ok) {
            *sh = (uint16_t)tries[t];
            return 1;
        }
    }
    return 0;
}

/* Pack an input-major (rows, cols) float32 matrix, element (d, c) at w[d * rs + c * cs], as a q4
 * Mat (the layout at the top: (cols / 16 rounded up) tiles of rows / 32 blocks of Q4_BLOCK bytes)
 * into `out`, when every block of 32 rows of a column is exactly s * q + m (the float32 product,
 * then the sum, as a GGUF's Q4_1 dequantizes) with float16 s and m and q in [0, 15]: m is the
 * block's least value (level 0), s the half nearest (max - m) / 15 or a neighbour. Returns 1 when
 * the whole matrix is, else 0 (then `out` is garbage). One pass, so a 100M-weight backbone is
 * checked and packed as it loads. */
int rxt_pack_q4(const float *w, int64_t rows, int64_t cols, int64_t rs, int64_t cs, uint8_t *out) {
    if (rows % QBLOCK) return 0;
    const int64_t nb = rows / QBLOCK, tiles = (cols + 15) / 16;
    memset(out, 0, (size_t)(tiles * nb * Q4_BLOCK));
    const int by_columns = rs < cs; /* walk the matrix the way its memory runs */
    for (int64_t outer = 0; outer < (by_columns ? cols : nb); outer++)
        for (int64_t inner = 0; inner < (by_columns ? nb : cols); inner++) {
            const int64_t c = by_columns ? outer : inner, b = by_columns ? inner : outer;
            float v[QBLOCK];
            for (int i = 0; i < QBLOCK; i++) v[i] = w[(b * QBLOCK + i) * rs + c * cs];
            uint8_t q[QBLOCK];
            uint16_t sh, mh;
            if (!q4_block(v, q, &sh, &mh)) return 0;
            uint8_t *blk = out + ((c / 16) * nb + b) * Q4_BLOCK;
            const int64_t j = c % 16;
            for (int i = 0; i < QBLOCK; i++) blk[64 * (i / 8) + 4 * j + i % 4] |= (uint8_t)(q[i] << (4 * (i % 8 / 4)));
            memcpy(blk + 256 + 2 * j, &sh, sizeof sh);
            memcpy(blk + 288 + 2 * j, &mh, sizeof mh);
        }
    return 1;
}

/* y (cols) = x (k) @ W[row : row + k] for one Mat (int8: `row` starts a segment, k its rows):
 * the tests' window on the kernels alone. */
void rxt_matvec(const Mat *m, int64_t row, int64_t k, int64_t cols, const float *x, float *y) {
    memset(y, 0, sizeof(float) * (size_t)cols);
    axpy_rows(y, x, mat_rows(*m, row), 0, k, 0, cols);
}

/* The same for n rows x (n, k) -> y (n, cols), rb rows per pass of the int8 kernel: the tests'
 * window on the multi-row kernel (its rows must equal n calls of rxt_matvec). */
void rxt_matmul(const Mat *m, int64_t row, int64_t k, int64_t cols, int n, const float *x, float *y, int rb) {
    memset(y, 0, sizeof(float) * (size_t)(n * cols));
    axpy_batch(n, rb, y, cols, x, k, mat_rows(*m, row), 0, k, 0, cols);
}

/* RMSNorm, or (layer) LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias (bias may be NULL). */
static void norm(int n, int64_t dim, const float *x, const float *weight, const float *bias, float eps, int64_t layer,
                 float *out) {
    for (int b = 0; b < n; b++) {
        const float *xb = x + b * dim;
        float mean = 0.0f, ss = 0.0f;
        if (layer) {
            for (int64_t i = 0; i < dim; i++) mean += xb[i];
            mean /= (float)dim;
        }
        for (int64_t i = 0; i < dim; i++) ss += (xb[i] - mean) * (xb[i] - mean);
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int64_t i = 0; i < dim; i++)
            out[b * dim + i] = (xb[i] - mean) * scale * weight[i] + (bias ? bias[i] : 0.0f);
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

/* e^x for x <= 0 in plain arithmetic that vectorises (expf does not), within 2 ulp: x = n ln2 + r,
 * |r| <= ln2 / 2, e^r by its Taylor series to r^6, times 2^n. Below -87 it gives e^-87 (~1e-38, as
 * good as 0 beside the softmax's largest term, which is 1); NaN stays NaN. The vector versions
 * below (exp_neg16, exp_neg8) do these operations in this order, so every build gives its bits. */
__attribute__((unused)) static float exp_neg(float x) { /* unused where exp_neg16/8 replace it */
    x = x < -87.0f ? -87.0f : x;
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x / ln2), |x / ln2| < 2^22 */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;    /* ln2 in two parts (Cody-Waite) */
    const float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720))))));
    n = !(n >= -126.0f) ? -126.0f : n > 0.0f ? 0.0f : n; /* NaN: any n, p is NaN */
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The attention of one query over len float32 keys/values (len, hd) contiguous:
 * softmax(q . k_t / sqrt(hd)) applied to v, in an order that every build follows exactly, so the
 * scalar, AVX2 and AVX-512 builds give the same bits (and one row's result never depends on the
 * other rows of a call):
 *   score_t = (q . k_t) * scale: 16 running sums s_j (s_j adds q_i k_i for i = j mod 16, in order;
 *            one vector lane each), folded as g_m = (s_4m + s_4m+2) + (s_4m+1 + s_4m+3), then
 *            (g_0 + g_2) + (g_1 + g_3) (fold16: the pairs within 128-bit lanes first, so the
 *            vector code reduces many keys at once with cheap in-lane shuffles);
 *   best    = the largest score, taken in 16 lanes (score_t in lane t mod 16), then the lanes
 *            in order;
 *   e_t     = exp_neg(score_t - best), their total in 16 lanes the same way (exp_neg, not libm's
 *            expf: the same bits in vector code, and 3-6x faster there than expf per score);
 *   out_i   = ((P_0 + P_1) + (P_2 + P_3)) / total, P_r the sum in order of e_t v_ti over the
 *            t = r mod 4 (four independent sums, so the vector code is not bound by one chain
 *            of dependent additions when a head is one or two registers wide).
 * The AVX-512 code scores 16 keys at a time (one result register of 16 scores), AVX2 4 keys. The
 * attention before this code (attend_old) stays selectable for benchmarks (RxtModel.attend_old). */
static float fold16(const float *s) {
    float g[4];
    for (int m = 0; m < 4; m++) g[m] = (s[4 * m] + s[4 * m + 2]) + (s[4 * m + 1] + s[4 * m + 3]);
    return (g[0] + g[2]) + (g[1] + g[3]);
}

static float dot16_f32(const float *q, const float *k, int64_t n) {
    float s[16] = {0};
    for (int64_t i = 0; i < n; i++) s[i & 15] += q[i] * k[i];
    return fold16(s);
}

#if !defined(RXRT_SCALAR) && defined(__AVX512F__)
#define ATTEND_AVX512 1
#elif !defined(RXRT_SCALAR) && defined(__AVX2__) && defined(__FMA__)
#define ATTEND_AVX2 1
#endif

#if defined(ATTEND_AVX512)
static __mmask16 tail16(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1); }

/* The scores (before the scale) of the n <= 16 keys at k + j hd, in order (lanes past n: 0):
 * dot16_f32's 16 sums per key, one lane each (lanes past hd load zeros and add +0: the sums stay
 * exact), then fold16 of all 16 keys at once: pairs in 128-bit lanes (unpack, shuffle), then
 * across them (shuffle_f32x4). */
static __m512 dot16x16(const float *q, const float *k, int64_t hd, int64_t n) {
    __m512 a[16];
    for (int j = 0; j < 16; j++) a[j] = _mm512_setzero_ps();
    if (n == 16) { /* a whole block: keys at k + j hd */
        int64_t i = 0;
        for (; i + 16 <= hd; i += 16) {
            const __m512 x = _mm512_loadu_ps(q + i);
            const float *row = k + i;
            for (int j = 0; j < 16; j++, row += hd) a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(x, _mm512_loadu_ps(row)));
        }
        if (i < hd) {
            const __mmask16 m = tail16(hd - i);
            const __m512 x = _mm512_maskz_loadu_ps(m, q + i);
            const float *row = k + i;
            for (int j = 0; j < 16; j++, row += hd)
                a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, row)));
        }
    } else { /* the last n < 16 keys; the lanes past them stay 0 (not stored) */
        for (int64_t i = 0; i < hd; i += 16) {
            const __mmask16 m = tail16(hd - i);
            const __m512 x = _mm512_maskz_loadu_ps(m, q + i);
            for (int j = 0; j < n; j++)
                a[j] = _mm512_add_ps(a[j], _mm512_mul_ps(x, _mm512_maskz_loadu_ps(m, k + j * hd + i)));
        }
    }
    __m512 b[8], c[4];
    for (int j = 0; j < 8; j++) /* [s0 + s2, s1 + s3] of keys 2j, 2j + 1, per 128-bit lane */
        b[j] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * j], a[2 * j + 1]), _mm512_unpackhi_ps(a[2 * j], a[2 * j + 1]));
    for (int j = 0; j < 4; j++) /* g_m of keys 4j..4j+3 in 128-bit lane m */
        c[j] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0x44), _mm512_shuffle_ps(b[2 * j], b[2 * j + 1], 0xEE));
    const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
    const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, 0x88), _mm512_shuffle_f32x4(d0, d1, 0xDD));
}

#define F16(c) _mm512_set1_ps(c)
static __m512 exp_neg16(__m512 x) { /* exp_neg, 16 at a time */
    x = _mm512_max_ps(F16(-87.0f), x); /* -87 > x ? -87 : x (NaN stays) */
    __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, F16(1.44269504f)), F16(12582912.0f)), F16(12582912.0f));
    const __m512 r = _mm512_sub_ps(_mm512_sub_ps(x, _mm512_mul_ps(n, F16(0.693145752f))), _mm512_mul_ps(n, F16(1.42860677e-6f)));
    __m512 p = _mm512_add_ps(F16(1.0f / 120), _mm512_mul_ps(r, F16(1.0f / 720)));
    p = _mm512_add_ps(F16(1.0f / 24), _mm512_mul_ps(r, p));
    p = _mm512_add_ps(F16(1.0f / 6), _mm512_mul_ps(r, p));
    p = _mm512_add_ps(F16(0.5f), _mm512_mul_ps(r, p));
    p = _mm512_add_ps(F16(1.0f), _mm512_mul_ps(r, p));
    p = _mm512_add_ps(F16(1.0f), _mm512_mul_ps(r, p));
    n = _mm512_min_ps(_mm512_setzero_ps(), _mm512_max_ps(n, F16(-126.0f))); /* NaN -> -126, then <= 0 */
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

/* weighted_sum's columns [i, i + 16 nv) (masked past hd): nv registers for each of the 4 sums. */
static inline __attribute__((always_inline)) void wsum16(const int nv, const float *w, const float *v, int64_t len,
                                                         int64_t hd, int64_t i, float total, float *out) {
    __mmask16 m[4];
    __m512 p[4][4];
    for (int c = 0; c < 4; c++) {
        m[c] = c < nv ? tail16(hd - i - 16 * c) : 0;
        for (int r = 0; r < 4; r++) p[r][c] = _mm512_setzero_ps();
    }
#define WSUM_ROW(r, at, wt)                                                                            \
    do {                                                                                               \
        const __m512 x = _mm512_set1_ps(wt);                                                           \
        for (int c = 0; c < nv; c++)                                                                   \
            p[r][c] = _mm512_add_ps(p[r][c], _mm512_mul_ps(x, _mm512_maskz_loadu_ps(m[c], (at) + 16 * c))); \
    } while (0)
    const float *row = v + i;
    int64_t t = 0;
    for (; t + 4 <= len; t += 4, row += 4 * hd) {
        WSUM_ROW(0, row, w[t]);
        WSUM_ROW(1, row + hd, w[t + 1]);
        WSUM_ROW(2, row + 2 * hd, w[t + 2]);
        WSUM_ROW(3, row + 3 * hd, w[t + 3]);
    }
    if (t < len) WSUM_ROW(0, row, w[t]);
    if (t + 1 < len) WSUM_ROW(1, row + hd, w[t + 1]);
    if (t + 2 < len) WSUM_ROW(2, row + 2 * hd, w[t + 2]);
#undef WSUM_ROW
    const __m512 d = _mm512_set1_ps(total);
    for (int c = 0; c < nv; c++) {
        const __m512 s = _mm512_add_ps(_mm512_add_ps(p[0][c], p[1][c]), _mm512_add_ps(p[2][c], p[3][c]));
        _mm512_mask_storeu_ps(out + i + 16 * c, m[c], _mm512_div_ps(s, d));
    }
}
#endif

#if defined(ATTEND_AVX2)
static __m256i tail8(int64_t n) { /* lanes < n set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n < 8 ? (n < 0 ? 0 : n) : 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/* dot16x16's scores for 4 keys: sums 0-7 and 8-15 of each key in two registers, fold16 in-lane
 * first (128-bit lanes m = 0, 1 in the low register, 2, 3 in the high one), then across. */
static __m128 dot16x4(const float *q, const float *const *k, int64_t hd) {
    __m256 l[4], h[4];
    for (int j = 0; j < 4; j++) l[j] = h[j] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= hd; i += 16) {
        const __m256 xl = _mm256_loadu_ps(q + i), xh = _mm256_loadu_ps(q + i + 8);
        for (int j = 0; j < 4; j++) {
            l[j] = _mm256_add_ps(l[j], _mm256_mul_ps(xl, _mm256_loadu_ps(k[j] + i)));
            h[j] = _mm256_add_ps(h[j], _mm256_mul_ps(xh, _mm256_loadu_ps(k[j] + i + 8)));
        }
    }
    if (i < hd) { /* lanes past hd load zeros and add +0 */
        const __m256i ml = tail8(hd - i), mh = tail8(hd - i - 8);
        const __m256 xl = _mm256_maskload_ps(q + i, ml), xh = _mm256_maskload_ps(q + i + 8, mh);
        for (int j = 0; j < 4; j++) {
            l[j] = _mm256_add_ps(l[j], _mm256_mul_ps(xl, _mm256_maskload_ps(k[j] + i, ml)));
            h[j] = _mm256_add_ps(h[j], _mm256_mul_ps(xh, _mm256_maskload_ps(k[j] + i + 8, mh)));
        }
    }
#define PAIRS(x, y) _mm256_add_ps(_mm256_unpacklo_ps(x, y), _mm256_unpackhi_ps(x, y))
#define GROUPS(x, y) _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x44), _mm256_shuffle_ps(x, y, 0xEE))
    const __m256 gl = GROUPS(PAIRS(l[0], l[1]), PAIRS(l[2], l[3])); /* [g0 | g1] of the 4 keys */
    const __m256 gh = GROUPS(PAIRS(h[0], h[1]), PAIRS(h[2], h[3])); /* [g2 | g3] */
#undef PAIRS
#undef GROUPS
    const __m256 s = _mm256_add_ps(gl, gh);
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

/* weighted_sum's columns [i, i + 16) in 2 registers for each of the 4 sums (masked: past hd). */
static inline __attribute__((always_inline)) void wsum8x2(const int masked, const float *w, const float *v, int64_t len,
                                                          int64_t hd, int64_t i, float total, float *out) {
    const __m256i m0 = tail8(hd - i), m1 = tail8(hd - i - 8);
    __m256 p0[4], p1[4];
    for (int r = 0; r < 4; r++) p0[r] = p1[r] = _mm256_setzero_ps();
#define LOAD8(at, m) (masked ? _mm256_maskload_ps((at), m) : _mm256_loadu_ps(at))
#define WSUM_ROW(r, at, wt)                                                    \
    do {                                                                       \
        const __m256 x = _mm256_set1_ps(wt);                                   \
        p0[r] = _mm256_add_ps(p0[r], _mm256_mul_ps(x, LOAD8((at), m0)));       \
        p1[r] = _mm256_add_ps(p1[r], _mm256_mul_ps(x, LOAD8((at) + 8, m1)));   \
    } while (0)
    const float *row = v + i;
    int64_t t = 0;
    for (; t + 4 <= len; t += 4, row += 4 * hd) {
        WSUM_ROW(0, row, w[t]);
        WSUM_ROW(1, row + hd, w[t + 1]);
        WSUM_ROW(2, row + 2 * hd, w[t + 2]);
        WSUM_ROW(3, row + 3 * hd, w[t + 3]);
    }
    if (t < len) WSUM_ROW(0, row, w[t]);
    if (t + 1 < len) WSUM_ROW(1, row + hd, w[t + 1]);
    if (t + 2 < len) WSUM_ROW(2, row + 2 * hd, w[t + 2]);
#undef WSUM_ROW
#undef LOAD8
    const __m256 d = _mm256_set1_ps(total);
    const __m256 s0 = _mm256_add_ps(_mm256_add_ps(p0[0], p0[1]), _mm256_add_ps(p0[2], p0[3]));
    const __m256 s1 = _mm256_add_ps(_mm256_add_ps(p1[0], p1[1]), _mm256_add_ps(p1[2], p1[3]));
    if (masked) {
        _mm256_maskstore_ps(out + i, m0, _mm256_div_ps(s0, d));
        _mm256_maskstore_ps(out + i + 8, m1, _mm256_div_ps(s1, d));
    } else {
        _mm256_storeu_ps(out + i, _mm256_div_ps(s0, d));
        _mm256_storeu_ps(out + i + 8, _mm256_div_ps(s1, d));
    }
}

#define F8(c) _mm256_set1_ps(c)
static __m256 exp_neg8(__m256 x) { /* exp_neg, 8 at a time */
    x = _mm256_max_ps(F8(-87.0f), x);
    __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, F8(1.44269504f)), F8(12582912.0f)), F8(12582912.0f));
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, F8(0.693145752f))), _mm256_mul_ps(n, F8(1.42860677e-6f)));
    __m256 p = _mm256_add_ps(F8(1.0f / 120), _mm256_mul_ps(r, F8(1.0f / 720)));
    p = _mm256_add_ps(F8(1.0f / 24), _mm256_mul_ps(r, p));
    p = _mm256_add_ps(F8(1.0f / 6), _mm256_mul_ps(r, p));
    p = _mm256_add_ps(F8(0.5f), _mm256_mul_ps(r, p));
    p = _mm256_add_ps(F8(1.0f), _mm256_mul_ps(r, p));
    p = _mm256_add_ps(F8(1.0f), _mm256_mul_ps(r, p));
    n = _mm256_min_ps(_mm256_setzero_ps(), _mm256_max_ps(n, F8(-126.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#endif

/* scores[t] = (q . k_t) * scale for t < len. */
static void attend_scores(const float *q, const float *k, int64_t len, int64_t hd, float scale, float *scores) {
    int64_t t = 0;
#if defined(ATTEND_AVX512)
    const __m512 s16 = _mm512_set1_ps(scale);
    for (; t < len; t += 16) {
        const int64_t n = len - t < 16 ? len - t : 16;
        _mm512_mask_storeu_ps(scores + t, tail16(n), _mm512_mul_ps(dot16x16(q, k + t * hd, hd, n), s16));
    }
#elif defined(ATTEND_AVX2)
    const __m128 s4 = _mm_set1_ps(scale);
    for (; t + 4 <= len; t += 4) {
        const float *keys[4] = {k + t * hd, k + (t + 1) * hd, k + (t + 2) * hd, k + (t + 3) * hd};
        _mm_storeu_ps(scores + t, _mm_mul_ps(dot16x4(q, keys, hd), s4));
    }
    if (t < len) { /* the last 1-3 keys, with the last one repeated */
        const float *keys[4];
        float tmp[4];
        for (int j = 0; j < 4; j++) keys[j] = k + (t + j < len ? t + j : len - 1) * hd;
        _mm_storeu_ps(tmp, _mm_mul_ps(dot16x4(q, keys, hd), s4));
        for (int j = 0; t < len; j++, t++) scores[t] = tmp[j];
    }
#endif
    for (; t < len; t++) scores[t] = dot16_f32(q, k + t * hd, hd) * scale;
}

/* The largest of scores[0..len) (see attend: score t in lane t mod 16, then the lanes in order). */
static float row_max(const float *scores, int64_t len) {
    float lanes[16], best = -INFINITY;
    int64_t t = 0;
#if defined(ATTEND_AVX512)
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (; t + 16 <= len; t += 16) m = _mm512_max_ps(_mm512_loadu_ps(scores + t), m); /* s > m ? s : m */
    if (t < len) {
        const __mmask16 k = tail16(len - t);
        m = _mm512_mask_max_ps(m, k, _mm512_maskz_loadu_ps(k, scores + t), m);
    }
    _mm512_storeu_ps(lanes, m);
#elif defined(ATTEND_AVX2)
    const __m256 none = _mm256_set1_ps(-INFINITY);
    __m256 m0 = none, m1 = none;
    for (; t + 16 <= len; t += 16) {
        m0 = _mm256_max_ps(_mm256_loadu_ps(scores + t), m0);
        m1 = _mm256_max_ps(_mm256_loadu_ps(scores + t + 8), m1);
    }
    if (t < len) { /* the tail's missing lanes count as -inf */
        const __m256i k0 = tail8(len - t), k1 = tail8(len - t - 8);
        m0 = _mm256_max_ps(_mm256_blendv_ps(none, _mm256_maskload_ps(scores + t, k0), _mm256_castsi256_ps(k0)), m0);
        m1 = _mm256_max_ps(_mm256_blendv_ps(none, _mm256_maskload_ps(scores + t + 8, k1), _mm256_castsi256_ps(k1)), m1);
    }
    _mm256_storeu_ps(lanes, m0);
    _mm256_storeu_ps(lanes + 8, m1);
#else
    for (int j = 0; j < 16; j++) lanes[j] = -INFINITY;
    for (; t < len; t++) lanes[t & 15] = scores[t] > lanes[t & 15] ? scores[t] : lanes[t & 15];
#endif
    for (int j = 0; j < 16; j++) best = lanes[j] > best ? lanes[j] : best;
    return best;
}

/* scores[t] = exp_neg((scores[t] - best) * scale) in place; returns their total (score t added to
 * lane t mod 16, then the lanes in order). */
static float exp_row(float *scores, int64_t len, float best, float scale) {
    float lanes[16], total = 0.0f;
    int64_t t = 0;
#if defined(ATTEND_AVX512)
    const __m512 b = _mm512_set1_ps(best), s = _mm512_set1_ps(scale);
    __m512 sum = _mm512_setzero_ps();
    for (; t + 16 <= len; t += 16) {
        const __m512 e = exp_neg16(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(scores + t), b), s));
        _mm512_storeu_ps(scores + t, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (t < len) {
        const __mmask16 k = tail16(len - t);
        const __m512 e = exp_neg16(_mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, scores + t), b), s));
        _mm512_mask_storeu_ps(scores + t, k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    _mm512_storeu_ps(lanes, sum);
#elif defined(ATTEND_AVX2)
    const __m256 b = _mm256_set1_ps(best), s = _mm256_set1_ps(scale);
    __m256 sum0 = _mm256_setzero_ps(), sum1 = sum0;
    for (; t + 16 <= len; t += 16) {
        const __m256 e0 = exp_neg8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + t), b), s));
        const __m256 e1 = exp_neg8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(scores + t + 8), b), s));
        _mm256_storeu_ps(scores + t, e0);
        _mm256_storeu_ps(scores + t + 8, e1);
        sum0 = _mm256_add_ps(sum0, e0);
        sum1 = _mm256_add_ps(sum1, e1);
    }
    if (t < len) { /* the tail's missing lanes add +0 */
        const __m256i k0 = tail8(len - t), k1 = tail8(len - t - 8);
        const __m256 e0 = exp_neg8(_mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(scores + t, k0), b), s));
        const __m256 e1 = exp_neg8(_mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(scores + t + 8, k1), b), s));
        _mm256_maskstore_ps(scores + t, k0, e0);
        _mm256_maskstore_ps(scores + t + 8, k1, e1);
        sum0 = _mm256_add_ps(sum0, _mm256_and_ps(e0, _mm256_castsi256_ps(k0)));
        sum1 = _mm256_add_ps(sum1, _mm256_and_ps(e1, _mm256_castsi256_ps(k1)));
    }
    _mm256_storeu_ps(lanes, sum0);
    _mm256_storeu_ps(lanes + 8, sum1);
#else
    for (int j = 0; j < 16; j++) lanes[j] = 0.0f;
    for (; t < len; t++) lanes[t & 15] += (scores[t] = exp_neg((scores[t] - best) * scale));
#endif
    for (int j = 0; j < 16; j++) total += lanes[j];
    return total;
}

/* out[i] = ((P_0 + P_1) + (P_2 + P_3)) / total for i < hd, P_r summing w[t] v[t, i] in order over
 * the t = r mod 4 below len (hd <= 512, as native.py checks). */
static void weighted_sum(const float *w, const float *v, int64_t len, int64_t hd, float total, float *out) {
#if defined(ATTEND_AVX512)
    for (int64_t i = 0; i < hd;) { /* 16, 32 or 64 columns a pass */
        const int64_t rest = hd - i;
        if (rest <= 16) {
            wsum16(1, w, v, len, hd, i, total, out);
            i += 16;
        } else if (rest <= 32) {
            wsum16(2, w, v, len, hd, i, total, out);
            i += 32;
        } else {
            wsum16(4, w, v, len, hd, i, total, out);
            i += 64;
        }
    }
#elif defined(ATTEND_AVX2)
    int64_t i = 0;
    for (; i + 16 <= hd; i += 16) wsum8x2(0, w, v, len, hd, i, total, out);
    if (i < hd) wsum8x2(1, w, v, len, hd, i, total, out);
#else
    float p[4][512];
    for (int r = 0; r < 4; r++)
        for (int64_t i = 0; i < hd; i++) p[r][i] = 0.0f;
    for (int64_t t = 0; t < len; t++)
        for (int64_t i = 0; i < hd; i++) p[t & 3][i] += w[t] * v[t * hd + i];
    for (int64_t i = 0; i < hd; i++) out[i] = ((p[0][i] + p[1][i]) + (p[2][i] + p[3][i])) / total;
#endif
}

/* The step's attention before issue 27's vector code (RxtModel.attend_old, RXRT_NATIVE_ATTEND=old),
 * kept so that benchmarks can run both side by side: q . k in 8 running sums, libm's expf one
 * score at a time, each weight divided by the total before its axpy over v. */
static float dot8_f32(const float *q, const float *k, int64_t n) {
    float s[8] = {0}, total = 0.0f;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += q[i + j] * k[i + j];
    for (; i < n; i++) total += q[i] * k[i];
    return total + (((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])));
}

static void attend_old(const float *q, const float *k, const float *v, int64_t len, int64_t hd, float *scores,
                       float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    float best = -INFINITY;
    for (int64_t t = 0; t < len; t++) {
        const float s = dot8_f32(q, k + t * hd, hd) * scale;
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

static void attend(const float *q, const float *k, const float *v, int64_t len, int64_t hd, float *scores,
                   float *out, int old) {
    if (old) {
        attend_old(q, k, v, len, hd, scores, out);
        return;
    }
    attend_scores(q, k, len, hd, 1.0f / sqrtf((float)hd), scores);
    const float total = exp_row(scores, len, row_max(scores, len), 1.0f);
    weighted_sum(scores, v, len, hd, total, out);
}

/* One head's attention, for the tests: attend (old != 0: attend_old) into out (hd), scores (len)
 * as scratch. */
void rxt_attend(const float *q, const float *k, const float *v, int64_t len, int64_t hd, float *scores, float *out,
                int old) {
    attend(q, k, v, len, hd, scores, out, old);
}

/* softmax(q . k_t / sqrt(hd)) over the memory's len slots, applied to v, with the compact bf16
 * copies stored transposed per head: kt and vt (hd, len), slot t of feature i at i * len + t. So
 * every pass runs along the slots, 16 at a time, with no sum across vector lanes: the scores as
 * hd passes of scores += q_i * kt_i; the outputs as dot products of the weights with each vt row
 * in 16 running sums. A 4,096-slot memory is read whole for every token. */
static void attend_t(const float *q, const uint16_t *kt, const uint16_t *vt, int64_t len, int64_t hd,
                     float *restrict scores, float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t t = 0; t < len; t++) scores[t] = 0.0f;
    for (int64_t i = 0; i < hd; i++) {
        const float qi = q[i];
        const uint16_t *restrict row = kt + i * len;
        for (int64_t t = 0; t < len; t++) scores[t] += qi * bf16_to_f32(row[t]);
    }
    const float total = exp_row(scores, len, row_max(scores, len), scale);
    float lanes[16];
    int64_t t;
    for (int64_t i = 0; i < hd; i++) {
        const uint16_t *restrict row = vt + i * len;
        float sum = 0.0f;
        for (int j = 0; j < 16; j++) lanes[j] = 0.0f;
        for (t = 0; t + 16 <= len; t += 16)
            for (int j = 0; j < 16; j++) lanes[j] += scores[t + j] * bf16_to_f32(row[t + j]);
        for (; t < len; t++) sum += scores[t] * bf16_to_f32(row[t]);
        for (int j = 0; j < 16; j++) sum += lanes[j];
        out[i] = sum / total;
    }
}

static float silu(float x) { return x / (1.0f + expf(-x)); }

/* The activations of models/ffn.py's ACTIVATIONS (attention gates, feed-forward gates). */
enum { ACT_NONE = 0, ACT_SILU, ACT_GELU, ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_IDENTITY };

static float activate(float x, int64_t act) {
    switch (act) {
    case ACT_SILU: return silu(x);
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); /* torch's exact gelu */
    case ACT_RELU: return x > 0.0f ? x : 0.0f;
    case ACT_SIGMOID: return 1.0f / (1.0f + expf(-x));
    case ACT_TANH: return tanhf(x);
    default: return x;
    }
}

/* out[b] += FFN(h[b]) * (scale ? scale[b * stride] : 1) for rows b < n: a dense layer, or one
 * shared expert weighted per row. gu (n, 2H) and act (n, H) are scratch. */
static void ffn_rows(int n, const float *h, int64_t D, const RxtFfn *f, int64_t kind, const float *scale,
                     int64_t stride, float *gu, float *act, float *out, int nt, int rb) {
    const int64_t H = f->hidden, GH = f->gated ? 2 * H : H;
    gemv(n, h, D, f->w_in, GH, f->b_in, gu, 0, nt, rb);
    for (int b = 0; b < n; b++) {
        const float s = scale ? scale[b * stride] : 1.0f;
        const float *g = gu + b * GH;
        for (int64_t r = 0; r < H; r++) act[b * H + r] = activate(g[r], kind) * (f->gated ? g[H + r] : 1.0f) * s;
    }
    gemv(n, act, H, f->w_out, D, NULL, out, 1, nt, rb);
    if (f->b_out)
        for (int b = 0; b < n; b++) {
            const float s = scale ? scale[b * stride] : 1.0f;
            for (int64_t c = 0; c < D; c++) out[b * D + c] += s * f->b_out[c];
        }
}

/* The routed experts of an MoE layer with the multi-row kernel: the (row, expert) pairs are
 * grouped by expert, so that each chosen expert's weights are read once for every rb of the
 * rows that chose it instead of once per row (a 32-token prefill of alpha-mini sends ~5 rows to
 * each expert), and each row of h is quantised once, not once per expert. Threads take whole
 * experts, the most chosen first. Pair p's output without its mixing weight into ys + p * D
 * (gu, act: its scratch at p * GH, p * H); each pair's numbers are those of the one-row path
 * with whole experts (parts == 1). groups: scratch of pairs + 2E + 1 ints. */
typedef struct {
    const RxtLayer *L;
    int64_t K, D, H, GH, nbk;
    const float *h;
    const int *order, *start, *ids;
    int used, rb;
    float *gu, *act, *ys, *hs;
    int8_t *hq;
    int32_t *hsum;
    atomic_int next; /* the next expert to take (the most chosen first) */
} MoeTask;

static void moe_task(void *c, int t, int nt) {
    (void)t, (void)nt;
    MoeTask *m = c;
    const RxtLayer *L = m->L;
    const int64_t K = m->K, D = m->D, H = m->H, GH = m->GH, nbk = m->nbk;
    const float *h = m->h, *hs = m->hs;
    const int *order = m->order, *start = m->start, *ids = m->ids, rb = m->rb;
    float *gu = m->gu, *act = m->act, *ys = m->ys;
    const int8_t *hq = m->hq;
    const int32_t *hsum = m->hsum;
    /* float32: up to F32_BATCH of an expert's rows in one product (f32_multi holds its weights in
     * cache for all of them), not ROWS_MAX at a time, each pass reading the expert again */
    const int chunk = !hq && L->w_in.type == W_F32 ? F32_BATCH : rb;
    for (int i; (i = atomic_fetch_add(&m->next, 1)) < m->used;) {
        const int64_t e = ids[i];
        const int *ps = order + start[e], count = start[e + 1] - start[e];
        const float *bias = L->b_in ? L->b_in + e * GH : NULL;
        for (int j = 0; j < count; j += chunk) {
            const int R = count - j < chunk ? count - j : chunk;
            float *acc[F32_BATCH];
            const float *xr[F32_BATCH];
            for (int r = 0; r < R; r++) {
                const int p = ps[j + r];
                acc[r] = gu + (int64_t)p * GH;
                memset(acc[r], 0, sizeof(float) * (size_t)GH);
                xr[r] = h + (p / K) * D;
            }
            if (hq) {
                QRows x;
                for (int r = 0; r < R; r++) {
                    const int64_t b = ps[j + r] / K;
                    x.xq[r] = hq + b * nbk * QBLOCK, x.sx[r] = hs + b * nbk, x.xsum[r] = hsum + b * nbk;
                }
                i8_rows_quantised(R, acc, &x, mat_rows(L->w_in, e * D), 0, D, 0, GH);
            } else {
                axpy_rows_multi(R, acc, xr, mat_rows(L->w_in, e * D), 0, D, 0, GH);
            }
            for (int r = 0; r < R; r++) {
                const int p = ps[j + r];
                const float *g = gu + (int64_t)p * GH;
                float *a = act + (int64_t)p * H;
                for (int64_t c = 0; c < H; c++) {
                    float gate = g[c], up = L->gated ? g[H + c] : 1.0f;
                    if (bias) gate += bias[c], up += L->gated ? bias[H + c] : 0.0f;
                    a[c] = activate(gate, L->act) * up;
                }
                acc[r] = ys + (int64_t)p * D;
                memset(acc[r], 0, sizeof(float) * (size_t)D);
                xr[r] = a;
            }
            axpy_rows_multi(R, acc, xr, mat_rows(L->w_out, e * H), 0, H, 0, D);
        }
    }
}

static void moe_grouped(const RxtLayer *L, int pairs, int64_t K, int64_t E, int64_t D, int64_t H, const float *h,
                        const int64_t *chosen, int *groups, float *gu, float *act, float *ys, int rb, int nt) {
    const int64_t GH = L->gated ? 2 * H : H;
    int *order = groups, *start = order + pairs, *ids = start + E + 1; /* pairs by expert; experts by use */
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int p = 0; p < pairs; p++) start[chosen[p] + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int p = 0; p < pairs; p++) order[start[chosen[p]]++] = p; /* start[e] is now e's end */
    for (int64_t e = E; e > 0; e--) start[e] = start[e - 1];
    start[0] = 0;
    int used = 0;
    for (int64_t e = 0; e < E; e++) {
        const int count = start[e + 1] - start[e];
        if (!count) continue;
        int i = used++; /* insertion by count, descending (stable: ties keep expert order) */
        while (i > 0 && start[ids[i - 1] + 1] - start[ids[i - 1]] < count) ids[i] = ids[i - 1], i--;
        ids[i] = (int)e;
    }
    rb = rb > ROWS_MAX ? ROWS_MAX : rb;
    /* int8: each row of h quantised once here, not once per expert it chose (the same blocks,
     * so the same values, as quantising it in each product). */
    const int n = pairs / (int)K;
    const int64_t nbk = (D + QBLOCK - 1) / QBLOCK;
    int8_t *hq = NULL;
    float *hs = NULL;
    int32_t *hsum = NULL;
    if (quantised(L->w_in)) {
        hq = malloc((size_t)(n * nbk * QBLOCK) + (size_t)(n * nbk) * (sizeof(float) + sizeof(int32_t)));
        if (hq) {
            hs = (float *)(hq + n * nbk * QBLOCK);
            hsum = (int32_t *)(hs + n * nbk);
            for (int b = 0; b < n; b++) quantize_x(h + b * D, D, hq + b * nbk * QBLOCK, hs + b * nbk, hsum + b * nbk);
        }
    }
    MoeTask task = {L, K, D, H, GH, nbk, h, order, start, ids, used, rb, gu, act, ys, hs, hq, hsum, 0};
    parallel(nt, moe_task, &task);
    free(hq);
}

/* float32 -> bfloat16, round to nearest even (torch's conversion; NaN stays a NaN). */
static uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return (uint16_t)0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

/* A router probability and its expert, as torch's CPU top-k ranks them. */
typedef struct {
    float v;
    int64_t i;
} Ranked;

/* torch's top-k comparison: NaN first, then larger values; equal values are not ordered. */
static int ranked_before(Ranked a, Ranked b) { return (a.v != a.v && b.v == b.v) || a.v > b.v; }

static void ranked_swap(Ranked *a, Ranked *b) {
    const Ranked t = *a;
    *a = *b;
    *b = t;
}

/* libstdc++'s heap helpers (__adjust_heap, __push_heap, __make_heap), for the selection's rare
 * fallback (its depth limit). */
static void heap_push(Ranked *q, int64_t hole, int64_t top, Ranked v) {
    int64_t parent = (hole - 1) / 2;
    while (hole > top && ranked_before(q[parent], v)) q[hole] = q[parent], hole = parent, parent = (hole - 1) / 2;
    q[hole] = v;
}

static void heap_adjust(Ranked *q, int64_t hole, int64_t len, Ranked v) {
    const int64_t top = hole;
    int64_t child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (ranked_before(q[child], q[child - 1])) child--;
        q[hole] = q[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        q[hole] = q[child - 1];
        hole = child - 1;
    }
    heap_push(q, hole, top, v);
}

static void insertion_sort(Ranked *q, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        Ranked v = q[i];
        if (ranked_before(v, q[0])) {
            memmove(q + 1, q, (size_t)i * sizeof(Ranked));
            q[0] = v;
        } else {
            int64_t j = i;
            while (ranked_before(v, q[j - 1])) q[j] = q[j - 1], j--;
            q[j] = v;
        }
    }
}

/* std::nth_element(q, q + nth, q + n) as libstdc++ implements it (introselect: median-of-three
 * pivot, unguarded partition, insertion sort below 4 elements, heap select past its depth
 * limit), which is what torch's CPU top-k runs when k * 64 > n (partial_sort otherwise). Which
 * of several equal values end up in front is decided by this sequence of moves alone, so
 * following it step by step gives torch's choice among tied probabilities. */
static void nth_element(Ranked *q, int64_t nth, int64_t n) {
    int64_t first = 0, last = n, depth = 0;
    for (int64_t m = n; m > 1; m >>= 1) depth++; /* __lg(n) */
    depth *= 2;
    while (last - first > 3) {
        if (depth == 0) { /* __heap_select(first, nth + 1, last), then the nth into place */
            Ranked *f = q + first;
            const int64_t len = nth + 1 - first;
            for (int64_t parent = (len - 2) / 2; len >= 2; parent--) {
                heap_adjust(f, parent, len, f[parent]);
                if (parent == 0) break;
            }
            for (int64_t i = nth + 1; i < last; i++)
                if (ranked_before(q[i], f[0])) {
                    const Ranked v = q[i];
                    q[i] = f[0];
                    heap_adjust(f, 0, len, v);
                }
            ranked_swap(q + first, q + nth);
            return;
        }
        depth--;
        /* __unguarded_partition_pivot: the median of (first + 1, mid, last - 1) to first */
        const int64_t a = first + 1, b = first + (last - first) / 2, c = last - 1;
        int64_t med;
        if (ranked_before(q[a], q[b]))
            med = ranked_before(q[b], q[c]) ? b : ranked_before(q[a], q[c]) ? c : a;
        else
            med = ranked_before(q[a], q[c]) ? a : ranked_before(q[b], q[c]) ? c : b;
        ranked_swap(q + first, q + med);
        int64_t lo = first + 1, hi = last;
        for (;;) {
            while (ranked_before(q[lo], q[first])) lo++;
            hi--;
            while (ranked_before(q[first], q[hi])) hi--;
            if (!(lo < hi)) break;
            ranked_swap(q + lo, q + hi);
            lo++;
        }
        if (lo <= nth)
            first = lo;
        else
            last = lo;
    }
    insertion_sort(q + first, last - first);
}

/* RxLM's router_amp on a CPU for one row h (D), as models/moe.py's _route_reduced runs it under
 * torch.autocast(bfloat16): the inputs and the router's weights in bf16 (w: its bf16 copy), the
 * products summed in float32 and the logits rounded to bf16; the softmax computed in float32 and
 * rounded to bf16; top-k on those rounded probabilities; the k weights divided by their sum
 * (+ 1e-9), each step rounded to bf16 as torch rounds a bf16 tensor's result. probs: E floats
 * of scratch, q: E Ranked.
 *
 * Ties: bf16 probabilities have 8 significant bits, so two experts often get the same
 * probability, and when they straddle the k-th place the choice between them is torch's, not
 * the values'. torch's CPU top-k picks with std::nth_element (or std::partial_sort when
 * k * 64 <= E), and then sorts the first k - 1; nth_element above is libstdc++'s, move for
 * move, so equal probabilities give torch's experts. What stays "close" rather than equal: the
 * float32 sums (the logits' and the softmax's) are added in another order than oneDNN and
 * torch's vectorised softmax add them, so a value within a rounding error of a bf16 midpoint
 * may round the other way (about 1 in 10^5 values), and the inputs h come from our norm, not
 * torch's; a flip can change which expert ranks k-th. docs/models.md says the same. */
static void route_bf16(const float *h, int64_t D, const uint16_t *w, int64_t E, int64_t K, int64_t *chosen,
                       float *mix, float *probs, Ranked *q) {
    float best = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < E; e++) {
        const uint16_t *row = w + e * D;
        float lanes[16] = {0}, sum = 0.0f;
        int64_t d = 0;
        for (; d + 16 <= D; d += 16)
            for (int j = 0; j < 16; j++) lanes[j] += round_bf16(h[d + j]) * bf16_to_f32(row[d + j]);
        for (; d < D; d++) sum += round_bf16(h[d]) * bf16_to_f32(row[d]);
        for (int j = 0; j < 16; j++) sum += lanes[j];
        probs[e] = round_bf16(sum);
        best = probs[e] > best ? probs[e] : best;
    }
    for (int64_t e = 0; e < E; e++) total += (probs[e] = expf(probs[e] - best));
    for (int64_t e = 0; e < E; e++) {
        q[e].v = round_bf16(probs[e] / total);
        q[e].i = e;
    }
    if (K * 64 <= E) { /* std::partial_sort: the K first in order (a heap select, then a heap sort) */
        for (int64_t parent = (K - 2) / 2; K >= 2; parent--) {
            heap_adjust(q, parent, K, q[parent]);
            if (parent == 0) break;
        }
        for (int64_t i = K; i < E; i++)
            if (ranked_before(q[i], q[0])) {
                const Ranked v = q[i];
                q[i] = q[0];
                heap_adjust(q, 0, K, v);
            }
        for (int64_t end = K; end > 1; end--) { /* __sort_heap: pop the heap's top to the end */
            const Ranked v = q[end - 1];
            q[end - 1] = q[0];
            heap_adjust(q, 0, end - 1, v);
        }
    } else {
        nth_element(q, K - 1, E);
        insertion_sort(q, K - 1); /* torch sorts the first k - 1 (std::sort: insertion sort up to 16) */
    }
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) sum += q[k].v;
    const float denom = round_bf16(round_bf16(sum) + 1e-9f);
    for (int64_t k = 0; k < K; k++) {
        chosen[k] = q[k].i;
        mix[k] = round_bf16(q[k].v / denom);
    }
}

/* The bf16 router alone, for the tests: rows h (n, D), bf16 weights (E, D) -> experts and
 * weights (n, K). */
void rxt_route_bf16(int n, const float *h, int64_t D, const uint16_t *w, int64_t E, int64_t K, int64_t *chosen,
                    float *mix) {
    float *probs = malloc(sizeof(float) * (size_t)E);
    Ranked *q = malloc(sizeof(Ranked) * (size_t)E);
    if (probs && q)
        for (int b = 0; b < n; b++) route_bf16(h + b * D, D, w, E, K, chosen + b * K, mix + b * K, probs, q);
    free(probs);
    free(q);
}

/* An MoE layer's (row, expert) pairs one at a time (moe_grouped's path when each row's experts
 * divide evenly among the threads, or rows cannot share experts): item = (pair, part of the
 * expert's input rows), thread t taking items t, t + nt, ...; the parts' partial sums are added
 * before the activation and at the end. */
typedef struct {
    const RxtLayer *L;
    const float *h;
    const int64_t *chosen;
    float *gu, *act, *ys;
    int64_t D, H, GH, K;
    int parts, pairs;
} PairsTask;

static void pairs_task(void *c, int t, int count) {
    const PairsTask *k = c;
    const RxtLayer *L = k->L;
    const int64_t D = k->D, H = k->H, GH = k->GH, K = k->K;
    const int parts = k->parts, pairs = k->pairs;
    const int64_t *chosen = k->chosen;
    float *gu = k->gu, *act = k->act, *ys = k->ys;
    for (int item = t; item < parts * pairs; item += count) {
        const int p = item / parts, part = item % parts;
        float *o = gu + (int64_t)item * GH;
        memset(o, 0, sizeof(float) * (size_t)GH);
        axpy_rows(o, k->h + (p / K) * D, mat_rows(L->w_in, chosen[p] * D), split_k(L->w_in, D, part, parts),
                  split_k(L->w_in, D, part + 1, parts), 0, GH);
    }
    team_barrier(count);
    for (int item = t; item < parts * pairs; item += count) {
        const int p = item / parts, part = item % parts;
        const float *g = gu + (int64_t)(parts * p) * GH;
        float *a = act + (int64_t)item * H;
        const int64_t r0 = split_k(L->w_out, H, part, parts), r1 = split_k(L->w_out, H, part + 1, parts);
        const float *bias = L->b_in ? L->b_in + chosen[p] * GH : NULL;
        for (int64_t r = r0; r < r1; r++) {
            float gate = g[r], up = L->gated ? g[H + r] : 1.0f;
            if (parts == 2) gate += g[GH + r], up += L->gated ? g[GH + H + r] : 0.0f;
            if (bias) gate += bias[r], up += L->gated ? bias[H + r] : 0.0f;
            a[r - r0] = activate(gate, L->act) * up;
        }
        float *o = ys + (int64_t)item * D;
        memset(o, 0, sizeof(float) * (size_t)D);
        axpy_rows(o, a, mat_rows(L->w_out, chosen[p] * H + r0), 0, r1 - r0, 0, D);
    }
}

/* The attention of a step's (token, head) pairs, one pair per item: self-attention over the
 * token's row of the cache up to its position, memory cross-attention over its row's memory. */
typedef struct {
    const RxtModel *m;
    const RxtLayer *L;
    const int64_t *positions, *rows;
    const float *qkv;
    float *scores, *att;
    int64_t qkv_cols, long_seq, so, co;
    int old_attend;
} AttendTask;

#define ROW(b) (rows ? rows[b] : (int64_t)(b)) /* the cache / memory row of token b */

static void self_attend_item(void *c, int64_t bj) {
    const AttendTask *a = c;
    const RxtModel *m = a->m;
    const int64_t *rows = a->rows, hd = m->head_dim, so = a->so;
    const int64_t b = bj / so, j = bj % so, g = j / (so / m->hkv);
    const int64_t at = ROW(b) * m->cache_row + g * m->max_len * hd;
    attend(a->qkv + b * a->qkv_cols + (j % m->hq) * hd, a->L->k_cache + at, a->L->v_cache + at, a->positions[b] + 1,
           hd, a->scores + bj * a->long_seq, a->att + bj * hd, a->old_attend);
}

static void cross_attend_item(void *c, int64_t bj) {
    const AttendTask *a = c;
    const RxtModel *m = a->m;
    const RxtLayer *L = a->L;
    const int64_t *rows = a->rows, hd = m->head_dim, co = a->co;
    const int64_t b = bj / co, j = bj % co, g = j / (co / m->ckv);
    const int64_t at = ROW(b) * m->mem_row + g * m->stm * hd;
    const float *q = a->qkv + (b * m->cq + j % m->cq) * hd;
    if (m->mem_bf16)
        attend_t(q, (const uint16_t *)L->mem_k + at, (const uint16_t *)L->mem_v + at, m->stm, hd,
                 a->scores + bj * a->long_seq, a->att + bj * hd);
    else
        attend(q, (const float *)L->mem_k + at, (const float *)L->mem_v + at, m->stm, hd,
               a->scores + bj * a->long_seq, a->att + bj * hd, a->old_attend);
}

/* rxt_decode_rows's work, on thread 0 of the step's team of nt threads (parallel hands out the
 * parts). */
static int decode_rows(const RxtModel *m, int n, const int64_t *tokens, const int64_t *positions, const int64_t *rows,
                       int n_out, const int64_t *out_rows, float *logits, int nt) {
    for (int b = 0; b < n; b++) {
        if (tokens[b] < 0 || tokens[b] >= m->vocab) return -1;
        if (positions[b] < 0 || positions[b] >= m->max_len || positions[b] + m->rope_offset >= m->n_positions)
            return -1;
        if (rows && (rows[b] < 0 || rows[b] >= m->n_rows)) return -1;
    }
    if (n_out < 0 || n_out > n) return -1;
    for (int j = 0; out_rows && j < n_out; j++)
        if (out_rows[j] < (j ? out_rows[j - 1] + 1 : 0) || out_rows[j] >= n) return -1; /* increasing */
    const int64_t D = m->dim, hd = m->head_dim, H = m->hidden, K = m->top_k, E = m->n_experts;
    const int64_t qkv_cols = (m->hq + 2 * m->hkv) * hd, long_seq = m->max_len > m->stm ? m->max_len : m->stm;
    /* Output heads: the query heads, or (reversed SQA) the key/value heads, each reading query
     * head j mod q_heads. */
    const int64_t so = m->hq > m->hkv ? m->hq : m->hkv, co = m->cq > m->ckv ? m->cq : m->ckv;
    const int64_t heads_max = so > co ? so : co, proj = qkv_cols > m->cq * hd ? qkv_cols : m->cq * hd;
    int64_t wide = 0, shared_max = 0; /* the widest dense or shared feed-forward; most shared experts */
    for (int64_t l = 0; l < m->n_layers; l++) {
        const RxtLayer *L = &m->layers[l];
        if (!L->router && L->dense.hidden > wide) wide = L->dense.hidden;
        for (int64_t s = 0; s < L->n_shared; s++)
            if (L->shared[s].hidden > wide) wide = L->shared[s].hidden;
        if (L->n_shared > shared_max) shared_max = L->n_shared;
    }
    const int pairs = n * (int)K;
    const int64_t gu_size = 2 * pairs * 2 * H > n * 2 * wide ? 2 * pairs * 2 * H : n * 2 * wide;
    const int64_t act_size = 2 * pairs * H > n * wide ? 2 * pairs * H : n * wide;
    /* One block of scratch for the whole step. */
    const int64_t sizes[] = {n * D,       n * D,   n * proj, n * heads_max * hd, n * heads_max * long_seq,
                             n * (E + shared_max), gu_size, 2 * pairs * D, act_size, n * heads_max * hd};
    int64_t total = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) total += sizes[i];
    total = (total + 15) / 16 * 16; /* the expert ids after the floats stay aligned */
    /* After the floats: each pair's expert and mixing weight, the pairs grouped by expert
     * (moe_grouped), and the bf16 router's ranking (route_bf16). */
    const size_t extra = (size_t)pairs * (sizeof(int64_t) + sizeof(float)) + (size_t)(pairs + 2 * E + 1) * sizeof(int) +
                         (size_t)E * sizeof(Ranked);
    float *scratch = malloc((size_t)total * sizeof(float) + extra);
    if (!scratch) return -2;
    int64_t *chosen = (int64_t *)(scratch + total);
    Ranked *rq = (Ranked *)(chosen + pairs);
    float *mix = (float *)(rq + E);
    int *groups = (int *)(mix + pairs);
    const int old_attend = m->attend_old != 0;
    const int rb = m->row_block < 1 ? 1 : m->row_block > ROWS_MAX ? ROWS_MAX : (int)m->row_block;
    float *x = scratch, *h = x + sizes[0], *qkv = h + sizes[1], *att = qkv + sizes[2], *scores = att + sizes[3],
          *route = scores + sizes[4], *gu = route + sizes[5], *ys = gu + sizes[6], *act = ys + sizes[7],
          *gates = act + sizes[8];

    for (int b = 0; b < n; b++) memcpy(x + b * D, m->embedding + tokens[b] * D, D * sizeof(float));

    for (int64_t l = 0; l < m->n_layers; l++) {
        const RxtLayer *L = &m->layers[l];
        /* Self-attention: Q/K/V in one product, RoPE on Q and K, cache write, attention. */
        norm(n, D, x, L->self_norm, L->self_norm_bias, m->eps, m->layer_norm, h);
        gemv(n, h, D, L->qkv, qkv_cols, L->qkv_bias, qkv, 0, nt, rb);
        for (int b = 0; b < n; b++) {
            const int64_t at_pos = (positions[b] + m->rope_offset) * hd;
            const float *cos = m->cos + at_pos, *sin = m->sin + at_pos;
            float *row = qkv + b * qkv_cols;
            for (int64_t j = 0; j < m->hq + m->hkv; j++) rope(row + j * hd, hd, cos, sin, m->rope_mode);
            for (int64_t g = 0; g < m->hkv; g++) {
                const int64_t at = ROW(b) * m->cache_row + (g * m->max_len + positions[b]) * hd;
                memcpy(L->k_cache + at, row + (m->hq + g) * hd, hd * sizeof(float));
                memcpy(L->v_cache + at, row + (m->hq + m->hkv + g) * hd, hd * sizeof(float));
            }
        }
        AttendTask heads = {m, L, positions, rows, qkv, scores, att, qkv_cols, long_seq, so, co, old_attend};
        parallel_for(nt, n * so, self_attend_item, &heads);
        if (L->gate.w) { /* gated attention: the heads' output times act(h W_gate + b) */
            gemv(n, h, D, L->gate, so * hd, L->gate_bias, gates, 0, nt, rb);
            for (int64_t i = 0; i < n * so * hd; i++) att[i] *= activate(gates[i], L->gate_act);
        }
        gemv(n, att, so * hd, L->o, D, L->o_bias, x, 1, nt, rb);

        /* Memory cross-attention: queries rotated, keys/values are the STM's (no position). */
        if (L->cross_norm) {
            norm(n, D, x, L->cross_norm, L->cross_norm_bias, m->eps, m->layer_norm, h);
            gemv(n, h, D, L->cq, m->cq * hd, L->cq_bias, qkv, 0, nt, rb);
            for (int b = 0; b < n; b++)
                for (int64_t j = 0; j < m->cq; j++)
                    rope(qkv + (b * m->cq + j) * hd, hd, m->cos + (positions[b] + m->rope_offset) * hd,
                         m->sin + (positions[b] + m->rope_offset) * hd, m->rope_mode);
            parallel_for(nt, n * co, cross_attend_item, &heads);
            if (L->cgate.w) {
                gemv(n, h, D, L->cgate, co * hd, L->cgate_bias, gates, 0, nt, rb);
                for (int64_t i = 0; i < n * co * hd; i++) att[i] *= activate(gates[i], L->cgate_act);
            }
            gemv(n, att, co * hd, L->co, D, L->co_bias, x, 1, nt, rb);
        }

        norm(n, D, x, L->ffn_norm, L->ffn_norm_bias, m->eps, m->layer_norm, h);
        if (!L->router) { /* a dense feed-forward */
            ffn_rows(n, h, D, &L->dense, L->act, NULL, 0, gu, act, x, nt, rb);
            continue;
        }
        /* MoE: top-k of the router logits, softmax over those k, gated experts. */
        if (L->router_bf16) { /* RxLM's router_amp: the router in bf16 (route_bf16) */
            for (int b = 0; b < n; b++)
                route_bf16(h + b * D, D, L->router_bf16, E, K, chosen + b * K, mix + b * K, route + b * E, rq);
        } else {
            const Mat router = {L->router, D, W_F32T, D}; /* (E, dim) in place: one dot product per expert */
            gemv(n, h, D, router, E, NULL, route, 0, nt, rb);
            for (int b = 0; b < n; b++) {
                float *r = route + b * E;
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
        }
        const int64_t GH = L->gated ? 2 * H : H; /* w_in's columns */
        int parts = 1;
        if (rb > 1 && (n > 1 || pairs % nt == 0)) /* each chosen expert once for all its rows */
            moe_grouped(L, pairs, K, E, D, H, h, chosen, groups, gu, act, ys, rb, nt);
        else {
            /* Work items: (pair, part of the input rows), each one contiguous block of an expert's
             * weights. Whole experts when they divide evenly among the threads, else halves (int8:
             * split between blocks of 32 rows); the parts' partial sums are added before the
             * activation and at the end. */
            parts = pairs % nt == 0 ? 1 : 2;
            PairsTask task = {L, h, chosen, gu, act, ys, D, H, GH, K, parts, pairs};
            parallel(nt, pairs_task, &task);
        }
        /* Into the residual: the routed sum (scaled where the shared experts are weighed against
         * it), the global bias, then the shared experts (models/moe.py's _extras, in its order). */
        for (int p = 0; p < pairs; p++) {
            float *xb = x + (p / K) * D;
            const float w = L->routed_scale * mix[p];
            for (int part = 0; part < parts; part++) {
                const float *y = ys + (int64_t)(parts * p + part) * D;
                for (int64_t c = 0; c < D; c++) xb[c] += w * y[c];
            }
            if (L->b_out) {
                const float *bias = L->b_out + chosen[p] * D;
                for (int64_t c = 0; c < D; c++) xb[c] += w * bias[c];
            }
        }
        for (int b = 0; b < n; b++)
            for (int64_t c = 0; c < D && L->global_bias; c++) x[b * D + c] += L->global_bias[c];
        if (L->n_shared) {
            const int64_t S = L->n_shared;
            float *weights = route + n * E; /* (n, S): each shared expert's weight per row */
            if (L->shared_gate) {
                const Mat gate = {L->shared_gate, D, W_F32T, D};
                gemv(n, h, D, gate, S, NULL, weights, 0, nt, rb);
            } else {
                memset(weights, 0, sizeof(float) * (size_t)(n * S));
            }
            for (int b = 0; b < n; b++) {
                float *w = weights + b * S, top = -INFINITY, total = 0.0f;
                for (int64_t s = 0; s < S; s++)
                    if (w[s] > top) top = w[s];
                for (int64_t s = 0; s < S; s++) total += (w[s] = expf(w[s] - top));
                for (int64_t s = 0; s < S; s++) w[s] = L->shared_scale * w[s] / total;
            }
            for (int64_t s = 0; s < S; s++) ffn_rows(n, h, D, &L->shared[s], L->act, weights + s, S, gu, act, x, nt, rb);
            for (int b = 0; b < n; b++)
                for (int64_t c = 0; c < D && L->shared_bias; c++) x[b * D + c] += L->shared_scale * L->shared_bias[c];
        }
    }
    if (out_rows) /* only the rows whose logits are wanted go through the norm and the LM head */
        for (int j = 0; j < n_out; j++) memmove(x + j * D, x + out_rows[j] * D, D * sizeof(float));
    const int outs = n_out;
    if (outs == 0) { /* a prefill chunk that ends no prompt: its keys/values were the point */
        free(scratch);
        return 0;
    }
    if (m->final_norm)
        norm(outs, D, x, m->final_norm, m->final_norm_bias, m->final_eps, m->final_layer_norm, h);
    else
        memcpy(h, x, (size_t)(outs * D) * sizeof(float));
    gemv(outs, h, D, m->lm_head, m->vocab, m->head_bias, logits, 0, nt, rb);
    free(scratch);
    return 0;
}

/* Tokens (n,) at positions (n,), token b in cache/memory row rows[b] (rows NULL: row b). Writes
 * each token's keys/values into its row's cache at its position, then attends over positions
 * 0..position of that row, so tokens of one row at consecutive positions are a causal prefill
 * chunk (the cache holds the earlier positions). Logits (n_out, vocab) of the tokens out_rows,
 * increasing (NULL: tokens 0..n_out-1). Returns 0, or -1 for a token, position or row out of
 * range (nothing is written then). One OpenMP region for the whole call: its thread 0 runs the
 * step, the others take the parallel parts (Team). */
int rxt_decode_rows(const RxtModel *m, int n, const int64_t *tokens, const int64_t *positions, const int64_t *rows,
                    int n_out, const int64_t *out_rows, float *logits, int nt) {
    if (nt <= 1) return decode_rows(m, n, tokens, positions, rows, n_out, out_rows, logits, 1);
    Team team = {0};
    int rc = 0;
#pragma omp parallel num_threads(nt)
    {
        const int t = omp_get_thread_num();
        if (t == 0) { /* the step; its parallel parts go to the team */
            team.nt = omp_get_num_threads();
            team_here = &team, team_rank = 0;
            rc = decode_rows(m, n, tokens, positions, rows, n_out, out_rows, logits, team.nt);
            team_here = NULL;
            atomic_store(&team.stop, 1);
            atomic_fetch_add(&team.generation, 1);
        } else {
            team_work(&team, t);
        }
    }
    return rc;
}

/* One decode step: token b in row b, logits for every row. */
int rxt_decode_step(const RxtModel *m, int n, const int64_t *tokens, const int64_t *positions, float *logits,
                    int nt) {
    return rxt_decode_rows(m, n, tokens, positions, NULL, n, NULL, logits, nt);
}
