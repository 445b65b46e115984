/*
 * Standalone checks of the CPU compute layer against naive double-precision loops, run before
 * (and independently of) the Python boundary. Not part of the extension build; see run.sh.
 *
 * Every test matrix is allocated with padding around its view (row- or column-major, leading
 * dimension larger than needed) filled with a sentinel, so a write outside the view is caught.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpeft/dropout.h"
#include "cpeft/ia3.h"
#include "cpeft/lora_embedding.h"
#include "cpeft/lora_linear.h"
#include "cpeft/merge.h"

#include "blas.h"
#include "dropout_rows.h"

static int failures, checks;

static void fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    if (++failures > 30)
        exit(1);
}

/* splitmix64: reproducible data without libc rand. */
static uint64_t rng_state = 0x1234567u;
static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double rng_uniform(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_sym(void) { return 2.0 * rng_uniform() - 1.0; }

#define SENTINEL 777.0

typedef struct {
    cpeft_dtype dt;
    cpeft_mat m;
    void *buf;
    int64_t buf_len;
} tmat;

enum { ROW_MAJOR = 0, COL_MAJOR = 1 };

static void buf_set(cpeft_dtype dt, void *buf, int64_t k, double v)
{
    if (dt == CPEFT_FLOAT32)
        ((float *)buf)[k] = (float)v;
    else
        ((double *)buf)[k] = v;
}
static double buf_get(cpeft_dtype dt, const void *buf, int64_t k)
{
    return dt == CPEFT_FLOAT32 ? (double)((const float *)buf)[k] : ((const double *)buf)[k];
}

/* A rows x cols view with 2 elements of padding per leading dimension and an offset of 1. */
static tmat tm_new(cpeft_dtype dt, int64_t rows, int64_t cols, int layout)
{
    tmat t;
    t.dt = dt;
    int64_t ld = (layout == ROW_MAJOR ? cols : rows) + 2;
    int64_t outer = layout == ROW_MAJOR ? rows : cols;
    t.buf_len = 1 + ld * (outer > 0 ? outer : 1) + 2;
    t.buf = malloc((size_t)t.buf_len * cpeft_dtype_size(dt));
    for (int64_t k = 0; k < t.buf_len; ++k)
        buf_set(dt, t.buf, k, SENTINEL);
    t.m.data = (char *)t.buf + cpeft_dtype_size(dt);
    t.m.rows = rows;
    t.m.cols = cols;
    t.m.row_stride = layout == ROW_MAJOR ? ld : 1;
    t.m.col_stride = layout == ROW_MAJOR ? 1 : ld;
    return t;
}
static int64_t tm_off(const tmat *t, int64_t i, int64_t j)
{
    return 1 + i * t->m.row_stride + j * t->m.col_stride;
}
static double tm_get(const tmat *t, int64_t i, int64_t j)
{
    return buf_get(t->dt, t->buf, tm_off(t, i, j));
}
static void tm_set(tmat *t, int64_t i, int64_t j, double v)
{
    buf_set(t->dt, t->buf, tm_off(t, i, j), v);
}
static void tm_rand(tmat *t)
{
    for (int64_t i = 0; i < t->m.rows; ++i)
        for (int64_t j = 0; j < t->m.cols; ++j)
            tm_set(t, i, j, rng_sym());
}
/* Fill the view with NaN: an output that is not fully written shows up in the comparison. */
static void tm_poison(tmat *t)
{
    for (int64_t i = 0; i < t->m.rows; ++i)
        for (int64_t j = 0; j < t->m.cols; ++j)
            tm_set(t, i, j, NAN);
}
static void tm_free(tmat *t) { free(t->buf); }

/* Every buffer element outside the view still holds the sentinel. */
static void tm_check_padding(const tmat *t, const char *what)
{
    char *inside = calloc((size_t)t->buf_len, 1);
    for (int64_t i = 0; i < t->m.rows; ++i)
        for (int64_t j = 0; j < t->m.cols; ++j)
            inside[tm_off(t, i, j)] = 1;
    for (int64_t k = 0; k < t->buf_len; ++k)
        if (!inside[k] && buf_get(t->dt, t->buf, k) != SENTINEL) {
            fail("%s: write outside the view at buffer element %lld", what, (long long)k);
            break;
        }
    free(inside);
}

/* Reference values are computed in double into a plain row-major array. */
static double *ref_new(int64_t rows, int64_t cols)
{
    return calloc((size_t)(rows * cols > 0 ? rows * cols : 1), sizeof(double));
}

static double tol_of(cpeft_dtype dt) { return dt == CPEFT_FLOAT32 ? 2e-5 : 1e-12; }

static void compare(const char *what, const tmat *got, const double *ref, double scale_hint)
{
    ++checks;
    double max_ref = scale_hint;
    for (int64_t k = 0; k < got->m.rows * got->m.cols; ++k)
        max_ref = fmax(max_ref, fabs(ref[k]));
    double tol = tol_of(got->dt) * (1.0 + max_ref);
    for (int64_t i = 0; i < got->m.rows; ++i)
        for (int64_t j = 0; j < got->m.cols; ++j) {
            double g = tm_get(got, i, j), r = ref[i * got->m.cols + j];
            if (!(fabs(g - r) <= tol)) {
                fail("%s [%s %lldx%lld]: (%lld,%lld) got %.10g expected %.10g", what,
                     got->dt == CPEFT_FLOAT32 ? "f32" : "f64", (long long)got->m.rows,
                     (long long)got->m.cols, (long long)i, (long long)j, g, r);
                return;
            }
        }
    tm_check_padding(got, what);
}

static void expect_rc(const char *what, int rc, int want, const cpeft_status *st)
{
    ++checks;
    if (rc != want)
        fail("%s: rc %d (want %d): %s", what, rc, want, st->message);
}

static const cpeft_dtype dtypes[2] = {CPEFT_FLOAT32, CPEFT_FLOAT64};

/* ------------------------------------------------------------------------------------- gemm */

static void test_gemm(void)
{
    static const int64_t sizes[] = {0, 1, 3, 17};
    for (int d = 0; d < 2; ++d)
        for (int si = 0; si < 64; ++si) {
            int64_t M = sizes[si & 3], N = sizes[(si >> 2) & 3], K = sizes[(si >> 4) & 3];
            for (int variant = 0; variant < 32; ++variant) {
                int ta = variant & 1, tb = (variant >> 1) & 1;
                int la = (variant >> 2) & 1, lb = (variant >> 3) & 1, lc = (variant >> 4) & 1;
                cpeft_dtype dt = dtypes[d];
                tmat A = ta ? tm_new(dt, K, M, la) : tm_new(dt, M, K, la);
                tmat B = tb ? tm_new(dt, N, K, lb) : tm_new(dt, K, N, lb);
                tmat C = tm_new(dt, M, N, lc);
                tm_rand(&A);
                tm_rand(&B);
                double beta = (variant % 3 == 0) ? 0.0 : 0.5, alpha = 1.5;
                if (beta == 0.0)
                    tm_poison(&C);
                else
                    tm_rand(&C);
                double *ref = ref_new(M, N);
                for (int64_t i = 0; i < M; ++i)
                    for (int64_t j = 0; j < N; ++j) {
                        double s = 0;
                        for (int64_t k = 0; k < K; ++k)
                            s += (ta ? tm_get(&A, k, i) : tm_get(&A, i, k)) *
                                 (tb ? tm_get(&B, j, k) : tm_get(&B, k, j));
                        ref[i * N + j] = alpha * s + (beta != 0.0 ? beta * tm_get(&C, i, j) : 0.0);
                    }
                cpeft_status st;
                int rc = cpeft_gemm_cpu(dt, ta, tb, alpha, A.m, B.m, beta, C.m, &st);
                expect_rc("gemm", rc, CPEFT_OK, &st);
                char what[96];
                snprintf(what, sizeof what, "gemm M%lld N%lld K%lld ta%d tb%d layouts %d%d%d",
                         (long long)M, (long long)N, (long long)K, ta, tb, la, lb, lc);
                compare(what, &C, ref, 0);
                free(ref);
                tm_free(&A);
                tm_free(&B);
                tm_free(&C);
            }
        }
}

static void test_colsum(void)
{
    static const int64_t sizes[] = {0, 1, 3, 17};
    for (int d = 0; d < 2; ++d)
        for (int si = 0; si < 16; ++si)
            for (int layout = 0; layout < 2; ++layout) {
                cpeft_dtype dt = dtypes[d];
                int64_t M = sizes[si & 3], N = sizes[si >> 2];
                tmat A = tm_new(dt, M, N, layout);
                tm_rand(&A);
                /* out as a 1 x N view with column stride 3 (a strided vector). */
                tmat out = tm_new(dt, N, 1, ROW_MAJOR);
                tm_poison(&out);
                double *ref = ref_new(N, 1);
                for (int64_t j = 0; j < N; ++j)
                    for (int64_t i = 0; i < M; ++i)
                        ref[j] += 2.0 * tm_get(&A, i, j);
                cpeft_vec v = {out.m.data, N, out.m.row_stride};
                cpeft_status st;
                expect_rc("colsum", cpeft_colsum_cpu(dt, 2.0, A.m, v, &st), CPEFT_OK, &st);
                compare("colsum", &out, ref, 0);
                free(ref);
                tm_free(&A);
                tm_free(&out);
            }
}

/* ----------------------------------------------------------------------------- lora linear */

typedef struct {
    int64_t m, in, out, r, groups;
    const uint8_t *enabled;
    int bias, fan_in_fan_out, x_layout, out_layout, keep_xa;
    double p;
    uint64_t seed, offset;
} lora_case;

/* The reference mask comes straight from cpeft_dropout_keep, independently of the chunked
 * block-cached generator the ops use. */
static double ref_mask(const cpeft_dropout *d, int64_t row, int64_t col, int64_t cols)
{
    if (d->p <= 0.0)
        return 1.0;
    return cpeft_dropout_keep(d, (uint64_t)(row * cols + col)) ? cpeft_dropout_keep_scale(d->p)
                                                               : 0.0;
}

static void run_lora_case(cpeft_dtype dt, const lora_case *c)
{
    int64_t seg = c->out / c->groups, k = 0;
    for (int64_t g = 0; g < c->groups; ++g)
        k += c->enabled[g] != 0;
    int64_t rk = c->r * k;
    tmat x = tm_new(dt, c->m, c->in, c->x_layout);
    /* fan_in_fan_out stores W as (IN, OUT); its (OUT, IN) view is that storage transposed. */
    tmat w = tm_new(dt, c->out, c->in, c->fan_in_fan_out ? COL_MAJOR : ROW_MAJOR);
    tmat bias = tm_new(dt, 1, c->out, COL_MAJOR); /* a vector with stride 3 */
    tmat la = tm_new(dt, rk, c->in, ROW_MAJOR);
    tmat lb = tm_new(dt, seg * k, c->r, COL_MAJOR);
    tmat y = tm_new(dt, c->m, c->out, c->out_layout);
    tmat xa = tm_new(dt, c->m, rk, c->out_layout);
    tmat g = tm_new(dt, c->m, c->out, c->x_layout);
    tm_rand(&x);
    tm_rand(&w);
    tm_rand(&bias);
    tm_rand(&la);
    tm_rand(&lb);
    tm_rand(&g);
    tm_poison(&y);
    tm_poison(&xa);

    cpeft_lora_linear_args a;
    memset(&a, 0, sizeof a);
    a.dtype = dt;
    a.m = c->m;
    a.in = c->in;
    a.out = c->out;
    a.r = c->r;
    a.groups = c->groups;
    memcpy(a.enabled, c->enabled, (size_t)c->groups);
    a.x = x.m;
    a.weight = w.m;
    a.bias = (cpeft_vec){c->bias ? bias.m.data : NULL, c->out, bias.m.col_stride};
    a.lora_a = la.m;
    a.lora_b = lb.m;
    a.scale = 0.75;
    a.dropout = (cpeft_dropout){c->p, c->seed, c->offset};

    /* Reference forward. */
    double *dx = ref_new(c->m, c->in), *ref_xa = ref_new(c->m, rk), *ref_y = ref_new(c->m, c->out);
    for (int64_t i = 0; i < c->m; ++i)
        for (int64_t j = 0; j < c->in; ++j)
            dx[i * c->in + j] = tm_get(&x, i, j) * ref_mask(&a.dropout, i, j, c->in);
    for (int64_t i = 0; i < c->m; ++i)
        for (int64_t q = 0; q < rk; ++q) {
            double s = 0;
            for (int64_t j = 0; j < c->in; ++j)
                s += dx[i * c->in + j] * tm_get(&la, q, j);
            ref_xa[i * rk + q] = s;
        }
    for (int64_t i = 0; i < c->m; ++i)
        for (int64_t o = 0; o < c->out; ++o) {
            double s = c->bias ? tm_get(&bias, 0, o) : 0.0;
            for (int64_t j = 0; j < c->in; ++j)
                s += tm_get(&x, i, j) * tm_get(&w, o, j);
            int64_t grp = o / seg, kk = 0;
            for (int64_t t = 0; t < grp; ++t)
                kk += c->enabled[t] != 0;
            if (c->enabled[grp])
                for (int64_t q = 0; q < c->r; ++q)
                    s += a.scale * ref_xa[i * rk + kk * c->r + q] *
                         tm_get(&lb, kk * seg + o % seg, q);
            ref_y[i * c->out + o] = s;
        }

    cpeft_lora_linear_fwd_out fo = {y.m, xa.m};
    if (!c->keep_xa)
        fo.xa.data = NULL;
    cpeft_status st;
    expect_rc("lora fwd", cpeft_lora_linear_fwd_cpu(&a, &fo, &st), CPEFT_OK, &st);
    char what[160];
    snprintf(what, sizeof what, "lora fwd y m%lld in%lld out%lld r%lld G%lld bias%d fifo%d p%.1f",
             (long long)c->m, (long long)c->in, (long long)c->out, (long long)c->r,
             (long long)c->groups, c->bias, c->fan_in_fan_out, c->p);
    compare(what, &y, ref_y, 0);
    if (c->keep_xa)
        compare("lora fwd xa", &xa, ref_xa, 0);

    if (c->keep_xa) {
        /* Reference backward, from the definitions (not from the header's factorization). */
        tmat gx = tm_new(dt, c->m, c->in, c->out_layout);
        tmat ga = tm_new(dt, rk, c->in, c->out_layout);
        tmat gbm = tm_new(dt, seg * k, c->r, c->out_layout);
        tmat gbias = tm_new(dt, c->out, 1, ROW_MAJOR);
        tmat gw = tm_new(dt, c->out, c->in, c->fan_in_fan_out ? COL_MAJOR : ROW_MAJOR);
        tm_poison(&gx);
        tm_poison(&ga);
        tm_poison(&gbm);
        tm_poison(&gbias);
        tm_poison(&gw);
        double *r_gx = ref_new(c->m, c->in), *r_ga = ref_new(rk, c->in);
        double *r_gb = ref_new(seg * k, c->r), *r_gbias = ref_new(c->out, 1);
        double *r_gw = ref_new(c->out, c->in);
        for (int64_t i = 0; i < c->m; ++i)
            for (int64_t o = 0; o < c->out; ++o) {
                double gv = tm_get(&g, i, o);
                r_gbias[o] += gv;
                for (int64_t j = 0; j < c->in; ++j) {
                    r_gw[o * c->in + j] += gv * tm_get(&x, i, j);
                    r_gx[i * c->in + j] += gv * tm_get(&w, o, j);
                }
                int64_t grp = o / seg, kk = 0;
                for (int64_t t = 0; t < grp; ++t)
                    kk += c->enabled[t] != 0;
                if (!c->enabled[grp])
                    continue;
                int64_t brow = kk * seg + o % seg;
                for (int64_t q = 0; q < c->r; ++q) {
                    /* y += s * Σ_j dx[i,j] A[kk*r+q, j] * B[brow, q] */
                    double bq = tm_get(&lb, brow, q);
                    r_gb[brow * c->r + q] += a.scale * gv * ref_xa[i * rk + kk * c->r + q];
                    for (int64_t j = 0; j < c->in; ++j) {
                        r_ga[(kk * c->r + q) * c->in + j] += a.scale * gv * bq * dx[i * c->in + j];
                        r_gx[i * c->in + j] += a.scale * gv * bq * tm_get(&la, kk * c->r + q, j) *
                                               ref_mask(&a.dropout, i, j, c->in);
                    }
                }
            }
        cpeft_lora_linear_bwd_in bi = {g.m, xa.m};
        cpeft_lora_linear_bwd_out bo = {
            gx.m, ga.m, gbm.m, {gbias.m.data, c->out, gbias.m.row_stride}, gw.m};
        expect_rc("lora bwd", cpeft_lora_linear_bwd_cpu(&a, &bi, &bo, &st), CPEFT_OK, &st);
        snprintf(what, sizeof what, "lora bwd m%lld in%lld out%lld r%lld G%lld fifo%d p%.1f",
                 (long long)c->m, (long long)c->in, (long long)c->out, (long long)c->r,
                 (long long)c->groups, c->fan_in_fan_out, c->p);
        compare(what, &gx, r_gx, 0);
        compare("lora bwd grad_a", &ga, r_ga, 0);
        compare("lora bwd grad_b", &gbm, r_gb, 0);
        compare("lora bwd grad_bias", &gbias, r_gbias, 0);
        compare("lora bwd grad_weight", &gw, r_gw, 0);

        /* Only grad_a requested (grad_x absent): the chunked dropout path without grad_x. */
        tm_poison(&ga);
        cpeft_lora_linear_bwd_out only_a = {{0}, ga.m, {0}, {0}, {0}};
        expect_rc("lora bwd grad_a only", cpeft_lora_linear_bwd_cpu(&a, &bi, &only_a, &st),
                  CPEFT_OK, &st);
        compare("lora bwd grad_a only", &ga, r_ga, 0);

        free(r_gx);
        free(r_ga);
        free(r_gb);
        free(r_gbias);
        free(r_gw);
        tm_free(&gx);
        tm_free(&ga);
        tm_free(&gbm);
        tm_free(&gbias);
        tm_free(&gw);
    }
    free(dx);
    free(ref_xa);
    free(ref_y);
    tm_free(&x);
    tm_free(&w);
    tm_free(&bias);
    tm_free(&la);
    tm_free(&lb);
    tm_free(&y);
    tm_free(&xa);
    tm_free(&g);
}

static void test_lora_linear(void)
{
    static const uint8_t plain[1] = {1};
    static const uint8_t grouped[3] = {1, 0, 1};
    static const uint8_t none[2] = {0, 0};
    static const int64_t sizes[] = {1, 3, 17};
    for (int d = 0; d < 2; ++d)
        for (int v = 0; v < 3 * 3 * 3 * 2; ++v) {
            int64_t m = sizes[v % 3], in = sizes[(v / 3) % 3], seg = sizes[(v / 9) % 3];
            int grouped_case = (v / 27) % 2;
            for (int flags = 0; flags < 16; ++flags) {
                lora_case c = {
                    .m = m,
                    .in = in,
                    .r = (flags & 1) ? 3 : 1,
                    .groups = grouped_case ? 3 : 1,
                    .enabled = grouped_case ? grouped : plain,
                    .bias = (flags >> 1) & 1,
                    .fan_in_fan_out = (flags >> 2) & 1,
                    .x_layout = (flags >> 3) & 1,
                    .out_layout = (flags >> 1) & 1,
                    .keep_xa = 1,
                    .p = (flags & 5) == 5 ? 1.0
                         : (flags & 8)    ? 0.3
                                          : 0.0,
                    .seed = 42 + (uint64_t)v,
                    .offset = (uint64_t)flags * 7,
                };
                c.out = seg * c.groups;
                run_lora_case(dtypes[d], &c);
            }
        }
    /* No enabled block: xa has zero columns and y is the base linear. */
    lora_case empty = {.m = 3,
                       .in = 5,
                       .out = 4,
                       .r = 2,
                       .groups = 2,
                       .enabled = none,
                       .bias = 1,
                       .keep_xa = 1,
                       .p = 0.2};
    run_lora_case(CPEFT_FLOAT32, &empty);
    /* M == 0 (and forward without kept xa). */
    lora_case zero_m = {
        .m = 0, .in = 5, .out = 4, .r = 2, .groups = 1, .enabled = plain, .keep_xa = 1, .p = 0.5};
    run_lora_case(CPEFT_FLOAT64, &zero_m);
    lora_case no_xa = {.m = 7,
                       .in = 5,
                       .out = 4,
                       .r = 2,
                       .groups = 1,
                       .enabled = plain,
                       .keep_xa = 0,
                       .p = 0.5,
                       .seed = 9};
    run_lora_case(CPEFT_FLOAT32, &no_xa);
    /* Several dropout chunks (2 MiB / (5000 * 4 B) = 104 rows per chunk), offset not aligned to
     * a Philox block and crossing 2^32 in the counter. */
    for (int d = 0; d < 2; ++d) {
        lora_case chunked = {.m = 230,
                             .in = 5000,
                             .out = 6,
                             .r = 2,
                             .groups = 3,
                             .enabled = grouped,
                             .bias = 1,
                             .x_layout = d,
                             .out_layout = d,
                             .keep_xa = 1,
                             .p = 0.4,
                             .seed = 0xDEADBEEFCAFEull,
                             .offset = (1ull << 32) - 12345};
        run_lora_case(dtypes[d], &chunked);
    }
}

/* -------------------------------------------------------------------------- lora embedding */

static void run_embedding_case(cpeft_dtype dt, cpeft_dtype idt, int64_t n, int64_t V, int64_t D,
                               int64_t r, int64_t padding, int layout)
{
    void *idx = malloc((size_t)(n > 0 ? n : 1) * 2 * 8);
    int64_t *ref_idx = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; ++i) {
        ref_idx[i] = (int64_t)(rng_next() % (uint64_t)V);
        if (idt == CPEFT_INT32)
            ((int32_t *)idx)[2 * i] = (int32_t)ref_idx[i];
        else
            ((int64_t *)idx)[2 * i] = ref_idx[i];
    }
    tmat w = tm_new(dt, V, D, layout), la = tm_new(dt, r, V, !layout),
         lb = tm_new(dt, D, r, layout);
    tmat y = tm_new(dt, n, D, !layout), g = tm_new(dt, n, D, layout);
    tm_rand(&w);
    tm_rand(&la);
    tm_rand(&lb);
    tm_rand(&g);
    tm_poison(&y);
    cpeft_lora_embedding_args a = {dt,          idt, n,    V,    D,    r,
                                   {idx, n, 2}, w.m, la.m, lb.m, 1.25, padding};
    double *ry = ref_new(n, D), *rga = ref_new(r, V), *rgb = ref_new(D, r), *rgw = ref_new(V, D);
    for (int64_t i = 0; i < n; ++i) {
        int64_t v = ref_idx[i];
        for (int64_t j = 0; j < D; ++j) {
            double s = tm_get(&w, v, j);
            for (int64_t q = 0; q < r; ++q)
                s += a.scale * tm_get(&la, q, v) * tm_get(&lb, j, q);
            ry[i * D + j] = s;
            double gv = tm_get(&g, i, j);
            for (int64_t q = 0; q < r; ++q) {
                rgb[j * r + q] += a.scale * gv * tm_get(&la, q, v);
                if (v != padding)
                    rga[q * V + v] += a.scale * gv * tm_get(&lb, j, q);
            }
            if (v != padding)
                rgw[v * D + j] += gv;
        }
    }
    cpeft_status st;
    expect_rc("emb fwd", cpeft_lora_embedding_fwd_cpu(&a, y.m, &st), CPEFT_OK, &st);
    compare("emb fwd", &y, ry, 0);
    tmat ga = tm_new(dt, r, V, layout), gb = tm_new(dt, D, r, !layout),
         gw = tm_new(dt, V, D, layout);
    tm_poison(&ga);
    tm_poison(&gb);
    tm_poison(&gw);
    cpeft_lora_embedding_bwd_in bi = {g.m};
    cpeft_lora_embedding_bwd_out bo = {ga.m, gb.m, gw.m};
    a.weight.data = NULL; /* backward must not need the weight */
    expect_rc("emb bwd", cpeft_lora_embedding_bwd_cpu(&a, &bi, &bo, &st), CPEFT_OK, &st);
    compare("emb bwd grad_a", &ga, rga, 0);
    compare("emb bwd grad_b", &gb, rgb, 0);
    compare("emb bwd grad_weight", &gw, rgw, 0);
    if (n > 0) {
        /* An out-of-range index is refused before anything is touched. */
        if (idt == CPEFT_INT32)
            ((int32_t *)idx)[2 * (n - 1)] = (int32_t)V;
        else
            ((int64_t *)idx)[2 * (n - 1)] = -1;
        a.weight = w.m;
        expect_rc("emb fwd bad index", cpeft_lora_embedding_fwd_cpu(&a, y.m, &st), CPEFT_ERR_INDEX,
                  &st);
    }
    free(ry);
    free(rga);
    free(rgb);
    free(rgw);
    free(idx);
    free(ref_idx);
    tm_free(&w);
    tm_free(&la);
    tm_free(&lb);
    tm_free(&y);
    tm_free(&g);
    tm_free(&ga);
    tm_free(&gb);
    tm_free(&gw);
}

