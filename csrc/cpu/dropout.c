/* Counter-based dropout on the CPU: the mask as data (dropout.h) and its row-chunk application
 * used by the LoRA ops (dropout_rows.h). Both follow cpeft_dropout_keep (core.h) exactly. */
#include "cpeft/dropout.h"

#include "dropout_rows.h"
#include "op_setup.h"

/*
 * Keep flags for a run of counters. Philox4x32-10 is a chain of ten dependent multiply rounds,
 * so calling cpeft_dropout_keep per element runs one chain per element (four per counter block)
 * with no overlap. Here eight independent counter blocks advance through the rounds together,
 * so their multiplies overlap in the pipeline, and each block serves its four lanes (about 4x
 * fewer chains, 6 ns per element measured single-threaded). The rounds are exactly
 * cpeft_philox4x32_10 (core.h); the harness checks every flag against cpeft_dropout_keep.
 */
#define PHILOX_BATCH 8
#define KEEP_RUN 512            /* counters per flag buffer (on the stack) */

/* uniform >= p with uniform = (lane >> 8) * 2^-24 exactly (a 24-bit integer times a power of
 * two), so it is lane >> 8 >= ceil(p * 2^24); p >= 1 gives 2^24, which no lane reaches. */
static uint32_t keep_threshold(double p)
{
    double scaled = (double)(float)p * 16777216.0;
    if (scaled <= 0.0)
        return 0;
    if (scaled >= 16777216.0)
        return 16777216u;
    uint32_t t = (uint32_t)scaled;
    return (double)t < scaled ? t + 1 : t;
}

/* Counter c lives in Philox block c >> 2, so blocks are numbers below 2^62. */
#define PHILOX_BLOCK_MASK (((uint64_t)1 << 62) - 1)

/*
 * keep[k] = cpeft_dropout_keep(d, counter + k) for k < n (n <= KEEP_RUN). Counters are
 * offset + counter + k modulo 2^64, exactly as cpeft_dropout_keep computes them, so a run may
 * cross 2^64 (offsets are any uint64): blocks are walked relative to the first one, and block
 * numbers taken modulo 2^62, never compared as absolute counters.
 */
static void keep_flags(const cpeft_dropout *d, uint32_t threshold, uint64_t counter, int64_t n,
                       uint8_t *keep)
{
    uint64_t first = d->offset + counter;
    uint64_t first_block = first >> 2;
    uint64_t lead = first & 3;   /* lanes of the first block that precede the run */
    uint64_t blocks = (lead + (uint64_t)n + 3) >> 2;
    for (uint64_t k0 = 0; k0 < blocks; k0 += PHILOX_BATCH) {
        uint32_t x0[PHILOX_BATCH], x1[PHILOX_BATCH], x2[PHILOX_BATCH], x3[PHILOX_BATCH];
        for (int i = 0; i < PHILOX_BATCH; ++i) {
            uint64_t block = (first_block + k0 + (uint64_t)i) & PHILOX_BLOCK_MASK;
            x0[i] = (uint32_t)block;
            x1[i] = (uint32_t)(block >> 32);
            x2[i] = 0u;
            x3[i] = 0u;
        }
        uint32_t key0 = (uint32_t)d->seed, key1 = (uint32_t)(d->seed >> 32);
        for (int round = 0; round < 10; ++round) {
            for (int i = 0; i < PHILOX_BATCH; ++i) {
                uint64_t p0 = (uint64_t)0xD2511F53u * x0[i];
                uint64_t p1 = (uint64_t)0xCD9E8D57u * x2[i];
                uint32_t n0 = (uint32_t)(p1 >> 32) ^ x1[i] ^ key0;
                uint32_t n2 = (uint32_t)(p0 >> 32) ^ x3[i] ^ key1;
                x0[i] = n0;
                x1[i] = (uint32_t)p1;
                x2[i] = n2;
                x3[i] = (uint32_t)p0;
            }
            key0 += 0x9E3779B9u;
            key1 += 0xBB67AE85u;
        }
        for (int i = 0; i < PHILOX_BATCH; ++i) {
            const uint32_t lanes[4] = {x0[i], x1[i], x2[i], x3[i]};
            for (uint64_t lane = 0; lane < 4; ++lane) {
                /* Position in the run; lanes before it wrap to huge values and are skipped. */
                uint64_t k = ((k0 + (uint64_t)i) << 2) + lane - lead;
                if (k < (uint64_t)n)
                    keep[k] = (lanes[lane] >> 8) >= threshold;
            }
        }
    }
}

#define T float
#define SUFFIX f32
#include "dropout_loops.inc"
#undef T
#undef SUFFIX

#define T double
#define SUFFIX f64
#include "dropout_loops.inc"
#undef T
#undef SUFFIX

int cpeft_dropout_mask_cpu(cpeft_dtype dtype, const cpeft_dropout *d, cpeft_mat mask,
                           cpeft_status *st)
{
    int rc = cpeft_op_begin(dtype, "dropout_mask", st);
    if (rc != CPEFT_OK)
        return rc;
    if (dtype == CPEFT_FLOAT32)
        mask_f32(d, mask);
    else
        mask_f64(d, mask);
    return CPEFT_OK;
}

void cpeft_dropout_rows_cpu(cpeft_dtype dtype, const cpeft_dropout *d, int64_t row0, double alpha,
                            cpeft_mat src, int accumulate, cpeft_mat dst)
{
    if (dtype == CPEFT_FLOAT32)
        rows_f32(d, row0, alpha, src, accumulate, dst);
    else
        rows_f64(d, row0, alpha, src, accumulate, dst);
}
