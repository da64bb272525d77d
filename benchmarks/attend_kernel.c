/* decode_step.c's attention alone (issue 27): the vector `attend` against `attend_old` (the code
 * before it), one head at a time, interleaved, in the calling thread's CPU time; and the softmax's
 * exponentials over one contiguous score row: exp_row (exp_neg in vector code) against libm's expf
 * one score at a time. Built and run by `benchmarks/int8_rows.py --attend` (with the flags of the
 * C step's default build); prints one JSON object per shape.
 *
 *     cc -O3 -march=native -fopenmp -std=c11 benchmarks/attend_kernel.c -lm && ./a.out 16 256 20000
 */
#include "../models/csrc/decode_step.c"

#include <stdio.h>
#include <time.h>

static double cpu_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median3(double *t) {
    qsort(t, 3, sizeof(double), cmp);
    return t[1];
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s head_dim keys calls\n", argv[0]);
        return 2;
    }
    const int64_t hd = atoll(argv[1]), len = atoll(argv[2]);
    const int calls = atoi(argv[3]);
    float *q = malloc(hd * sizeof(float)), *k = malloc(len * hd * sizeof(float)), *v = malloc(len * hd * sizeof(float));
    float *scores = malloc(len * sizeof(float)), *row = malloc(len * sizeof(float)), *out = malloc(hd * sizeof(float));
    srand(1);
    for (int64_t i = 0; i < hd; i++) q[i] = 4.0f * ((float)rand() / (float)RAND_MAX - 0.5f);
    for (int64_t i = 0; i < len * hd; i++) {
        k[i] = (float)rand() / (float)RAND_MAX - 0.5f;
        v[i] = (float)rand() / (float)RAND_MAX;
    }
    for (int64_t t = 0; t < len; t++) row[t] = -8.0f * (float)rand() / (float)RAND_MAX;
    double t_new[3], t_old[3], t_exp[3], t_expf[3];
    volatile float sink = 0.0f;
    for (int r = 0; r < 3; r++) { /* each variant in turn within every repeat */
        double t0 = cpu_now();
        for (int c = 0; c < calls; c++) attend(q, k, v, len, hd, scores, out, 0), sink += out[0];
        t_new[r] = cpu_now() - t0;
        t0 = cpu_now();
        for (int c = 0; c < calls; c++) attend(q, k, v, len, hd, scores, out, 1), sink += out[0];
        t_old[r] = cpu_now() - t0;
        t0 = cpu_now();
        for (int c = 0; c < calls; c++) {
            memcpy(scores, row, len * sizeof(float));
            sink += exp_row(scores, len, 0.0f, 1.0f);
        }
        t_exp[r] = cpu_now() - t0;
        t0 = cpu_now();
        for (int c = 0; c < calls; c++) {
            memcpy(scores, row, len * sizeof(float));
            float total = 0.0f;
            for (int64_t t = 0; t < len; t++) total += (scores[t] = expf(scores[t]));
            sink += total;
        }
        t_expf[r] = cpu_now() - t0;
    }
    const double n = median3(t_new), o = median3(t_old), e = median3(t_exp), f = median3(t_expf);
    printf("{\"isa\": \"%s\", \"head_dim\": %lld, \"keys\": %lld, \"calls\": %d, \"attend_ns\": %.1f, "
           "\"attend_old_ns\": %.1f, \"old_over_new\": %.2f, \"exp_row_ns\": %.1f, \"expf_row_ns\": %.1f, "
           "\"expf_over_exp_row\": %.2f}\n",
           rxt_isa(), (long long)hd, (long long)len, calls, 1e9 * n / calls, 1e9 * o / calls, o / n, 1e9 * e / calls,
           1e9 * f / calls, f / e);
    return sink == 12345.0f; /* keeps the loops */
}