static void test_lora_embedding(void)
{
    static const int64_t sizes[] = {1, 3, 17};
    for (int d = 0; d < 2; ++d)
        for (int v = 0; v < 27; ++v)
            for (int flags = 0; flags < 8; ++flags) {
                int64_t V = sizes[v % 3], D = sizes[(v / 3) % 3], n = sizes[(v / 9) % 3];
                run_embedding_case(dtypes[d], (flags & 1) ? CPEFT_INT64 : CPEFT_INT32,
                                   (flags & 4) && v == 0 ? 0 : n, V, D, (flags & 2) ? 3 : 1,
                                   (flags & 4) ? V / 2 : -1, (flags >> 1) & 1);
            }
}

/* ------------------------------------------------------------------------------------- ia3 */

static void run_ia3_case(cpeft_dtype dt, int64_t m, int64_t in, int64_t out, int ff, int bias_on,
                         int keep_base, int layout)
{
    int64_t nl = ff ? in : out;
    tmat x = tm_new(dt, m, in, layout), w = tm_new(dt, out, in, !layout);
    tmat b = tm_new(dt, out, 1, ROW_MAJOR), l = tm_new(dt, 1, nl, COL_MAJOR);
    tmat y = tm_new(dt, m, out, layout), base = tm_new(dt, m, out, !layout),
         g = tm_new(dt, m, out, layout);
    tm_rand(&x);
    tm_rand(&w);
    tm_rand(&b);
    tm_rand(&l);
    tm_rand(&g);
    tm_poison(&y);
    tm_poison(&base);
    cpeft_vec lv = {l.m.data, nl, l.m.col_stride};
    cpeft_ia3_linear_args a = {
        dt, m, in, out, ff, x.m, w.m, {bias_on ? b.m.data : NULL, out, b.m.row_stride}, lv};
    double *ry = ref_new(m, out), *rbase = ref_new(m, out), *rgx = ref_new(m, in);
    double *rgl = ref_new(nl, 1), *rgb = ref_new(out, 1), *rgw = ref_new(out, in);
    for (int64_t i = 0; i < m; ++i)
        for (int64_t o = 0; o < out; ++o) {
            double s = bias_on ? tm_get(&b, o, 0) : 0.0;
            for (int64_t j = 0; j < in; ++j)
                s += tm_get(&x, i, j) * (ff ? tm_get(&l, 0, j) : 1.0) * tm_get(&w, o, j);
            rbase[i * out + o] = s;
            ry[i * out + o] = ff ? s : s * tm_get(&l, 0, o);
            /* backward from the definitions */
            double gv = tm_get(&g, i, o);
            double gy = ff ? gv : gv * tm_get(&l, 0, o); /* d/d(pre-scale output) */
            rgb[o] += gy;
            if (!ff)
                rgl[o] += gv * s;
            for (int64_t j = 0; j < in; ++j) {
                double lj = ff ? tm_get(&l, 0, j) : 1.0;
                rgx[i * in + j] += gy * tm_get(&w, o, j) * lj;
                rgw[o * in + j] += gy * tm_get(&x, i, j) * lj;
                if (ff)
                    rgl[j] += gy * tm_get(&w, o, j) * tm_get(&x, i, j);
            }
        }
    cpeft_ia3_linear_fwd_out fo = {y.m, base.m};
    if (!keep_base)
        fo.base.data = NULL;
    cpeft_status st;
    char what[128];
    snprintf(what, sizeof what, "ia3 fwd m%lld in%lld out%lld ff%d bias%d base%d", (long long)m,
             (long long)in, (long long)out, ff, bias_on, keep_base);
    expect_rc(what, cpeft_ia3_linear_fwd_cpu(&a, &fo, &st), CPEFT_OK, &st);
    compare(what, &y, ry, 0);
    if (keep_base && !ff)
        compare("ia3 fwd base", &base, rbase, 0);
    if (!ff && !keep_base) { /* backward needs base: fill it from the reference */
        for (int64_t i = 0; i < m; ++i)
            for (int64_t o = 0; o < out; ++o)
                tm_set(&base, i, o, rbase[i * out + o]);
    }
    tmat gx = tm_new(dt, m, in, !layout), gl = tm_new(dt, nl, 1, COL_MAJOR);
    tmat gb = tm_new(dt, 1, out, COL_MAJOR), gw = tm_new(dt, out, in, layout);
    for (int variant = 0; variant < 2; ++variant) {
        tm_poison(&gx);
        tm_poison(&gl);
        tm_poison(&gb);
        tm_poison(&gw);
        cpeft_ia3_linear_bwd_in bi = {g.m, ff ? (cpeft_mat){0} : base.m};
        cpeft_ia3_linear_bwd_out bo = {
            gx.m, {gl.m.data, nl, gl.m.row_stride}, {gb.m.data, out, gb.m.col_stride}, gw.m};
        if (variant == 1) /* grad_l alone (ff: the chunked g·W path) */
            bo.grad_x.data = bo.grad_bias.data = bo.grad_weight.data = NULL;
        snprintf(what, sizeof what, "ia3 bwd m%lld in%lld out%lld ff%d variant%d", (long long)m,
                 (long long)in, (long long)out, ff, variant);
        expect_rc(what, cpeft_ia3_linear_bwd_cpu(&a, &bi, &bo, &st), CPEFT_OK, &st);
        compare(what, &gl, rgl, 0);
        if (variant == 0) {
            compare("ia3 bwd grad_x", &gx, rgx, 0);
            compare("ia3 bwd grad_bias", &gb, rgb, 0);
            compare("ia3 bwd grad_weight", &gw, rgw, 0);
        }
    }
    free(ry);
    free(rbase);
    free(rgx);
    free(rgl);
    free(rgb);
    free(rgw);
    tm_free(&x);
    tm_free(&w);
    tm_free(&b);
    tm_free(&l);
    tm_free(&y);
    tm_free(&base);
    tm_free(&g);
    tm_free(&gx);
    tm_free(&gl);
    tm_free(&gb);
    tm_free(&gw);
}

static void run_ia3_embedding_case(cpeft_dtype dt, int64_t n, int64_t V, int64_t D, int64_t padding,
                                   int layout)
{
    int64_t *idx = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
    for (int64_t i = 0; i < n; ++i)
        idx[i] = (int64_t)(rng_next() % (uint64_t)V);
    tmat w = tm_new(dt, V, D, layout), l = tm_new(dt, D, 1, ROW_MAJOR);
    tmat y = tm_new(dt, n, D, !layout), g = tm_new(dt, n, D, layout);
    tm_rand(&w);
    tm_rand(&l);
    tm_rand(&g);
    tm_poison(&y);
    cpeft_ia3_embedding_args a = {
        dt, CPEFT_INT64, n, V, D, {idx, n, 1}, w.m, {l.m.data, D, l.m.row_stride}, padding};
    double *ry = ref_new(n, D), *rgl = ref_new(D, 1), *rgw = ref_new(V, D);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < D; ++j) {
            double wv = tm_get(&w, idx[i], j), lj = tm_get(&l, j, 0), gv = tm_get(&g, i, j);
            ry[i * D + j] = wv * lj;
            rgl[j] += gv * wv;
            if (idx[i] != padding)
                rgw[idx[i] * D + j] += gv * lj;
        }
    cpeft_status st;
    expect_rc("ia3 emb fwd", cpeft_ia3_embedding_fwd_cpu(&a, y.m, &st), CPEFT_OK, &st);
    compare("ia3 emb fwd", &y, ry, 0);
    tmat gl = tm_new(dt, 1, D, COL_MAJOR), gw = tm_new(dt, V, D, !layout);
    tm_poison(&gl);
    tm_poison(&gw);
    cpeft_ia3_embedding_bwd_out bo = {{gl.m.data, D, gl.m.col_stride}, gw.m};
    expect_rc("ia3 emb bwd", cpeft_ia3_embedding_bwd_cpu(&a, g.m, &bo, &st), CPEFT_OK, &st);
    compare("ia3 emb bwd grad_l", &gl, rgl, 0);
    compare("ia3 emb bwd grad_weight", &gw, rgw, 0);
    free(idx);
    free(ry);
    free(rgl);
    free(rgw);
    tm_free(&w);
    tm_free(&l);
    tm_free(&y);
    tm_free(&g);
    tm_free(&gl);
    tm_free(&gw);
}

static void test_ia3(void)
{
    static const int64_t sizes[] = {1, 3, 17};
    for (int d = 0; d < 2; ++d)
        for (int v = 0; v < 27; ++v)
            for (int flags = 0; flags < 16; ++flags)
                run_ia3_case(dtypes[d], sizes[v % 3], sizes[(v / 3) % 3], sizes[(v / 9) % 3],
                             flags & 1, (flags >> 1) & 1, (flags >> 2) & 1, (flags >> 3) & 1);
    /* Several g·W chunks for the grad_l-only feedforward path (2 MiB / (5000*8 B) = 52 rows). */
    run_ia3_case(CPEFT_FLOAT64, 120, 5000, 3, 1, 1, 0, ROW_MAJOR);
    for (int d = 0; d < 2; ++d)
        for (int v = 0; v < 27; ++v)
            run_ia3_embedding_case(dtypes[d], sizes[(v / 9) % 3], sizes[v % 3], sizes[(v / 3) % 3],
                                   v % 2 ? 0 : -1, v % 4 >= 2);
}

/* ----------------------------------------------------------------------------------- dropout */

static void test_dropout(void)
{
    static const double ps[] = {0.0, 0.1, 0.5, 0.9, 1.0};
    static const uint64_t offsets[] = {0, 3, 5, (1ull << 32) - 7, (1ull << 34) + 1};
    for (int d = 0; d < 2; ++d)
        for (int pi = 0; pi < 5; ++pi)
            for (int oi = 0; oi < 5; ++oi)
                for (int layout = 0; layout < 2; ++layout) {
                    cpeft_dtype dt = dtypes[d];
                    cpeft_dropout dr = {ps[pi], 0x0123456789ABCDEFull + (uint64_t)oi, offsets[oi]};
                    tmat mask = tm_new(dt, 17, 13, layout);
                    tm_poison(&mask);
                    double *ref = ref_new(17, 13);
                    int64_t kept = 0;
                    for (int64_t i = 0; i < 17; ++i)
                        for (int64_t j = 0; j < 13; ++j) {
                            int keep = cpeft_dropout_keep(&dr, (uint64_t)(i * 13 + j));
                            kept += keep;
                            ref[i * 13 + j] = keep ? (double)(dt == CPEFT_FLOAT32
                                                                  ? (float)cpeft_dropout_keep_scale(
                                                                        dr.p)
                                                                  : cpeft_dropout_keep_scale(dr.p))
                                                   : 0.0;
                        }
                    cpeft_status st;
                    expect_rc("dropout mask", cpeft_dropout_mask_cpu(dt, &dr, mask.m, &st),
                              CPEFT_OK, &st);
                    compare("dropout mask", &mask, ref, 0);
                    ++checks;
                    if ((ps[pi] == 0.0 && kept != 17 * 13) || (ps[pi] == 1.0 && kept != 0))
                        fail("dropout p=%g kept %lld of %d", ps[pi], (long long)kept, 17 * 13);
                    free(ref);
                    tm_free(&mask);
                }
    /* Keep rate over many counters is close to 1 - p (the generator is not degenerate). */
    cpeft_dropout dr = {0.3, 7, 0};
    int64_t kept = 0, total = 200000;
    for (int64_t c = 0; c < total; ++c)
        kept += cpeft_dropout_keep(&dr, (uint64_t)c);
    ++checks;
    if (fabs((double)kept / (double)total - 0.7) > 0.01)
        fail("dropout keep rate %g for p=0.3", (double)kept / (double)total);
    /* Rows applied from an arbitrary row0 match the mask at those rows. */
    for (int d = 0; d < 2; ++d) {
        cpeft_dtype dt = dtypes[d];
        tmat src = tm_new(dt, 4, 9, ROW_MAJOR), dst = tm_new(dt, 4, 9, COL_MAJOR);
        tm_rand(&src);
        tm_poison(&dst);
        cpeft_dropout dd = {0.45, 99, 11};
        double *ref = ref_new(4, 9);
        for (int64_t i = 0; i < 4; ++i)
            for (int64_t j = 0; j < 9; ++j)
                ref[i * 9 + j] = 2.0 * tm_get(&src, i, j) * ref_mask(&dd, 5 + i, j, 9);
        cpeft_dropout_rows_cpu(dt, &dd, 5, 2.0, src.m, 0, dst.m);
        compare("dropout rows", &dst, ref, 0);
        free(ref);
        tm_free(&src);
        tm_free(&dst);
    }
}

/* ------------------------------------------------------------------------------------- merge */

/* Mixed magnitudes: the merged value loses low bits of W for many elements. */
static double mixed_value(void)
{
    double e = (double)(int)(rng_next() % 24) - 12.0;
    return rng_sym() * pow(2.0, e);
}

static int bits_equal(const tmat *a, const void *saved)
{
    return memcmp(a->buf, saved, (size_t)a->buf_len * cpeft_dtype_size(a->dt)) == 0;
}

static void run_lora_merge_case(cpeft_dtype dt, int64_t in, int64_t seg, int64_t r, int64_t groups,
                                const uint8_t *enabled, int layout, int cycles)
{
    int64_t k = 0;
    for (int64_t g = 0; g < groups; ++g)
        k += enabled[g] != 0;
    int64_t out = seg * groups;
    tmat w = tm_new(dt, out, in, layout), la = tm_new(dt, r * k, in, !layout),
         lb = tm_new(dt, seg * k, r, layout);
    for (int64_t i = 0; i < out; ++i)
        for (int64_t j = 0; j < in; ++j)
            tm_set(&w, i, j, mixed_value());
    if (out * in > 2) { /* signed zero and NaN must survive too */
        tm_set(&w, 0, 0, -0.0);
        tm_set(&w, out - 1, in - 1, NAN);
    }
    for (int64_t i = 0; i < r * k; ++i)
        for (int64_t j = 0; j < in; ++j)
            tm_set(&la, i, j, mixed_value());
    for (int64_t i = 0; i < seg * k; ++i)
        for (int64_t j = 0; j < r; ++j)
            tm_set(&lb, i, j, mixed_value());
    size_t bytes = (size_t)w.buf_len * cpeft_dtype_size(dt);
    void *original = malloc(bytes);
    memcpy(original, w.buf, bytes);

    cpeft_lora_linear_args a;
    memset(&a, 0, sizeof a);
    a.dtype = dt;
    a.in = in;
    a.out = out;
    a.r = r;
    a.groups = groups;
    memcpy(a.enabled, enabled, (size_t)groups);
    a.weight = w.m;
    a.lora_a = la.m;
    a.lora_b = lb.m;
    a.scale = 0.37;

    /* Reference merged weight, in double. */
    double *ref = ref_new(out, in);
    for (int64_t o = 0; o < out; ++o) {
        int64_t grp = o / seg, kk = 0;
        for (int64_t t = 0; t < grp; ++t)
            kk += enabled[t] != 0;
        for (int64_t j = 0; j < in; ++j) {
            double s = tm_get(&w, o, j);
            if (enabled[grp])
                for (int64_t q = 0; q < r; ++q)
                    s += a.scale * tm_get(&lb, kk * seg + o % seg, q) * tm_get(&la, kk * r + q, j);
            ref[o * in + j] = s;
        }
    }
    if (out * in > 2)
        ref[out * in - 1] = 0.0; /* the NaN element is checked by bit equality only */

    cpeft_status st;
    int64_t total_exceptions = 0;
    /* Odd cycles keep ΔW in a W-sized scratch between the count pass and the merge, as a caller
     * that allocates the record itself does; their merge must equal cycle 0's bit for bit. */
    void *delta = malloc((size_t)(out * in > 0 ? out * in : 1) * cpeft_dtype_size(dt));
    void *first_merge = malloc(bytes);
    for (int cycle = 0; cycle < cycles; ++cycle) {
        int with_delta = cycle % 2 == 1;
        cpeft_merge_record rec = {NULL, NULL, 0, -1, with_delta ? delta : NULL, 0};
        expect_rc("merge count", cpeft_lora_merge_cpu(&a, CPEFT_MERGE, &rec, &st), CPEFT_OK, &st);
        ++checks;
        if (!bits_equal(&w, original))
            fail("count-only merge modified the weight");
        int64_t count = rec.count;
        total_exceptions += count;
        rec.index = malloc((size_t)(count + 1) * sizeof(int64_t));
        rec.value = malloc((size_t)(count + 1) * cpeft_dtype_size(dt));
        rec.capacity = count;
        rec.delta_ready = 1;
        expect_rc("merge", cpeft_lora_merge_cpu(&a, CPEFT_MERGE, &rec, &st), CPEFT_OK, &st);
        ++checks;
        if (rec.count != count)
            fail("merge recorded %lld entries, count-only said %lld", (long long)rec.count,
                 (long long)count);
        if (cycle == 0) {
            memcpy(first_merge, w.buf, bytes);
            if (out * in > 2)
                tm_set(&w, out - 1, in - 1, 0.0);
            compare("merged weight", &w, ref, 0);
            if (out * in > 2)
                tm_set(&w, out - 1, in - 1, NAN);
        } else if (!bits_equal(&w, first_merge)) {
            fail("merge of cycle %d (%s ΔW scratch) differs from cycle 0's", cycle,
                 with_delta ? "with" : "without");
        }
        rec.delta = NULL;
        expect_rc("unmerge", cpeft_lora_merge_cpu(&a, CPEFT_UNMERGE, &rec, &st), CPEFT_OK, &st);
        ++checks;
        if (!bits_equal(&w, original)) {
            fail("lora unmerge not bit-exact after cycle %d (in %lld seg %lld layout %d)", cycle,
                 (long long)in, (long long)seg, layout);
            cycle = cycles;
        }
        if (count > 0 && cycle == 0) {
            /* Too small a record (the weight changed after the count pass) is refused. */
            rec.capacity = count - 1;
            expect_rc("merge overflow", cpeft_lora_merge_cpu(&a, CPEFT_MERGE, &rec, &st),
                      CPEFT_ERR_CHANGED, &st);
            memcpy(w.buf, original, bytes);
            /* Unmerge recomputes ΔW: a scratch handed to it is refused. */
            rec.delta = delta;
            expect_rc("unmerge with delta", cpeft_lora_merge_cpu(&a, CPEFT_UNMERGE, &rec, &st),
                      CPEFT_ERR_INTERNAL, &st);
            rec.delta = NULL;
            /* A record index outside the view is refused before W is touched. */
            rec.capacity = count;
            rec.count = 1;
            rec.index[0] = out * in;
            expect_rc("unmerge bad index", cpeft_lora_merge_cpu(&a, CPEFT_UNMERGE, &rec, &st),
                      CPEFT_ERR_INDEX, &st);
            ++checks;
            if (!bits_equal(&w, original))
                fail("refused unmerge modified the weight");
        }
        free(rec.index);
        free(rec.value);
    }
    if (cycles > 1 && dt == CPEFT_FLOAT32 && out * in >= 64 && total_exceptions == 0)
        fail("no exceptions recorded over %d cycles: the test exercises nothing", cycles);
    free(delta);
    free(first_merge);
    free(ref);
    free(original);
    tm_free(&w);
    tm_free(&la);
    tm_free(&lb);
}

static void run_ia3_merge_case(cpeft_dtype dt, int64_t rows, int64_t cols, int along_cols,
                               int layout, int cycles)
{
    tmat w = tm_new(dt, rows, cols, layout);
    int64_t nl = along_cols ? cols : rows;
    tmat l = tm_new(dt, nl, 1, ROW_MAJOR);
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
            tm_set(&w, i, j, mixed_value());
    for (int64_t i = 0; i < nl; ++i)
        tm_set(&l, i, 0, mixed_value());
    if (nl > 2)
        tm_set(&l, 1, 0, 0.0); /* merged = 0, unmerge = 0/0: the record must restore */
    double *ref = ref_new(rows, cols);
    for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < cols; ++j)
            ref[i * cols + j] = tm_get(&w, i, j) * tm_get(&l, along_cols ? j : i, 0);
    size_t bytes = (size_t)w.buf_len * cpeft_dtype_size(dt);
    void *original = malloc(bytes);
    memcpy(original, w.buf, bytes);
    cpeft_vec lv = {l.m.data, nl, l.m.row_stride};
    cpeft_status st;
    for (int cycle = 0; cycle < cycles; ++cycle) {
        cpeft_merge_record rec = {NULL, NULL, 0, -1, NULL, 0};
        expect_rc("ia3 merge count",
                  cpeft_ia3_merge_cpu(dt, w.m, lv, along_cols, CPEFT_MERGE, &rec, &st), CPEFT_OK,
                  &st);
        int64_t count = rec.count;
        rec.index = malloc((size_t)(count + 1) * sizeof(int64_t));
        rec.value = malloc((size_t)(count + 1) * cpeft_dtype_size(dt));
        rec.capacity = count;
        expect_rc("ia3 merge", cpeft_ia3_merge_cpu(dt, w.m, lv, along_cols, CPEFT_MERGE, &rec, &st),
                  CPEFT_OK, &st);
        if (cycle == 0)
            compare("ia3 merged weight", &w, ref, 0);
        expect_rc("ia3 unmerge",
                  cpeft_ia3_merge_cpu(dt, w.m, lv, along_cols, CPEFT_UNMERGE, &rec, &st), CPEFT_OK,
                  &st);
        ++checks;
        if (!bits_equal(&w, original)) {
            fail("ia3 unmerge not bit-exact after cycle %d", cycle);
            cycle = cycles;
        }
        free(rec.index);
        free(rec.value);
    }
    free(ref);
    free(original);
    tm_free(&w);
    tm_free(&l);
}

static void test_merge(void)
{
    static const uint8_t plain[1] = {1};
    static const uint8_t grouped[3] = {1, 0, 1};
    static const int64_t sizes[] = {1, 3, 17};
    for (int d = 0; d < 2; ++d)
        for (int v = 0; v < 9; ++v)
            for (int layout = 0; layout < 2; ++layout) {
                run_lora_merge_case(dtypes[d], sizes[v % 3], sizes[v / 3], 2, 1, plain, layout, 3);
                run_lora_merge_case(dtypes[d], sizes[v % 3], sizes[v / 3], 3, 3, grouped, layout,
                                    3);
                run_ia3_merge_case(dtypes[d], sizes[v % 3], sizes[v / 3], 0, layout, 3);
                run_ia3_merge_case(dtypes[d], sizes[v % 3], sizes[v / 3], 1, layout, 3);
            }
    /* 50 merge/unmerge cycles in float32 on a weight large enough for several delta chunks in
     * the transposed layout (2 MiB / (seg 1100 * 4 B) = 476 rows per chunk over IN = 1200). */
    for (int layout = 0; layout < 2; ++layout) {
        run_lora_merge_case(CPEFT_FLOAT32, 1200, 1100, 4, 3, grouped, layout, 50);
        run_ia3_merge_case(CPEFT_FLOAT32, 300, 200, layout, layout, 50);
    }
    run_lora_merge_case(CPEFT_FLOAT64, 97, 33, 4, 3, grouped, 1, 50);
}

/* ---------------------------------------------------------------------------------- dtypes */

static void test_unsupported_dtype(void)
{
    cpeft_status st;
    cpeft_dropout dr = {0.5, 1, 0};
    cpeft_mat mask = {NULL, 0, 0, 1, 1};
    int rc = cpeft_dropout_mask_cpu(CPEFT_FLOAT16, &dr, mask, &st);
    expect_rc("float16 on CPU", rc, CPEFT_ERR_INTERNAL, &st);
    ++checks;
    if (strstr(st.message, "dropout_mask") == NULL || strstr(st.message, "float32") == NULL)
        fail("dtype message does not name the op and the expectation: %s", st.message);
    cpeft_lora_linear_args a;
    memset(&a, 0, sizeof a);
    a.dtype = CPEFT_BFLOAT16;
    cpeft_lora_linear_fwd_out fo;
    memset(&fo, 0, sizeof fo);
    expect_rc("bfloat16 lora fwd", cpeft_lora_linear_fwd_cpu(&a, &fo, &st), CPEFT_ERR_INTERNAL,
              &st);
}

int main(void)
{
    test_gemm();
    test_colsum();
    test_dropout();
    test_lora_linear();
    test_lora_embedding();
    test_ia3();
    test_merge();
    test_unsupported_dtype();
    printf("%d checks, %d failures\n", checks, failures);
    return failures != 0;
}
